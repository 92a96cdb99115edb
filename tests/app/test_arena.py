"""The front ends' shared memory: blocks taken and given back, and the same bytes on both sides."""

from __future__ import annotations

import itertools
import os
import random

import numpy as np

from app.frontends import arena


def test_blocks_fit_merge_and_run_out() -> None:
    blocks = arena.Blocks(1024)
    a, b, c = blocks.take(100), blocks.take(200), blocks.take(300)
    assert (a, b, c) == (0, 128, 384)  # first fit, each on a 64-byte line
    assert blocks.take(400) is None  # 704 taken, 320 left
    blocks.give_back(b)
    assert blocks.take(192) == 128  # the hole is reused
    blocks.give_back_all([a, 128, c])
    assert blocks.used == 0 and blocks.take(1024) == 0  # every block merged back into one


def test_random_takes_and_gives_never_overlap() -> None:
    rng = random.Random(0)
    blocks, held = arena.Blocks(1 << 16), {}  # offset -> size
    for _ in range(2000):
        if held and rng.random() < 0.5:
            offset = rng.choice(list(held))
            del held[offset]
            blocks.give_back(offset)
            continue
        size = rng.randint(1, 4000)
        offset = blocks.take(size)
        if offset is None:
            continue
        spans = sorted([*((o, o + s) for o, s in held.items()), (offset, offset + size)])
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
        held[offset] = size
    for offset in list(held):
        blocks.give_back(offset)
    assert blocks.take(1 << 16) == 0


def test_a_clip_written_by_one_mapping_is_read_by_another() -> None:
    fd = arena.create(1 << 20)
    try:
        writer, reader = arena.mapping(fd), arena.mapping(os.dup(fd))
        clip = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
        arena.view(writer, 4096, clip.shape)[...] = clip
        seen = arena.view(reader, 4096, clip.shape)
        assert np.array_equal(seen, clip) and seen.base is not None  # a view of the memory, not a copy
    finally:
        os.close(fd)
