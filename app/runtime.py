"""One loaded model on one device: warm-up and batched forward passes.

``ModelRuntime`` is used from the batcher's worker thread only (and from the loader
before the worker starts). ``infer`` runs a batch and returns probabilities on the
CPU. ``launch`` starts one and returns a handle whose ``wait`` gives them: on the CPU
the work is done by then; on CUDA only queued, so the batcher can copy the next batch
while this one computes.

On CUDA:
- the batch is staged in pinned host memory and copied on a side stream without
  blocking, so a copy overlaps the forward pass of the batch before it;
- ``precision`` ``bf16`` runs the model under bfloat16 autocast (``auto`` picks it
  where the GPU supports it);
- with ``cuda_graphs``, batches whose clips all have the model's clip length are
  padded to a power-of-two bucket of clips and replayed from a CUDA graph captured at
  start (``prepare``) for that bucket, which removes the launch overhead of the many
  small kernels of a small model. Other lengths and ragged batches run eagerly. A
  capture that fails turns graphs off for this model (logged), it never fails a request.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from app.decode import InputLimits
from models import Checkpoint, CheckpointError, load_checkpoint
from models.encoders import fold_batchnorm

T = TypeVar("T")
log = logging.getLogger(__name__)

# torch's intra-op threads as the process started (its own default, or OMP_NUM_THREADS), read
# before CpuThreads holds every thread but its lane at one
STARTUP_THREADS = torch.get_num_threads()

# On the CPU the encoder takes at most this many input pixels per pass: 64 frames of 64x64.
# For the seed-shaped model a batch of 32 clips (512 frames) in one pass peaked at 860 MB of
# RSS against 360-440 MB in slices of 64-128 frames, at the same clips/s or better
# (docs/PERFORMANCE.md); two such batches at once under load kept growing the heap.
PASS_PIXELS = 64 * 64 * 64


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available")
    return device


def pick_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on a CUDA device that supports it, else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def frames_per_encoder_pass(spec: dict[str, Any], pass_pixels: int, device: torch.device, compiled: bool) -> int | None:
    """Most frames per encoder pass for a model with input ``spec`` (None: a whole batch).

    Sliced on the CPU only, so that a batch's activations are those of one slice
    (docs/PERFORMANCE.md); not on CUDA, where wide passes are what the GPU is for, nor
    under torch.compile, whose graphs were measured on whole batches.
    """
    if device.type != "cpu" or compiled or pass_pixels <= 0:
        return None
    return max(1, pass_pixels // (spec["height"] * spec["width"]))


def bucket(clips: int) -> int:
    """The power of two at or above ``clips``: the batch size a CUDA graph is captured for."""
    return 1 << (clips - 1).bit_length()


class CpuThreads:
    """torch's intra-op threads, shared among the CPU forward passes that run at the same time.

    A pass that runs alone gets every thread (lowest latency); two at once (``INSTANCES=2``, or two
    models) get half each, instead of twice as many threads as cores waiting for one another at
    every parallel region.

    With ``wide_lane`` (the default), a pass that gets every thread runs on one thread kept for
    that. libgomp, torch's OpenMP, keeps a team of worker threads for each thread that ever ran a
    parallel region on more than one thread, and once those teams together hold more threads than
    there are cores, its workers stop spinning between parallel regions and sleep instead: on 2
    cores a 2-thread pass of the seed model at batch 1 then ran 1.5x slower (140 against 209
    clips/s, docs/PERFORMANCE.md). Here only the lane ever runs more than one thread, and every
    other thread of the server is held at one (``torch.set_num_threads(1)`` also sets the count
    threads started later take), so on 2 cores the one team stays within the cores. A pass that
    shares runs on its caller's thread, at its share. A pass that would start beside one on the
    lane waits for it instead: a 2-thread team beside a 1-thread pass on 2 cores, its workers
    spinning, cost the server 5% of its clips/s at c=8 and 2.6x its p99 there.

    Without the lane each pass sets its caller's team size just before it starts.
    """

    def __init__(self, total: int, wide_lane: bool = True) -> None:
        self.total = max(1, total)
        self._running = 0  # passes running
        self._waiting = 0  # passes waiting for the one on the lane
        self._wide = False  # a pass runs on the lane
        self._cond = threading.Condition()
        self._lane: ThreadPoolExecutor | None = None
        if wide_lane and self.total > 1:
            self._lane = ThreadPoolExecutor(1, thread_name_prefix="torch-wide", initializer=self._size_lane)
            self._lane.submit(torch.get_num_threads).result()  # started and sized before the others drop to one
            torch.set_num_threads(1)  # this thread, and the default of threads started from now on

    def _size_lane(self) -> None:
        torch.set_num_threads(self.total)
        torch.get_num_threads()  # torch's per-thread lazy set-up, done now: later it would take the default

    @property
    def wide_lane(self) -> bool:
        return self._lane is not None

    @property
    def waiting(self) -> int:
        """Passes waiting for the one on the lane to finish."""
        return self._waiting

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` at this pass's share of the threads: on the lane when it gets them all."""
        if self._lane is None:
            return self._run_here(fn, args)
        with self._cond:
            # a pass on every thread is not joined by another, which would put one thread more than
            # there are cores to work beside its spinning team: wait for it (it is the faster of the two)
            self._waiting += 1
            while self._wide:
                self._cond.wait()
            self._waiting -= 1
            self._running += 1
            wide = self._wide = self._running == 1 and self._waiting == 0
            threads = self.total if wide else max(1, self.total // (self._running + self._waiting))
        try:
            if wide:
                return self._lane.submit(fn, *args).result()
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            return fn(*args)
        finally:
            with self._cond:
                self._running -= 1
                if wide:
                    self._wide = False
                    self._cond.notify_all()

    def _run_here(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._cond:
            self._running += 1
            threads = max(1, self.total // self._running)
        torch.set_num_threads(threads)
        try:
            return fn(*args)
        finally:
            with self._cond:
                self._running -= 1
            # set_num_threads also sets the default of threads started later: leave that at the total
            torch.set_num_threads(self.total)

    def close(self) -> None:
        """Stop the lane; threads started from now on take the whole count again."""
        if self._lane is not None:
            self._lane.shutdown(wait=True)
            self._lane = None
            torch.set_num_threads(self.total)


class Done:
    """A batch whose probabilities are already computed (the CPU path)."""

    def __init__(self, probs: torch.Tensor) -> None:
        self._probs = probs

    def wait(self) -> torch.Tensor:
        return self._probs


class Queued:
    """A batch queued on a CUDA stream; ``wait`` blocks until its probabilities are on the host."""

    def __init__(self, probs: torch.Tensor, done: torch.cuda.Event, keep: torch.Tensor) -> None:
        self._probs, self._done = probs, done
        self._keep: torch.Tensor | None = keep  # the pinned input, alive until its copy has run

    def wait(self) -> torch.Tensor:
        self._done.synchronize()
        self._keep = None
        return self._probs


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    frames: torch.Tensor  # static input (bucket * T, C, H, W) uint8 on the device
    probs: torch.Tensor  # static output (bucket, K) float32 on the device


@dataclass
class ModelRuntime:
    checkpoint: Checkpoint
    device: torch.device
    precision: str = "fp32"  # fp32 or bf16
    cuda_graphs: bool = False
    compiled: bool = False  # the CNN runs through torch.compile (compiled at warm-up)
    threads: CpuThreads | None = None  # the intra-op threads its CPU forward passes share with others
    # on the CPU: most input pixels (frames x height x width) the encoder takes in one pass; 0: no limit
    pass_pixels: int = PASS_PIXELS
    folded: int = field(default=0, init=False)  # batch norms folded into their convs at load
    _graphs: dict[tuple[int, int], _Graph] = field(default_factory=dict, init=False, repr=False)
    _pool: Any = field(default=None, init=False, repr=False)
    _copy_stream: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.device.type != "cuda":
            self.cuda_graphs = False
        else:
            self._copy_stream = torch.cuda.Stream(self.device)
        model = self.checkpoint.model
        # batch norms become part of their convs: one pass less over each block's activations
        self.folded = fold_batchnorm(model.eval())
        model.frames_per_pass = frames_per_encoder_pass(
            self.checkpoint.input, self.pass_pixels, self.device, self.compiled
        )
        if self.compiled:  # the CNN is where the time goes; dynamic: batches vary in frames
            model.encoder = torch.compile(model.encoder, dynamic=True)  # type: ignore[assignment]

    @property
    def frames_per_pass(self) -> int | None:
        """Most frames per encoder pass (None: a batch's frames in one pass)."""
        return self.checkpoint.model.frames_per_pass

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def version(self) -> str:
        return self.checkpoint.version

    @property
    def labels(self) -> list[str]:
        return self.checkpoint.labels

    def limits(self, max_frames: int, max_pixels: int) -> InputLimits:
        spec = self.checkpoint.input
        return InputLimits(spec["height"], spec["width"], spec["channels"], spec["frames"], max_frames, max_pixels)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        # cache_enabled=False: cached weight casts must not outlive a graph capture
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _probs(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.checkpoint.model(frames, lengths)
        return logits.float().softmax(dim=-1)

    @torch.inference_mode()  # on whichever thread runs it: inference mode is per thread
    def _cpu_probs(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self._probs(frames, lengths)

    def infer(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """frames: (N, C, H, W) uint8 of B clips, lengths: (B,) -> probabilities (B, K) float32 on the CPU."""
        return self.launch(frames, lengths).wait()

    @torch.inference_mode()
    def launch(self, frames: torch.Tensor, lengths: torch.Tensor) -> Done | Queued:
        """Start a batch (same arguments as ``infer``); ``.wait()`` on the result gives its probabilities."""
        if self.device.type != "cuda":
            if self.threads is None:
                return Done(self._probs(frames, lengths))
            return Done(self.threads.run(self._cpu_probs, frames, lengths))
        pinned = frames.pin_memory()
        with torch.cuda.device(self.device):
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._copy_stream):
                on_device = pinned.to(self.device, non_blocking=True)
            with torch.cuda.stream(compute):  # explicit: whatever stream a caller left current
                compute.wait_stream(self._copy_stream)
                on_device.record_stream(compute)  # allocated on the copy stream, used on this one
                probs = self._forward_cuda(on_device, lengths)
                out = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
                out.copy_(probs, non_blocking=True)
                done = torch.cuda.Event()
                done.record(compute)
        return Queued(out, done, pinned)

    def _forward_cuda(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        clips = lengths.numel()
        T = int(lengths[0]) if clips else 0
        graph = self._graphs.get((bucket(clips), T)) if self.cuda_graphs and clips else None
        if graph is not None and bool((lengths == T).all()):
            graph.frames[: frames.shape[0]].copy_(frames)  # rows past it: stale clips, answers ignored
            graph.graph.replay()
            return graph.probs[:clips].clone()  # the next replay overwrites the static output
        return self._probs(frames, lengths)

    def _capture(self, clips: int, T: int) -> _Graph:
        """One CUDA graph of the forward pass for ``clips`` clips of ``T`` frames (raises if capture fails)."""
        spec = self.checkpoint.input
        static = torch.zeros(clips * T, spec["height"], spec["width"], spec["channels"], dtype=torch.uint8)
        static = static.permute(0, 3, 1, 2).to(self.device)  # channels-last, as decoded frames arrive
        model = self.checkpoint.model

        def run() -> torch.Tensor:
            with self._autocast():
                return model.forward_uniform(static, clips).float().softmax(dim=-1)

        side = torch.cuda.Stream(self.device)  # warm up and capture off the default stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time: one pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: another model's worker using CUDA meanwhile cannot spoil this capture
        with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
            probs = run()
        return _Graph(graph, static, probs)

    @torch.inference_mode()
    def prepare(self, max_batch_size: int) -> None:
        """Capture the CUDA graphs, before serving: every power-of-two bucket up to ``max_batch_size``
        clips at the model's clip length (other lengths, and ragged batches, run eagerly).

        Capturing only here, never while requests are served, keeps a capture from stalling the
        device or meeting another model's work. A failed capture turns graphs off (logged).
        """
        if not self.cuda_graphs:
            return
        T = self.checkpoint.input["frames"]
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
                    self.cuda_graphs = False
                    self._graphs.clear()
                    return
                size *= 2
        log.info("%s: CUDA graphs captured for %s clips of %d frames", self.name, sorted(c for c, _ in self._graphs), T)

    def warm_up(self, max_frames: int) -> None:
        """Run a few dummy batches so first requests don't pay for lazy initialisation.

        If bf16 fails on this device, fall back to fp32 (logged) rather than fail later.
        """
        spec = self.checkpoint.input
        shapes = ((1, 1), (1, spec["frames"]), (4, min(max_frames, spec["frames"])))
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
        spec = self.checkpoint.input
        frames = torch.zeros(batch * length, spec["channels"], spec["height"], spec["width"], dtype=torch.uint8)
        self.infer(frames, torch.full((batch,), length))

    def describe(self) -> dict[str, Any]:
        meta = self.checkpoint.metadata
        return {
            "name": self.name,
            "version": self.version,
            "labels": self.labels,
            "input": meta["input"],
            "metrics": meta["metrics"],
            "arch": meta["arch"],
            "device": str(self.device),
            "precision": self.precision,
            "cuda_graphs": self.cuda_graphs,
            "compiled": self.compiled,
            "batchnorm_folded": self.folded,
            "frames_per_pass": self.frames_per_pass,
            "created_at": meta["created_at"],
        }


def find_checkpoints(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if not found:
            raise CheckpointError(path, "folder holds no .safetensors checkpoints")
        return found
    return [path]


def load_runtimes(
    path: Path,
    device: torch.device,
    precision: str = "fp32",
    cuda_graphs: bool = False,
    compiled: bool = False,
    pass_pixels: int = PASS_PIXELS,
) -> dict[str, ModelRuntime]:
    """Every checkpoint at ``path`` (a file or a folder), keyed by the name in its metadata."""
    runtimes: dict[str, ModelRuntime] = {}
    for file in find_checkpoints(path):
        ckpt = load_checkpoint(file, device=device)
        if ckpt.name in runtimes:
            raise CheckpointError(
                file, f"model name {ckpt.name!r} is already used by {runtimes[ckpt.name].checkpoint.path}"
            )
        runtime = ModelRuntime(
            ckpt, device, pick_precision(precision, device), cuda_graphs, compiled, pass_pixels=pass_pixels
        )
        runtimes[ckpt.name] = runtime
        log.info("loaded %s v%s from %s on %s (%s)", ckpt.name, ckpt.version, file, device, runtime.precision)
    return runtimes
