"""The CPU's intra-op threads shared among forward passes that run at the same time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from app.runtime import PASS_PIXELS, STARTUP_THREADS, CpuThreads, ModelRuntime, frames_per_encoder_pass
from models import load_checkpoint
from tests.app.conftest import encode, live_server, multipart_frames, synth_clip


@pytest.fixture
def keep_torch_threads() -> Iterator[int]:
    """CpuThreads changes this thread's torch threads and the default of threads started later: restore both."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def where() -> tuple[str, int]:
    return threading.current_thread().name, torch.get_num_threads()


def two_passes(budget: CpuThreads) -> dict[str, tuple[str, int]]:
    """A first pass that runs alone, and a second that starts while the first still runs: where each ran."""
    first_in, second_done = threading.Event(), threading.Event()
    seen: dict[str, tuple[str, int]] = {}

    def first_pass() -> None:
        seen["first"] = where()
        first_in.set()
        assert second_done.wait(10)

    def second_pass() -> None:
        seen["second"] = where()

    def second() -> None:
        assert first_in.wait(10)
        budget.run(second_pass)
        second_done.set()

    threads = [
        threading.Thread(target=budget.run, args=(first_pass,), name="first"),
        threading.Thread(target=second, name="second"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return seen


def test_a_pass_alone_runs_on_the_wide_lane_with_every_thread_and_others_wait_for_it_then_share(
    keep_torch_threads: int,
) -> None:
    budget = CpuThreads(4)
    assert budget.wide_lane and torch.get_num_threads() == 1  # the thread that made it drops to one
    wide_in, release_wide, narrow_in, release_narrow = (threading.Event() for _ in range(4))
    seen: dict[str, tuple[str, int]] = {}

    def wide_pass() -> None:
        seen["wide"] = where()
        wide_in.set()
        assert release_wide.wait(10)

    def narrow_pass(name: str) -> None:
        seen[name] = where()
        narrow_in.set()
        assert release_narrow.wait(10)

    try:
        first = threading.Thread(target=budget.run, args=(wide_pass,))
        first.start()
        assert wide_in.wait(10)
        others = [threading.Thread(target=budget.run, args=(narrow_pass, n), name=n) for n in ("second", "third")]
        for t in others:
            t.start()
        # both wait for the pass on every thread rather than run beside it
        deadline = time.monotonic() + 10
        while budget.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert budget.waiting == 2 and not narrow_in.is_set() and "second" not in seen and "third" not in seen
        release_wide.set()
        first.join(10)
        assert narrow_in.wait(10)
        release_narrow.set()
        for t in others:
            t.join(10)
        # then they run side by side on their own threads, half the threads each
        assert seen == {"wide": ("torch-wide_0", 4), "second": ("second", 2), "third": ("third", 2)}
        assert budget.run(where) == ("torch-wide_0", 4)  # all finished: alone again, on the lane
        # the lane's count stays its own while other threads set theirs
        torch.set_num_threads(1)
        assert budget.run(where) == ("torch-wide_0", 4)
    finally:
        budget.close()
    assert CpuThreads(1).total == 1 and not CpuThreads(1).wide_lane and CpuThreads(0).total == 1


def test_with_the_wide_lane_threads_started_later_run_torch_on_one_thread_until_it_closes(
    keep_torch_threads: int,
) -> None:
    def in_a_fresh_thread() -> int:
        seen: list[int] = []
        fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        fresh.start()
        fresh.join(10)
        return seen[0]

    budget = CpuThreads(3)
    assert in_a_fresh_thread() == 1
    budget.close()
    assert not budget.wide_lane and in_a_fresh_thread() == 3


def test_without_the_wide_lane_each_pass_runs_on_its_caller_at_its_share(keep_torch_threads: int) -> None:
    budget = CpuThreads(4, wide_lane=False)
    assert not budget.wide_lane
    assert two_passes(budget) == {"first": ("first", 4), "second": ("second", 2)}
    assert budget.run(where) == (threading.current_thread().name, 4)


def test_without_the_wide_lane_the_default_for_threads_started_later_is_left_at_the_total(
    keep_torch_threads: int,
) -> None:
    before = keep_torch_threads
    budget = CpuThreads(before, wide_lane=False)
    other_in, release = threading.Event(), threading.Event()

    def hold() -> None:
        other_in.set()
        release.wait(10)

    holder = threading.Thread(target=budget.run, args=(hold,))
    holder.start()
    assert other_in.wait(10)
    assert budget.run(torch.get_num_threads) == max(1, before // 2)
    release.set()
    holder.join(10)
    seen: list[int] = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join(10)
    assert seen == [before]


def test_the_runtime_runs_each_cpu_forward_in_inference_mode_inside_its_share(
    default_ckpt: Path, keep_torch_threads: int
) -> None:
    runtime = ModelRuntime(load_checkpoint(default_ckpt), torch.device("cpu"))
    calls: list[tuple[str, bool]] = []

    class Counting(CpuThreads):
        def run(self, fn, *args):  # type: ignore[no-untyped-def]
            def recorded(*a):  # type: ignore[no-untyped-def]
                calls.append((threading.current_thread().name, torch.is_inference_mode_enabled()))
                return fn(*a)

            return super().run(recorded, *args)

    spec = runtime.checkpoint.input
    frames = torch.zeros(2 * 4, spec["channels"], spec["height"], spec["width"], dtype=torch.uint8)
    lengths = torch.tensor([4, 4])
    plain = runtime.infer(frames, lengths)
    runtime.threads = budget = Counting(2)
    try:
        shared = runtime.infer(frames, lengths)
    finally:
        budget.close()
    # inference mode is per thread: the lane must enter it itself
    assert calls == [("torch-wide_0", False)] and torch.is_inference(shared)
    torch.testing.assert_close(shared, plain)


def test_a_default_cpu_server_runs_two_instances_when_torch_has_two_threads(default_ckpt: Path) -> None:
    ckpt = load_checkpoint(default_ckpt)
    expected = 2 if STARTUP_THREADS >= 2 else 1
    with live_server(checkpoint=default_ckpt, max_batch_size=2) as url:
        info = httpx.get(f"{url}/models/{ckpt.name}").json()
        jpegs = [encode(frame) for frame in synth_clip(frames=4)]
        answer = httpx.post(f"{url}/predict", files=multipart_frames(jpegs))  # a pass alone: on the lane
    assert answer.status_code == 200, answer.text
    assert info["batching"]["instances"] == expected
    # torch's threads as the process started; where there are two or more, passes alone take the wide lane
    assert info["batching"]["torch_threads"] == STARTUP_THREADS
    assert info["batching"]["wide_lane"] is (STARTUP_THREADS > 1)
    assert info["batching"]["max_batch_size"] == 2 and info["batching"]["share_from"] == 1  # half a batch
    # the served model's batch norms were folded into its convs (one per conv block of the bundled CNN)
    assert info["batchnorm_folded"] == sum(isinstance(m, torch.nn.BatchNorm2d) for m in ckpt.model.modules()) > 0
    # on the CPU the encoder takes a batch's frames in slices of ENCODER_PASS_PIXELS
    spec = ckpt.input
    assert info["frames_per_pass"] == PASS_PIXELS // (spec["height"] * spec["width"])
    with live_server(
        checkpoint=default_ckpt, max_batch_size=2, instances=1, encoder_pass_pixels=0, wide_lane=False
    ) as url:
        info = httpx.get(f"{url}/models/{ckpt.name}").json()
    assert info["batching"]["instances"] == 1 and info["frames_per_pass"] is None
    assert info["batching"]["wide_lane"] is False
    with live_server(checkpoint=default_ckpt, max_batch_size=8, share_from=3) as url:  # set: it wins
        info = httpx.get(f"{url}/models/{ckpt.name}").json()
    assert info["batching"]["max_batch_size"] == 8 and info["batching"]["share_from"] == 3


def test_frames_per_encoder_pass_slices_on_the_cpu_only() -> None:
    spec = {"height": 64, "width": 32}
    cpu = torch.device("cpu")
    assert frames_per_encoder_pass(spec, 64 * 64 * 10, cpu, compiled=False) == 20
    assert frames_per_encoder_pass(spec, 100, cpu, compiled=False) == 1  # never fewer than one frame
    assert frames_per_encoder_pass(spec, 0, cpu, compiled=False) is None  # 0: whole batches
    assert frames_per_encoder_pass(spec, 64 * 64 * 10, cpu, compiled=True) is None
    assert frames_per_encoder_pass(spec, 64 * 64 * 10, torch.device("cuda"), compiled=False) is None
