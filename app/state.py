"""What the service holds while it runs: models, their batchers, settings, metrics.

Created in the lifespan of the app (``app.state.service``), never at import time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch

from app.api.common import batcher_errors, decode_and_queue, queue_clip
from app.autotune import MAX_SIZE as AUTOTUNE_MAX
from app.autotune import choose_batch_limits
from app.batcher import Batcher, Ticket
from app.decode import InputLimits, share_frames_with, stop_sharing
from app.decoders import ProcessDecoders
from app.errors import not_found, not_ready
from app.metrics import Metrics
from app.runtime import STARTUP_THREADS, CpuThreads, ModelRuntime, load_runtimes, pick_device
from app.settings import Settings
from models.system import HeapRelease, allocator, heap_part, heap_usage, release_free_memory

log = logging.getLogger(__name__)
T = TypeVar("T")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container's cpuset limits it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class ServedModel:
    runtime: ModelRuntime
    batcher: Batcher
    limits: InputLimits
    tuning: dict[str, Any] | None = None  # what autotune measured and chose


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    models: dict[str, ServedModel] = field(default_factory=dict)
    default_model: str = ""
    decode_pool: ThreadPoolExecutor | None = None
    decoders: ProcessDecoders | None = None  # DECODE_PROCESSES > 0
    release: HeapRelease | None = None  # hands free heap memory back (CPU)
    threads: CpuThreads | None = None  # torch's intra-op threads, shared by the CPU forward passes
    ready: bool = False
    draining: bool = False

    def model(self, name: str | None) -> ServedModel:
        name = name or self.default_model
        if name not in self.models:
            raise not_found(f"no model named {name!r}; loaded: {sorted(self.models)}")
        return self.models[name]

    def check_accepting(self) -> None:
        if self.draining:
            raise not_ready("the server is shutting down")
        if not self.ready:
            raise not_ready("the server is not ready yet")

    async def in_pool(self, fn: Any, *args: Any) -> Any:
        """Run CPU-bound work (decoding) on the decode threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    def start_in_pool(self, fn: Any, *args: Any) -> None:
        """Start ``fn`` on the decode threads without waiting for it; ``fn`` reports its own outcome."""
        if self.decode_pool is None:
            raise not_ready("the server is not ready")
        try:
            self.decode_pool.submit(fn, *args)
        except RuntimeError as exc:  # the pool is shut down: the server is stopping
            raise not_ready("the server is shutting down") from exc

    def decode_and_queue(self, batcher: Batcher, tickets: list[Ticket], decode: Any, *args: Any) -> None:
        """Start decoding one clip, ``decode(*args)`` (``app.decode``: pixels (T, H, W, C)), which is queued
        under ``tickets`` when done (or answers them with its failure): on a decode thread, or in a decode
        process when there are some."""
        with batcher_errors():  # 503 past MAX_QUEUE uploads waiting to be decoded
            batcher.reserve(len(tickets))
        decoded = partial(batcher.release, len(tickets))

        def on_thread() -> None:
            try:
                decode_and_queue(batcher, tickets, decode, *args)
            finally:
                decoded()

        def queue(array: Any, exc: BaseException | None) -> None:  # on a thread of the process pool
            try:
                if isinstance(exc, CancelledError):  # withdrawn before a process took it (on_abandon)
                    batcher.abandoned(tickets)  # counts it: dropped, undecoded
                elif exc is None:
                    queue_clip(batcher, tickets, lambda: array)
                else:
                    batcher.fail(tickets, exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            finally:
                decoded()

        try:
            if self.decoders is None:
                self.start_in_pool(on_thread)
            else:  # a job still waiting for a process when its request ends is skipped, as on the threads
                tickets[0].on_abandon = self.decoders.submit(queue, decode, *args).cancel
        except BaseException:
            decoded()
            raise

    def load(self) -> None:
        """Load every checkpoint, warm it up, and start its batcher (blocking; call in a thread)."""
        s = self.settings
        device = pick_device(s.device)
        total = s.torch_threads or STARTUP_THREADS
        torch.set_num_threads(total)
        # one budget for every model's CPU forward passes; made first, so that no thread but its lane
        # (this one included, while it loads) ever runs torch on more than one thread
        self.threads = threads = CpuThreads(total, wide_lane=s.wide_lane and device.type == "cpu")
        runtimes = load_runtimes(s.checkpoint, device, s.precision, s.cuda_graphs, s.compile, s.encoder_pass_pixels)
        # one heap for every model: free memory handed back now and then after answered batches, and once idle
        self.release = release = HeapRelease.for_allocator(s.memory_trim_s if device.type == "cpu" else 0)
        self.metrics.memory_trims.set_function(partial(getattr, release, "trims"))
        log.info("heap allocator: %s", allocator())
        if heap_usage() is not None:  # glibc or jemalloc: what the heap holds, in use against free (fragmentation)
            for i, state in enumerate(("in_use", "free")):
                self.metrics.heap_bytes.labels(state).set_function(partial(heap_part, i))
        for name, runtime in runtimes.items():
            runtime.threads = threads  # used by CPU forward passes only
            if s.warmup:
                runtime.warm_up(s.max_frames)
            # CUDA graphs for every batch bucket the limit can reach, before autotune times the model
            tuned = s.autotune and "max_batch_size" not in s.model_fields_set
            runtime.prepare(AUTOTUNE_MAX if tuned else s.max_batch_size)
            size, frames, tuning = self.batch_limits(runtime)
            batcher = Batcher(
                name,
                runtime.infer,
                # on CUDA the forward is queued, not waited for: copy the next batch meanwhile
                launch=runtime.launch if device.type == "cuda" else None,
                workers=self.instances(device),
                # a second instance starts beside a busy one once a quarter of a batch waits, or at
                # once where the warm-up measured no gain from batching (app.autotune)
                share_from=s.share_from or (tuning["share_from"] if tuning else max(1, size // 4)),
                max_batch_size=size,
                max_batch_frames=frames,
                max_delay_s=s.max_batch_delay_ms / 1000,
                max_queue=s.max_queue,
                timeout_s=s.request_timeout_s,
                decode_timeout_s=s.decode_timeout_s,
                on_batch=self.metrics.batch_observer(name),
                on_drop=self.metrics.drop_observer(name),
                after_batch=release.tick,
            )
            self.models[name] = ServedModel(runtime, batcher, runtime.limits(s.max_frames, s.max_pixels), tuning)
            self.metrics.model_info.labels(
                name, runtime.version, str(device), runtime.checkpoint.model.config.head.name
            ).set(1)
            self.metrics.queue_depth.labels(name).set_function(partial(getattr, batcher, "depth"))
        if s.default_model and s.default_model not in self.models:
            raise ValueError(f"default model {s.default_model!r} is not among the loaded {sorted(self.models)}")
        self.default_model = s.default_model or next(iter(self.models))
        release_free_memory()  # warm-up and autotune's largest batches need not stay resident
        release.start()
        self.decode_pool = ThreadPoolExecutor(s.decode_workers, thread_name_prefix="decode")
        processes = self.decode_processes(device)
        if processes:
            self.decoders = ProcessDecoders(processes)
            log.info("decoding in %d processes: %s", processes, self.decoders.start())
            self.metrics.decoder_restarts.set_function(partial(getattr, self.decoders, "restarts"))
        else:  # large clips decode in two halves on the decode threads (app.decode)
            share_frames_with(self.decode_pool, int(s.decode_split_kb * 1024))
        for served in self.models.values():
            served.batcher.start()

    def instances(self, device: torch.device) -> int:
        """Worker threads per model. On the CPU (default 2 when torch has two or more threads) they share
        torch's threads: a batch alone gets all of them, two at once half each (``CpuThreads``). On CUDA
        one, whose graphs have one set of buffers."""
        asked = self.settings.instances
        if device.type == "cuda":
            if asked is not None and asked > 1:
                log.warning("INSTANCES=%d applies to the CPU; on %s each model runs one worker", asked, device)
            return 1
        if asked is None:
            return 2 if self.threads is not None and self.threads.total >= 2 else 1
        return asked

    def decode_processes(self, device: torch.device) -> int:
        """DECODE_PROCESSES, or by default: on CUDA half the usable cores up to 8, where decoding on threads
        held one H200 server near 170 clips/s and 8 processes reached 3.4-3.7x that; on the CPU none,
        where the model needs the cores (docs/PERFORMANCE.md)."""
        if self.settings.decode_processes is not None:
            return self.settings.decode_processes
        cores = usable_cores()
        return min(8, cores // 2) if device.type == "cuda" and cores >= 4 else 0

    def batch_limits(self, runtime: ModelRuntime) -> tuple[int, int, dict[str, Any] | None]:
        """(clips, frames, tuning report): measured at warm-up unless MAX_BATCH_SIZE was set explicitly.

        A frame limit set explicitly is kept; otherwise it is the clip limit times the clip length.
        """
        s = self.settings
        clip_frames = runtime.checkpoint.input["frames"]
        frames_set = "max_batch_frames" in s.model_fields_set
        if not s.autotune or "max_batch_size" in s.model_fields_set:
            frames = s.max_batch_frames if frames_set or not s.autotune else s.max_batch_size * clip_frames
            return s.max_batch_size, frames, None
        spec = runtime.checkpoint.input
        choice = choose_batch_limits(
            runtime.infer,
            frames=clip_frames,
            shape=(spec["channels"], spec["height"], spec["width"]),
            budget_ms=s.latency_budget_ms,
        )
        frames = s.max_batch_frames if frames_set else choice.max_batch_frames
        log.info("%s: batches of at most %d clips and %d frames", runtime.name, choice.max_batch_size, frames)
        return choice.max_batch_size, frames, choice.to_dict()

    async def close(self) -> None:
        """Stop taking work, answer everything accepted, then release the threads."""
        self.ready = False
        self.metrics.ready.set(0)
        await asyncio.gather(*(m.batcher.close() for m in self.models.values()))
        if self.decode_pool is not None:
            stop_sharing(self.decode_pool)
            self.decode_pool.shutdown(wait=True)
        if self.decoders is not None:
            self.decoders.shutdown()
        if self.release is not None:
            self.release.close()
        if self.threads is not None:
            self.threads.close()
