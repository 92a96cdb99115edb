"""The C heap (host.malloc): glibc tuned for large tensors, and the heap's counts and trims under glibc
and under a preloaded jemalloc, each read in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

JEMALLOC = next(
    (
        p
        for p in ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")
        if Path(p).exists()
    ),
    None,
)


def probe(env: dict[str, str] | None = None) -> tuple[str, tuple[int, int, int], bool, bool]:
    """(allocator, heap stats, whether a trim worked, whether glibc took the tuning), in a new process
    that holds torch's heap."""
    code = (
        "import torch; from host import malloc; tuned = malloc.tune_malloc(); x = torch.ones(1 << 20); "
        "print(malloc.allocator(), *malloc.heap_stats(), malloc.release_free_memory(), tuned)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **(env or {})}, capture_output=True, text=True
    )
    name, heap, in_use, free, released, tuned = out.stdout.split()
    return name, (int(heap), int(in_use), int(free)), released == "True", tuned == "True"


def test_under_glibc_the_heap_is_tuned_and_counted() -> None:
    name, (heap, in_use, free), _, tuned = probe()
    assert (name, tuned) == ("glibc", True)
    assert heap >= in_use > 4e6 and free >= 0  # the 4 MB tensor lives in the one arena's heap


@pytest.mark.skipif(JEMALLOC is None, reason="needs jemalloc (Debian package libjemalloc2; .ci/run installs it)")
def test_under_a_preloaded_jemalloc_the_counts_and_trims_are_its_own() -> None:
    # glibc's mallinfo2 would read an empty heap there (jemalloc serves every malloc)
    name, (heap, in_use, free), released, tuned = probe(
        {"LD_PRELOAD": str(JEMALLOC), "MALLOC_CONF": "dirty_decay_ms:-1"}
    )
    assert (name, released, tuned) == ("jemalloc", True, False)  # glibc's settings would change nothing there
    assert heap >= in_use > 1e6 and free == heap - in_use
