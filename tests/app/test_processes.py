"""DECODE_PROCESSES: decoding in spawned worker processes (app.processes), and what happens when one dies."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from app.errors import BadInput, DecoderFailed, NotReady
from app.loading import decode_processes
from app.processes import ProcessDecoders
from app.settings import Settings
from app.uploads import Target, image_frames
from media import FrameFormat, Limits
from tests.app.decode_jobs import crash_always, crash_once, raise_bad_input, slow_frames
from tests.support.clips import images_clip
from tests.support.media import encode, synth_clip

LIMITS = Target(FrameFormat(32, 32, 3), 8, Limits(64, 4096 * 4096))


class Outcomes:
    """Collects ``done`` callbacks from the pool's thread."""

    def __init__(self, count: int) -> None:
        self.items: list[tuple[np.ndarray | None, BaseException | None]] = []
        self._lock, self._all = threading.Lock(), threading.Event()
        self.count = count

    def __call__(self, array: np.ndarray | None, exc: BaseException | None) -> None:
        with self._lock:
            self.items.append((array, exc))
            if len(self.items) == self.count:
                self._all.set()

    def wait(self) -> list[tuple[np.ndarray | None, BaseException | None]]:
        assert self._all.wait(60), f"only {len(self.items)} of {self.count} answered"
        return self.items


@pytest.fixture(scope="module")
def decoders():  # type: ignore[no-untyped-def]
    pool = ProcessDecoders(2)
    assert len(pool.start()) == 2
    yield pool
    pool.shutdown()


def test_a_process_that_dies_mid_job_is_replaced_and_the_jobs_it_held_decoded_again(
    decoders: ProcessDecoders, tmp_path: Path
) -> None:
    blobs = [encode(f) for f in synth_clip("left", frames=6, seed=5)]
    expected = images_clip(blobs, LIMITS)
    restarts = decoders.restarts
    done = Outcomes(3)
    decoders.submit(done, slow_frames, 1.0, blobs, LIMITS)  # running in the other process when one dies
    decoders.submit(done, crash_once, str(tmp_path / "crashed"), blobs, LIMITS)
    decoders.submit(done, image_frames, blobs, LIMITS)  # waiting in the pool
    for array, exc in done.wait():
        assert exc is None, exc
        assert array is not None and array.shape == (6, 32, 32, 3)
        assert torch.equal(torch.from_numpy(array).permute(0, 3, 1, 2), expected)
    assert decoders.restarts == restarts + 1
    assert (tmp_path / "crashed").exists()


def test_a_job_that_kills_every_process_gets_503_alone_and_the_pool_goes_on(decoders: ProcessDecoders) -> None:
    blobs = [encode(f) for f in synth_clip("up", frames=4, seed=6)]
    restarts = decoders.restarts
    done = Outcomes(2)
    decoders.submit(done, slow_frames, 1.0, blobs, LIMITS)  # caught in both breaks, then decoded alone
    decoders.submit(done, crash_always, blobs, LIMITS)
    results = done.wait()
    [(array, _)] = [r for r in results if r[1] is None]
    assert array is not None and array.shape == (4, 32, 32, 3)
    [exc] = [e for _, e in results if e is not None]
    assert isinstance(exc, DecoderFailed)
    assert decoders.restarts == restarts + 2  # the shared pool broke twice; the third try ran alone
    after = Outcomes(2)
    decoders.submit(after, image_frames, blobs, LIMITS)
    decoders.submit(after, raise_bad_input, blobs, LIMITS)  # a decode error crosses back as itself
    results = after.wait()
    assert any(a is not None and a.shape == (4, 32, 32, 3) for a, _ in results)
    [err] = [e for _, e in results if e is not None]
    assert isinstance(err, BadInput) and "planted" in str(err)


def test_decode_processes_default_to_half_the_cores_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device object: no GPU is touched
    for cores, on_cuda in ((16, 8), (64, 8), (6, 3), (2, 0), (1, 0)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        assert decode_processes(Settings(), cuda) == on_cuda
        assert decode_processes(Settings(), cpu) == 0
    assert decode_processes(Settings(decode_processes=0), cuda) == 0  # set explicitly: wins both ways
    assert decode_processes(Settings(decode_processes=3), cpu) == 3


def test_a_job_after_shutdown_is_refused_as_not_ready() -> None:
    pool = ProcessDecoders(1)
    pool.start()
    pool.shutdown()
    with pytest.raises(NotReady):
        pool.submit(Outcomes(1), image_frames, [b""], LIMITS)


def test_a_cancel_flag_is_set_only_while_its_job_holds_the_slot() -> None:
    import multiprocessing

    from app.processes import CancelFlags

    flags = CancelFlags(multiprocessing.get_context("spawn"), slots=1)
    first = flags.take()
    assert first is not None and flags.take() is None  # one slot: the second job cannot be stopped early
    flags.set(first)
    assert flags.array[first[0]] == 1
    flags.give_back(first)
    assert flags.array[first[0]] == 0
    second = flags.take()
    assert second is not None and second[0] == first[0]
    flags.set(first)  # the first job's request ends after its job did: the slot is another's now
    assert flags.array[second[0]] == 0
    flags.give_back(first)  # nor can it give the slot back twice
    assert flags.take() is None
