"""Batches on a CUDA device: staged in pinned memory, copied on a side stream, and replayed from
CUDA graphs where their shape allows. A batch of clips decoded on the device
(``app.gpu_decode``) is put together there and never passes through the host.

``start`` returns as soon as the batch is queued on the device (``Queued``), so the batcher can
copy the next batch while this one computes. With graphs, batches whose clips all have the
model's clip length are padded to a power-of-two bucket of clips and replayed from a graph
captured before serving (``capture``), which removes the launch overhead of a small model's
many kernels; other lengths and ragged batches run eagerly. A capture that fails turns graphs
off for the model (logged); it never fails a request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

Probs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (frames, lengths) -> (B, K) on the device
UniformProbs = Callable[[torch.Tensor, int], torch.Tensor]  # (frames of `clips` equal clips, clips) -> (B, K)


def bucket(clips: int) -> int:
    """The power of two at or above ``clips``: the batch size a CUDA graph is captured for."""
    return 1 << (clips - 1).bit_length()


class Queued:
    """A batch queued on a CUDA stream; ``result`` blocks until its probabilities are on the host."""

    ready = False

    def __init__(self, probs: torch.Tensor, done: torch.cuda.Event, keep: torch.Tensor) -> None:
        self._probs, self._done = probs, done
        self._keep: torch.Tensor | None = keep  # the input (pinned, or on the device), alive until it is read

    def result(self) -> torch.Tensor:
        self._done.synchronize()
        self._keep = None
        return self._probs


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    frames: torch.Tensor  # static input (bucket * T, C, H, W) uint8 on the device
    probs: torch.Tensor  # static output (bucket, K) float32 on the device


class CudaPath:
    """One model's batches on ``device``: ``probs`` runs a batch eagerly, ``uniform`` a batch of equal
    clips (the shape graphs are captured for); ``frame`` is one frame's (C, H, W)."""

    def __init__(
        self, name: str, device: torch.device, probs: Probs, uniform: UniformProbs, frame: tuple[int, int, int]
    ) -> None:
        self.name, self.device, self.frame = name, device, frame
        self._probs, self._uniform = probs, uniform
        self._copy_stream = torch.cuda.Stream(device)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None  # the graphs' memory pool, made at the first capture

    @property
    def graph_buckets(self) -> list[int]:
        return sorted(clips for clips, _ in self._graphs)

    def stage(self, clips: list[torch.Tensor]) -> torch.Tensor:
        """A batch's clips (T, C, H, W) as one frames tensor (N, C, H, W), channels-last, ready for
        ``start``. Clips on the host are concatenated straight into pinned memory, the copy that
        ``start`` would otherwise make; once any clip is on the device (decoded there), the batch is
        put together on the device, on the compute stream, which may use each clip's memory
        (``record_stream``) until it has read it."""
        C, H, W = clips[0].shape[1:]
        N = sum(clip.shape[0] for clip in clips)
        if not any(clip.is_cuda for clip in clips):
            staged = torch.empty((N, H, W, C), dtype=torch.uint8, pin_memory=True).permute(0, 3, 1, 2)
            return torch.cat(clips, out=staged)
        with torch.cuda.device(self.device):
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(compute):
                on_device = []
                for clip in clips:
                    if clip.is_cuda:
                        clip.record_stream(compute)
                    on_device.append(clip.to(self.device))  # a host clip among device clips: copied in
                staged = torch.empty((N, H, W, C), dtype=torch.uint8, device=self.device).permute(0, 3, 1, 2)
                return torch.cat(on_device, out=staged)

    def start(self, frames: torch.Tensor, lengths: torch.Tensor) -> Queued:
        """Queue a batch: frames (N, C, H, W) uint8 on the host (copied in on the copy stream, from pinned
        memory: ``stage``'s, or a copy) or on the device already (used where they are)."""
        with torch.cuda.device(self.device):
            compute = torch.cuda.current_stream(self.device)
            if frames.is_cuda:
                on_device = keep = frames
                on_device.record_stream(compute)
            else:
                keep = frames if frames.is_pinned() else frames.pin_memory()
                with torch.cuda.stream(self._copy_stream):
                    on_device = keep.to(self.device, non_blocking=True)
                compute.wait_stream(self._copy_stream)
                on_device.record_stream(compute)  # allocated on the copy stream, used on the compute one
            with torch.cuda.stream(compute):  # explicit: whatever stream a caller left current
                probs = self._forward(on_device, lengths)
                out = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
                out.copy_(probs, non_blocking=True)
                done = torch.cuda.Event()
                done.record(compute)
        return Queued(out, done, keep)

    def _forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        clips = lengths.numel()
        T = int(lengths[0]) if clips else 0
        graph = self._graphs.get((bucket(clips), T)) if clips else None
        if graph is not None and bool((lengths == T).all()):
            graph.frames[: frames.shape[0]].copy_(frames)  # rows past it: stale clips, answers ignored
            graph.graph.replay()
            return graph.probs[:clips].clone()  # the next replay overwrites the static output
        return self._probs(frames, lengths)

    def capture(self, max_batch_size: int, T: int) -> bool:
        """Capture a graph for every power-of-two bucket up to ``max_batch_size`` clips of ``T`` frames,
        before serving, so that no capture ever meets a request. False (graphs off, logged) on failure."""
        with torch.cuda.device(self.device):
            size = 1
            while size <= bucket(max_batch_size):
                before = torch.cuda.current_stream(self.device)
                try:
                    self._graphs[(size, T)] = self._capture(size, T)
                except Exception as exc:  # e.g. a kernel that cannot be captured
                    torch.cuda.set_stream(before)  # a failed capture can leave its stream current
                    torch.cuda.synchronize(self.device)
                    log.warning(
                        "%s: CUDA graph capture failed (%d clips of %d frames): %s; graphs off", self.name, size, T, exc
                    )
                    self._graphs.clear()
                    return False
                size *= 2
        log.info("%s: CUDA graphs captured for %s clips of %d frames", self.name, self.graph_buckets, T)
        return True

    def _capture(self, clips: int, T: int) -> _Graph:
        """One graph of the forward pass for ``clips`` clips of ``T`` frames (raises if capture fails)."""
        C, H, W = self.frame
        static = torch.zeros(clips * T, H, W, C, dtype=torch.uint8)
        static = static.permute(0, 3, 1, 2).to(self.device)  # channels-last, as decoded frames arrive
        side = torch.cuda.Stream(self.device)  # warm up and capture off the default stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._uniform(static, clips)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time: one pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: another model's worker using CUDA meanwhile cannot spoil this capture
        with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
            probs = self._uniform(static, clips)
        return _Graph(graph, static, probs)
