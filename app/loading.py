"""Everything the service loads before it is ready: checkpoints onto the device, warm-up, CUDA
graphs, measured batch limits, one batcher per model, the decode threads or processes, and the
heap's housekeeping. ``load`` returns it all started; ``Loaded.close`` stops it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from app.autotune import MAX_SIZE as AUTOTUNE_MAX
from app.autotune import choose_batch_limits
from app.batching import Batcher, BatchPolicy
from app.decoding import Decoders
from app.gpu_decode import GpuJpeg, GpuVideo
from app.memory import HeapRelease
from app.metrics import Metrics
from app.runtime import ModelRuntime, pick_precision
from app.served import ServedModel
from app.settings import Settings
from app.streams import Stepper
from app.threads import STARTUP_THREADS, CpuThreads
from app.uploads import Target
from host.device import pick_device
from host.malloc import allocator, heap_part, heap_usage, release_free_memory
from media import FrameFormat, Limits
from models import CheckpointError, default_checkpoint, load_checkpoint

log = logging.getLogger(__name__)
STEP_BUDGET_MS = 50.0  # the longest step batch autotune keeps: half of a stream frame's 100 ms


@dataclass
class Loaded:
    models: dict[str, ServedModel]
    default_model: str
    decoders: Decoders
    threads: CpuThreads  # torch's intra-op threads, shared by every model's CPU passes
    release: HeapRelease  # hands free heap memory back (CPU)

    def close(self) -> None:
        """After the batchers have answered everything: stop the steppers, the decoders, the heap's thread,
        the lane."""
        for served in self.models.values():
            served.stepper.close()
        self.decoders.shutdown()
        self.release.close()
        self.threads.close()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container's cpuset limits it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def find_checkpoints(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if not found:
            raise CheckpointError(path, "folder holds no .safetensors checkpoints")
        return found
    return [path]


def load(settings: Settings, metrics: Metrics) -> Loaded:
    """Load, warm up and start every model at ``CHECKPOINT`` (blocking; call it on a thread)."""
    s = settings
    device = pick_device(s.device)
    total = s.torch_threads or STARTUP_THREADS
    torch.set_num_threads(total)
    # made first, so that no thread but its lane (this one included, while it loads) runs torch wide
    threads = CpuThreads(total, wide_lane=s.wide_lane and device.type == "cpu")
    release = HeapRelease.for_allocator(s.memory_trim_s if device.type == "cpu" else 0)
    watch_heap(metrics, release)
    models: dict[str, ServedModel] = {}
    for runtime in load_runtimes(s, device, threads):
        models[runtime.name] = serve(runtime, s, metrics, release, instances(s, device, threads))
    if s.default_model and s.default_model not in models:
        raise ValueError(f"default model {s.default_model!r} is not among the loaded {sorted(models)}")
    release_free_memory()  # warm-up and autotune's largest batches need not stay resident
    release.start()
    decoders = start_decoders(s, device, metrics)
    for served in models.values():
        served.batcher.start()
        served.stepper.start()
    return Loaded(models, s.default_model or next(iter(models)), decoders, threads, release)


def load_runtimes(s: Settings, device: torch.device, threads: CpuThreads) -> list[ModelRuntime]:
    """Every checkpoint at ``CHECKPOINT`` (a file or a folder), each name once."""
    runtimes: dict[str, ModelRuntime] = {}
    for file in find_checkpoints(s.checkpoint or default_checkpoint()):
        ckpt = load_checkpoint(file, device=device)
        if ckpt.name in runtimes:
            raise CheckpointError(
                file, f"model name {ckpt.name!r} is already used by {runtimes[ckpt.name].checkpoint.path}"
            )
        runtime = ModelRuntime(
            ckpt,
            device,
            precision=pick_precision(s.precision, device),
            cuda_graphs=s.cuda_graphs,
            compiled=s.compile,
            threads=threads,
            pass_pixels=s.encoder_pass_pixels,
        )
        runtimes[ckpt.name] = runtime
        log.info("loaded %s v%s from %s on %s (%s)", ckpt.name, ckpt.version, file, device, runtime.precision)
    return list(runtimes.values())


def serve(runtime: ModelRuntime, s: Settings, metrics: Metrics, release: HeapRelease, workers: int) -> ServedModel:
    """Warm ``runtime`` up, capture its graphs, measure its batch limits, and give it a batcher."""
    if s.warmup:
        runtime.warm_up(s.max_frames)
    tuned = s.autotune and not s.is_set("max_batch_size")
    runtime.prepare(AUTOTUNE_MAX if tuned else s.max_batch_size)  # graphs for every bucket the limit can reach
    size, frames, tuning = batch_limits(runtime, s)
    policy = BatchPolicy(
        max_batch_size=size,
        max_batch_frames=frames,
        max_queue=s.max_queue,
        timeout_s=s.request_timeout_s,
        max_delay_s=s.max_batch_delay_ms / 1000,
        instances=workers,
        # a second instance joins a busy one once a quarter of a batch waits, or at once where the
        # warm-up measured no gain from batching (app.autotune)
        share_from=s.share_from or (tuning["share_from"] if tuning else max(1, size // 4)),
    )
    name = runtime.name
    batcher = Batcher(
        name,
        runtime.run,
        policy,
        on_batch=metrics.batch_observer(name),
        on_drop=metrics.drop_observer(name),
        after_batch=release.tick,
        stage=runtime.stage,
    )
    metrics.model_info.labels(
        name, runtime.version, str(runtime.device), runtime.checkpoint.model.config.head.name
    ).set(1)
    metrics.queue_depth.labels(name).set_function(partial(getattr, batcher, "depth"))
    limits = Limits(max_frames=s.max_frames, max_pixels=s.max_pixels, max_decoded=s.max_decoded_frames)
    stepper = Stepper(runtime, s.stream_max_batch, on_batch=metrics.step_observer(name), after_batch=release.tick)
    tune_steps(stepper, s)
    target = Target(FrameFormat.of(runtime.spec), runtime.spec.frames, limits)
    return ServedModel(runtime, batcher, target, stepper, tuning)


def tune_steps(stepper: Stepper, s: Settings) -> None:
    """Measure step batches of 1, 2, 4, ... frames up to STREAM_MAX_BATCH (unless it was set) and keep the
    largest within 20% of the best frames/s and within ``STEP_BUDGET_MS``: past a size, a step batch's
    frames/s falls (its activations outgrow the caches), so the cap is measured, as the clip batches' is."""
    if not s.autotune or s.is_set("stream_max_batch"):
        return
    spec = stepper.runtime.spec
    choice = choose_batch_limits(
        stepper.probe,
        frames=1,
        shape=(spec.channels, spec.height, spec.width),
        budget_ms=STEP_BUDGET_MS,
        max_size=s.stream_max_batch,
    )
    stepper.max_batch, stepper.tuning = choice.max_batch_size, choice.to_dict()
    log.info("%s: step batches of at most %d frames", stepper.runtime.name, stepper.max_batch)


def batch_limits(runtime: ModelRuntime, s: Settings) -> tuple[int, int, dict[str, Any] | None]:
    """(clips, frames, tuning report): measured at warm-up unless MAX_BATCH_SIZE was set. A frame limit
    set explicitly is kept; otherwise it is the clip limit times the clip length."""
    spec = runtime.spec
    if not s.autotune or s.is_set("max_batch_size"):
        frames = (
            s.max_batch_frames if s.is_set("max_batch_frames") or not s.autotune else s.max_batch_size * spec.frames
        )
        return s.max_batch_size, frames, None
    choice = choose_batch_limits(
        lambda f, n: runtime.run(f, n).result(),
        frames=spec.frames,
        shape=(spec.channels, spec.height, spec.width),
        budget_ms=s.latency_budget_ms,
    )
    frames = s.max_batch_frames if s.is_set("max_batch_frames") else choice.max_batch_frames
    log.info("%s: batches of at most %d clips and %d frames", runtime.name, choice.max_batch_size, frames)
    return choice.max_batch_size, frames, choice.to_dict()


def instances(s: Settings, device: torch.device, threads: CpuThreads) -> int:
    """Worker threads per model. On the CPU (default 2 when torch has two or more threads) they share
    torch's threads; on CUDA one, whose graphs have one set of buffers."""
    if device.type == "cuda":
        if s.instances is not None and s.instances > 1:
            log.warning("INSTANCES=%d applies to the CPU; on %s each model runs one worker", s.instances, device)
        return 1
    if s.instances is None:
        return 2 if threads.total >= 2 else 1
    return s.instances


def decode_processes(s: Settings, device: torch.device) -> int:
    """DECODE_PROCESSES, or by default: on CUDA half the usable cores up to 8, where one process's
    interpreter cannot feed the GPU; on the CPU none, where the model needs the cores; none in the engine
    of front ends (FRONTENDS), which decode themselves."""
    if s.decode_processes is not None:
        return s.decode_processes
    if s.frontends > 1:  # the front ends decode the uploads: the engine decodes only what they hand it whole
        return 0
    cores = usable_cores()
    return min(8, cores // 2) if device.type == "cuda" and cores >= 4 else 0


def device_decoder(s: Settings, device: torch.device) -> GpuJpeg | None:
    """The JPEG decoder on the model's device (nvJPEG), when the model runs on CUDA, ``GPU_DECODE`` is on
    and torchvision can decode there; None otherwise, with the reason logged."""
    if device.type != "cuda":
        return None
    if not s.gpu_decode:
        log.info("JPEG frames decode on the CPU: GPU_DECODE is off")
        return None
    reason = GpuJpeg.unavailable(device)
    if reason is not None:
        log.warning("JPEG frames decode on the CPU: %s", reason)
        return None
    log.info("JPEG frames decode on %s (nvJPEG); other images and videos on the CPU", device)
    return GpuJpeg(device)


def device_video(s: Settings, device: torch.device) -> GpuVideo | None:
    """The video decoder on the model's device (NVDEC through torchcodec), where torchcodec imports."""
    if device.type != "cuda" or not s.gpu_decode:
        return None
    reason = GpuVideo.unavailable(device)
    if reason is not None:
        log.info("videos decode on the CPU (PyAV): %s", reason)
        return None
    log.info("videos decode on %s (torchcodec, NVDEC)", device)
    return GpuVideo(device)


def start_decoders(s: Settings, device: torch.device, metrics: Metrics) -> Decoders:
    processes = decode_processes(s, device)
    decoders = Decoders(
        s.decode_workers,
        processes,
        int(s.decode_split_kb * 1024),
        device=device_decoder(s, device),
        video=device_video(s, device),
    )
    if processes:
        log.info("decoding in %d processes: %s", processes, decoders.start())
    metrics.decoder_restarts.set_function(partial(getattr, decoders, "restarts"))
    return decoders


def watch_heap(metrics: Metrics, release: HeapRelease) -> None:
    """The heap's gauges: trims handed back, and (glibc or jemalloc) bytes in use against free."""
    metrics.memory_trims.set_function(partial(getattr, release, "trims"))
    log.info("heap allocator: %s", allocator())
    if heap_usage() is not None:
        for i, state in enumerate(("in_use", "free")):
            metrics.heap_bytes.labels(state).set_function(partial(heap_part, i))
