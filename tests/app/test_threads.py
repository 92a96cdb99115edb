"""The CPU's intra-op threads shared among forward passes that run at the same time."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import torch

from app.runtime import PASS_PIXELS, CpuThreads, ModelRuntime, frames_per_encoder_pass
from models import load_checkpoint
from tests.app.conftest import live_server


def test_a_pass_alone_gets_every_thread_and_two_at_once_half_each() -> None:
    budget = CpuThreads(4)
    first_in, second_done = threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def first() -> None:
        with budget.share() as n:
            seen["first"], seen["first torch"] = n, torch.get_num_threads()
            first_in.set()
            assert second_done.wait(10)

    def second() -> None:
        assert first_in.wait(10)
        with budget.share() as n:
            seen["second"], seen["second torch"] = n, torch.get_num_threads()
        second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"first": 4, "first torch": 4, "second": 2, "second torch": 2}
    with budget.share() as n:  # both finished: alone again
        assert n == 4
    assert CpuThreads(1).total == 1 and CpuThreads(0).total == 1


def test_the_default_for_threads_started_later_is_left_at_the_total() -> None:
    before = torch.get_num_threads()
    budget = CpuThreads(before)
    other_in, release = threading.Event(), threading.Event()

    def hold() -> None:
        with budget.share():
            other_in.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert other_in.wait(10)
    with budget.share() as n:
        assert n == max(1, before // 2)
    release.set()
    holder.join(10)
    seen: list[int] = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join(10)
    assert seen == [before]


def test_the_runtime_runs_each_cpu_forward_inside_its_share(default_ckpt: Path) -> None:
    runtime = ModelRuntime(load_checkpoint(default_ckpt), torch.device("cpu"))
    calls: list[int] = []

    class Counting(CpuThreads):
        def share(self):  # type: ignore[no-untyped-def]
            calls.append(1)
            return super().share()

    spec = runtime.checkpoint.input
    frames = torch.zeros(2 * 4, spec["channels"], spec["height"], spec["width"], dtype=torch.uint8)
    lengths = torch.tensor([4, 4])
    plain = runtime.infer(frames, lengths)
    runtime.threads = Counting(2)
    shared = runtime.infer(frames, lengths)
    assert calls == [1]
    torch.testing.assert_close(shared, plain)


def test_a_default_cpu_server_runs_two_instances_when_torch_has_two_threads(default_ckpt: Path) -> None:
    ckpt = load_checkpoint(default_ckpt)
    expected = 2 if torch.get_num_threads() >= 2 else 1
    with live_server(checkpoint=default_ckpt, max_batch_size=2) as url:
        info = httpx.get(f"{url}/models/{ckpt.name}").json()
    assert info["batching"]["instances"] == expected
    assert info["batching"]["max_batch_size"] == 2 and info["batching"]["share_from"] == 1  # half a batch
    # the served model's batch norms were folded into its convs (one per conv block of the bundled CNN)
    assert info["batchnorm_folded"] == sum(isinstance(m, torch.nn.BatchNorm2d) for m in ckpt.model.modules()) > 0
    # on the CPU the encoder takes a batch's frames in slices of ENCODER_PASS_PIXELS
    spec = ckpt.input
    assert info["frames_per_pass"] == PASS_PIXELS // (spec["height"] * spec["width"])
    with live_server(checkpoint=default_ckpt, max_batch_size=2, instances=1, encoder_pass_pixels=0) as url:
        info = httpx.get(f"{url}/models/{ckpt.name}").json()
    assert info["batching"]["instances"] == 1 and info["frames_per_pass"] is None
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
