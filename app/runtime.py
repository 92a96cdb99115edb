"""One loaded model on one device: its forward pass (``run``), warm-up, and what it reports.

``run`` is called from the model's batcher workers only (and from loading before they
start). It returns a pending batch: on the CPU computed already (``Done``), on CUDA only
queued (``app.cuda.Queued``). On the CPU the pass runs at its share of torch's threads
(``app.threads.CpuThreads``) and the encoder takes a batch in slices of at most
``pass_pixels`` input pixels, so a large batch needs the activation memory of one slice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from app.cuda import CudaPath, Queued
from app.threads import CpuThreads
from models import Checkpoint, InputSpec
from models.encoders import fold_batchnorm
from models.profile import profile_encoder

log = logging.getLogger(__name__)
T = TypeVar("T")

PASS_PIXELS = 64 * 64 * 64  # on the CPU, most input pixels per encoder pass: 64 frames of 64x64


def pick_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on a CUDA device that supports it, else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def frames_per_encoder_pass(spec: InputSpec, pass_pixels: int, device: torch.device, compiled: bool) -> int | None:
    """Most frames per encoder pass for a model with input ``spec`` (None: a whole batch).

    Sliced on the CPU only: not on CUDA, where wide passes are what the GPU is for, nor under
    torch.compile, whose graphs are traced on whole batches.
    """
    if device.type != "cpu" or compiled or pass_pixels <= 0:
        return None
    return max(1, pass_pixels // (spec.height * spec.width))


class Done:
    """A batch whose probabilities are computed already (the CPU)."""

    ready = True

    def __init__(self, probs: torch.Tensor) -> None:
        self._probs = probs

    def result(self) -> torch.Tensor:
        return self._probs


class ModelRuntime:
    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        *,
        precision: str = "fp32",
        cuda_graphs: bool = False,
        compiled: bool = False,
        threads: CpuThreads | None = None,
        pass_pixels: int = PASS_PIXELS,
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.checkpoint, self.device, self.precision, self.compiled = checkpoint, device, precision, compiled
        self.threads = threads  # the intra-op threads its CPU passes share with other passes
        self.spec = checkpoint.input
        model = checkpoint.model
        self.encoder = profile_encoder(model)  # before folding: the parameters as trained
        self.folded = fold_batchnorm(model.eval())  # each batch norm into its conv: one pass less per block
        model.frames_per_pass = frames_per_encoder_pass(self.spec, pass_pixels, device, compiled)
        if compiled:  # the CNN is where the time goes; dynamic: batches vary in frames
            model.encoder = torch.compile(model.encoder, dynamic=True)  # type: ignore[assignment]
        self._cuda: CudaPath | None = None
        if device.type == "cuda":
            frame = (self.spec.channels, self.spec.height, self.spec.width)
            self._cuda = CudaPath(self.name, device, self._probs, self._uniform_probs, frame)
        self.cuda_graphs = cuda_graphs and self._cuda is not None

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def version(self) -> str:
        return self.checkpoint.version

    @property
    def labels(self) -> list[str]:
        return self.checkpoint.labels

    @property
    def frames_per_pass(self) -> int | None:
        """Most frames per encoder pass (None: a batch's frames in one pass)."""
        return self.checkpoint.model.frames_per_pass

    def stage(self, clips: list[torch.Tensor]) -> torch.Tensor:
        """A batch's clips (T, C, H, W) as the frames (N, C, H, W) that ``run`` takes: on CUDA staged
        for the copy, or put together on the device (``CudaPath.stage``); on the CPU ``torch.cat``."""
        if self._cuda is not None:
            return self._cuda.stage(clips)
        return torch.cat(clips)

    @torch.inference_mode()
    def run(self, frames: torch.Tensor, lengths: torch.Tensor) -> Done | Queued:
        """Start one batch: frames (N, C, H, W) uint8 of B clips, lengths (B,); its ``result()`` is the
        probabilities (B, K) float32 on the CPU."""
        if self._cuda is not None:
            return self._cuda.start(frames, lengths)
        if self.threads is None:
            return Done(self._probs(frames, lengths))
        return Done(self.threads.run(self._cpu_probs, frames, lengths))

    @torch.inference_mode()
    def compute(self, fn: Callable[..., T], *args: Any, narrow: bool = False) -> T:
        """``fn(model, *args)`` at the model's precision, on its share of the CPU threads (``narrow``: on
        one, ``CpuThreads.run_narrow``), synchronously (streams and timelines: the encoder and head
        steps outside the clip batcher)."""
        if self.threads is None or self.device.type != "cpu":
            return self._compute(fn, args)
        if narrow:
            return self.threads.run_narrow(self._compute, fn, args)
        return self.threads.run(self._compute, fn, args)

    @torch.inference_mode()  # on whichever thread runs it
    def _compute(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._autocast():
            return fn(self.checkpoint.model, *args)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        # cache_enabled=False: cached weight casts must not outlive a graph capture
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _probs(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.checkpoint.model(frames, lengths)
        return logits.float().softmax(dim=-1)

    def _uniform_probs(self, frames: torch.Tensor, clips: int) -> torch.Tensor:
        with self._autocast():
            return self.checkpoint.model.forward_uniform(frames, clips).float().softmax(dim=-1)

    @torch.inference_mode()  # on whichever thread runs it: inference mode is per thread
    def _cpu_probs(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self._probs(frames, lengths)

    @torch.inference_mode()
    def prepare(self, max_batch_size: int) -> None:
        """Capture the CUDA graphs for every batch bucket up to ``max_batch_size`` clips at the model's
        clip length, before serving; a failed capture turns graphs off (logged)."""
        if self._cuda is not None and self.cuda_graphs:
            self.cuda_graphs = self._cuda.capture(max_batch_size, self.spec.frames)

    def warm_up(self, max_frames: int) -> None:
        """Run a few dummy batches so first requests don't pay for lazy initialisation; where bf16
        fails on this device, fall back to fp32 (logged) rather than fail later."""
        shapes = ((1, 1), (1, self.spec.frames), (4, min(max_frames, self.spec.frames)))
        try:
            for batch, length in shapes:
                self._warm(batch, length)
        except Exception as exc:
            if self.precision == "fp32":
                raise
            log.warning("%s: %s inference failed on %s (%s); using fp32", self.name, self.precision, self.device, exc)
            self.precision = "fp32"
            for batch, length in shapes:
                self._warm(batch, length)

    def _warm(self, batch: int, length: int) -> None:
        spec = self.spec
        frames = torch.zeros(batch * length, spec.channels, spec.height, spec.width, dtype=torch.uint8)
        self.run(frames, torch.full((batch,), length)).result()

    def describe(self) -> dict[str, Any]:
        meta = self.checkpoint.metadata
        return {
            "name": self.name,
            "version": self.version,
            "labels": self.labels,
            "input": self.spec.to_dict(),
            "metrics": meta["metrics"],
            "arch": meta["arch"],
            "device": str(self.device),
            "precision": self.precision,
            "cuda_graphs": self.cuda_graphs,
            "compiled": self.compiled,
            "encoder": self.encoder,
            "batchnorm_folded": self.folded,
            "frames_per_pass": self.frames_per_pass,
            "created_at": meta["created_at"],
        }
