"""Where uploads are decoded, off the event loop: on the decode threads (a large clip split over
two of them), or in decode processes (``DECODE_PROCESSES``, ``app.processes``).

A decode is asked between frames whether it is still wanted, and stops once its request has timed
out or its client has left. On the threads, videos (the long decodes) take at most all threads but
one at a time: the others wait in line without holding a thread, so images keep a thread to decode
on however many videos arrive.

With a device decoder (``app.gpu_decode.GpuJpeg``, when the model runs on CUDA), every upload is
parsed on a thread first: one whose frames are all JPEGs the device takes is decoded there, and its
clip is a tensor (T, C, H, W) on the device; any other (another format, a frame the device refuses,
a device decode that fails) is decoded on the CPU as without one, in the decode processes where
there are any. Videos go to a device video decoder where there is one (``app.gpu_decode.GpuVideo``),
on the threads. The first failure on the device is logged; the upload then decodes on the CPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from app.errors import NotReady
from app.processes import ProcessDecoders, decode_flagged
from app.uploads import FrameSplitter, Parsed, Target, Upload, decode_parsed, image_frames, parse_upload
from host.threads import name_os_thread
from media import Stopped

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
log = logging.getLogger(__name__)
# a clip: uint8 (T, H, W, C) on the host, or (T, C, H, W) on the model's device (a device decoder's)
Done = Callable[["np.ndarray | torch.Tensor | None", "BaseException | None"], None]
Work = Callable[[], None]


class DeviceDecoder(Protocol):
    """Decodes an upload's frames on the model's device (``app.gpu_decode.GpuJpeg``)."""

    def eligible(self, blob: bytes, target: Target) -> bool: ...

    def decode(self, blobs: list[bytes], target: Target) -> torch.Tensor: ...


class DeviceVideo(Protocol):
    """Decodes a video on the model's device (``app.gpu_decode.GpuVideo``)."""

    def decode(self, data: bytes, target: Target, frames: int | None = None) -> torch.Tensor: ...


class Handoff:
    """What withdraws a job that a decode thread hands to a decode process after parsing it. A withdrawal
    that comes before the handoff is kept and applied then."""

    def __init__(self) -> None:
        self._withdraw: Callable[[], object] | None = None
        self._withdrawn = False
        self._lock = threading.Lock()

    def handed(self, withdraw: Callable[[], object]) -> None:
        with self._lock:
            self._withdraw, late = withdraw, self._withdrawn
        if late:
            withdraw()

    def __call__(self) -> None:
        with self._lock:
            self._withdrawn, withdraw = True, self._withdraw
        if withdraw is not None:
            withdraw()


class VideoShare:
    """At most ``limit`` video decodes at once; the rest wait in line, each run by the thread of a video
    decode that finishes."""

    def __init__(self, limit: int) -> None:
        self.limit, self.running = limit, 0
        self.waiting: deque[Work] = deque()
        self._lock = threading.Lock()

    def admit(self, work: Work) -> bool:
        """True when ``work`` may run now; else it waits in line."""
        with self._lock:
            if self.running < self.limit:
                self.running += 1
                return True
            self.waiting.append(work)
            return False

    def run(self, work: Work) -> None:
        """Run ``work``, then each video that waits, on this thread."""
        next_work: Work | None = work
        while next_work is not None:
            next_work()
            with self._lock:
                next_work = self.waiting.popleft() if self.waiting else None
                if next_work is None:
                    self.running -= 1


class Decoders:
    def __init__(
        self,
        threads: int,
        processes: int = 0,
        split_bytes: int = 0,
        device: DeviceDecoder | None = None,
        video: DeviceVideo | None = None,
    ) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode", initializer=name_os_thread)
        self.device, self.video = device, video
        self.device_failed = False  # a device decode has failed (logged once)
        self.processes = ProcessDecoders(processes) if processes else None
        # a decode process never splits a clip: the split is over this process's threads
        self.splitter = FrameSplitter(self.pool, split_bytes) if split_bytes > 0 and not processes else None
        self.videos = VideoShare(max(1, threads - 1))

    @property
    def restarts(self) -> int:
        """Times the decode processes were replaced after one died."""
        return self.processes.restarts if self.processes is not None else 0

    def start(self) -> list[int]:
        """Start the decode processes, if any, before the first request; their pids."""
        return self.processes.start() if self.processes is not None else []

    def decode(
        self, upload: Upload, target: Target, done: Done, skip: Callable[[], bool]
    ) -> Callable[[], object] | None:
        """Decode ``upload`` for ``target``; then ``done(array, None)`` or ``done(None, exc)`` once, on a
        decode thread or on a thread of the process pool. ``skip()`` is true once the request has ended:
        a job not started then is not decoded, one running stops between frames, and ``done`` gets a
        ``CancelledError``. Returns what withdraws a job from a decode process. With a device decoder,
        the clip may be a tensor on the device (T, C, H, W) instead of an array (T, H, W, C)."""
        if self.processes is not None and self.device is None and self.video is None:
            return self._in_process(upload, target, done)
        handoff = Handoff() if self.processes is not None else None
        try:
            self.pool.submit(self._parse, upload, target, done, skip, handoff)
        except RuntimeError as exc:  # the pool is shut down: the server is stopping
            raise NotReady("the server is shutting down") from exc
        return handoff

    def _parse(
        self, upload: Upload, target: Target, done: Done, skip: Callable[[], bool], handoff: Handoff | None = None
    ) -> None:
        if skip():
            done(None, CancelledError())
            return
        try:
            parsed = parse_upload(upload, target)
        except Exception as exc:
            done(None, exc)
            return
        if parsed.images is not None and self.device is not None:
            clip = self._on_device(parsed.images, target)
            if clip is not None:
                done(clip, None)
                return
        if handoff is not None and (parsed.video is None or self.video is None):  # a CPU decode: in a process
            handoff.handed(self._in_process(upload, target, done))
            return
        work = partial(self._decode, parsed, target, done, skip)
        if parsed.video is None:
            work()
        elif self.videos.admit(work):
            self.videos.run(work)

    def _decode(self, parsed: Parsed, target: Target, done: Done, skip: Callable[[], bool]) -> None:
        try:
            if skip():
                raise Stopped("the decode is no longer wanted")
            array: np.ndarray | torch.Tensor | None = self._video_on_device(parsed, target)
            if array is None:
                array = decode_parsed(parsed, target, self.splitter, skip)
        except Stopped:
            done(None, CancelledError())
        except Exception as exc:
            done(None, exc)
        else:
            done(array, None)

    def _on_device(self, blobs: list[bytes], target: Target) -> torch.Tensor | None:
        """The clip of ``blobs`` decoded on the device; None when a frame is not for the device (or the
        count is wrong: the CPU path says so) or the device decode fails."""
        device = self.device
        if device is None or not 0 < len(blobs) <= target.limits.max_frames:
            return None
        if not all(device.eligible(blob, target) for blob in blobs):
            return None
        try:
            return device.decode(blobs, target)
        except Exception as exc:  # the upload decodes on the CPU instead
            if not self.device_failed:
                self.device_failed = True
                log.warning("decoding JPEG frames on the device failed (%s); such uploads decode on the CPU", exc)
            return None

    def decode_images(self, blobs: list[bytes], target: Target) -> np.ndarray | torch.Tensor:
        """Encoded frames -> their clip, on the device where it takes them, else on the CPU (blocking: on a
        decode thread). A front end sends the engine JPEG frames the device takes (``app.frontends``)."""
        clip = self._on_device(blobs, target)
        return clip if clip is not None else image_frames(blobs, target, self.splitter)

    def _video_on_device(self, parsed: Parsed, target: Target) -> torch.Tensor | None:
        """A video decoded on the device, or None (no device video decoder, or it failed: logged once)."""
        if self.video is None or parsed.video is None:
            return None
        try:
            return self.video.decode(parsed.video, target, parsed.frames)
        except Exception as exc:  # decoded on the CPU instead
            if not self.device_failed:
                self.device_failed = True
                log.warning("decoding a video on the device failed (%s); it decodes on the CPU", exc)
            return None

    def _in_process(self, upload: Upload, target: Target, done: Done) -> Callable[[], object]:
        assert self.processes is not None
        flags = self.processes.flags
        held = flags.take()

        def finished(array: np.ndarray | None, exc: BaseException | None) -> None:
            flags.give_back(held)
            if isinstance(exc, Stopped):
                exc = CancelledError()
            done(array, exc)

        future = self.processes.submit(finished, decode_flagged, held[0] if held else None, upload, target)

        def withdraw() -> None:
            future.cancel()  # still waiting for a process: skipped
            flags.set(held)  # running: it stops at its next frame

        return withdraw

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a decode thread: CPU-bound work kept off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def shutdown(self) -> None:
        """Finish the jobs in hand, then stop the threads and processes."""
        self.pool.shutdown(wait=True)
        if self.processes is not None:
            self.processes.shutdown()
