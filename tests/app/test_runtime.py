"""One model's runtime on the CPU: its forward pass in inference mode at its share of the threads, the
answer of a batch equal to each clip's alone, warm-up, slices through the encoder, and what it reports.
tests/app/test_cuda.py runs the CUDA path where a GPU is present."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.runtime import Done, ModelRuntime, frames_per_encoder_pass, pick_precision
from app.settings import PASS_PIXELS
from app.threads import CpuThreads
from models import InputSpec, load_checkpoint


@pytest.fixture
def keep_torch_threads() -> Iterator[int]:
    """CpuThreads changes this thread's torch threads and the default of threads started later: restore both."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


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
    frames = torch.zeros(2 * 4, spec.channels, spec.height, spec.width, dtype=torch.uint8)
    lengths = torch.tensor([4, 4])
    plain = runtime.run(frames, lengths).result()
    runtime.threads = budget = Counting(2)
    try:
        shared = runtime.run(frames, lengths).result()
    finally:
        budget.close()
    # inference mode is per thread: the lane must enter it itself
    assert calls == [("torch-wide_0", False)] and torch.is_inference(shared)
    torch.testing.assert_close(shared, plain)


def test_frames_per_encoder_pass_slices_on_the_cpu_only() -> None:
    spec = InputSpec(64, 32, 3, (0.5,) * 3, (0.5,) * 3, 8, 1, 16)
    cpu = torch.device("cpu")
    assert frames_per_encoder_pass(spec, 64 * 64 * 10, cpu, compiled=False) == 20
    assert frames_per_encoder_pass(spec, 100, cpu, compiled=False) == 1  # never fewer than one frame
    assert frames_per_encoder_pass(spec, 0, cpu, compiled=False) is None  # 0: whole batches
    assert frames_per_encoder_pass(spec, 64 * 64 * 10, cpu, compiled=True) is None
    assert frames_per_encoder_pass(spec, 64 * 64 * 10, torch.device("cuda"), compiled=False) is None


def test_a_batch_answers_each_clip_as_it_would_alone_and_is_ready_on_return(default_ckpt: Path) -> None:
    runtime = ModelRuntime(load_checkpoint(default_ckpt), torch.device("cpu"))
    spec = runtime.spec
    gen = torch.Generator().manual_seed(0)
    clips = [
        torch.randint(0, 256, (t, spec.channels, spec.height, spec.width), generator=gen, dtype=torch.uint8)
        for t in (3, 7, 1)
    ]
    pending = runtime.run(torch.cat(clips), torch.tensor([3, 7, 1]))
    assert isinstance(pending, Done) and pending.ready  # the CPU computes it before returning
    batch = pending.result()
    assert batch.shape == (3, len(runtime.labels)) and batch.dtype == torch.float32
    for row, clip in zip(batch, clips, strict=True):
        alone = runtime.run(clip, torch.tensor([clip.shape[0]])).result()[0]
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.sum(-1), torch.ones(3))


def test_warm_up_describes_and_precision_follows_the_device(default_ckpt: Path) -> None:
    ckpt = load_checkpoint(default_ckpt)
    runtime = ModelRuntime(ckpt, torch.device("cpu"), pass_pixels=PASS_PIXELS)
    runtime.warm_up(max_frames=64)
    info = runtime.describe()
    assert info["input"] == ckpt.metadata["input"] and info["labels"] == ckpt.labels
    assert (info["device"], info["precision"], info["cuda_graphs"], info["compiled"]) == ("cpu", "fp32", False, False)
    assert info["frames_per_pass"] == PASS_PIXELS // (ckpt.input.height * ckpt.input.width)
    assert (
        pick_precision("auto", torch.device("cpu")) == "fp32" and pick_precision("bf16", torch.device("cpu")) == "bf16"
    )
    with pytest.raises(ValueError, match="fp16"):
        ModelRuntime(ckpt, torch.device("cpu"), precision="fp16")


def test_cuda_graphs_asked_for_on_the_cpu_are_off(default_ckpt: Path) -> None:
    runtime = ModelRuntime(load_checkpoint(default_ckpt), torch.device("cpu"), cuda_graphs=True)
    runtime.prepare(8)  # nothing to capture on the CPU
    assert runtime.cuda_graphs is False
