"""A front end's side: its link to the engine, and the service its classifying routes see.

``RemoteService`` stands where ``app.service.Service`` stands in one process, for the routes that
classify (``/predict``, ``/v2/.../infer``): an upload is decoded here, on this process's decode
threads, under this process's share of ``MAX_QUEUE`` uploads waiting to be decoded and within
``DECODE_TIMEOUT_S``; the clip is written into the arena and sent to the engine, which queues it
beside every other front end's clips and answers with its probabilities. A client that leaves
withdraws its clip from the engine's queue, as in one process. Explanations and KServe sequences are
run by the engine too (the upload, or the frames, sent along).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from app.batching import Result
from app.decoding import Decoders
from app.errors import ClientGone, DecoderFailed, NotFound, NotReady, TimedOut
from app.explain import Explained
from app.frontends import arena, wire
from app.gpu_decode import GpuJpeg
from app.intake import Answer, Disconnected, Slots
from app.settings import Settings
from app.uploads import Target, Upload, parse_upload
from media import FrameFormat, Limits
from models.explain import Explanation

T = TypeVar("T")
log = logging.getLogger(__name__)
Head = dict[str, Any]


@dataclass(frozen=True)
class RemoteModel:
    """A model the engine serves, as a front end knows it (from the engine's hello)."""

    name: str
    version: str
    labels: list[str]
    target: Target
    max_queue: int

    @classmethod
    def of(cls, head: Head) -> RemoteModel:
        target = Target(FrameFormat(**head["format"]), head["clip_frames"], Limits(**head["limits"]))
        return cls(head["name"], head["version"], head["labels"], target, head["max_queue"])


class EngineLink:
    """One connection to the engine's clip port: requests by id, answered in any order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, memory: mmap.mmap) -> None:
        self.reader, self.writer, self.memory = reader, writer, memory
        self.blocks = arena.Blocks(len(memory))
        self.draining = False  # the engine has begun to shut down: new requests get 503
        self.device_jpeg = False  # the engine decodes JPEG frames on its device: they are sent undecoded
        self.closed = asyncio.Event()
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[tuple[Head, bytes]]] = {}
        self._reading: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: str, index: int, memory: mmap.mmap) -> tuple[EngineLink, Head]:
        reader, writer = await asyncio.open_unix_connection(path)
        link = cls(reader, writer, memory)
        writer.writelines(wire.pack({"op": "hello", "frontend": index}))
        hello, _ = await wire.read(reader)
        link.draining = hello.get("draining", False)
        link.device_jpeg = hello.get("device_jpeg", False)
        link._reading = asyncio.create_task(link._read())
        return link, hello

    def send(self, head: Head, payload: bytes | memoryview = b"") -> None:
        if self.writer.is_closing():
            raise NotReady("the engine has stopped")
        self.writer.writelines(wire.pack(head, payload))

    def request(self, head: Head, payload: bytes | memoryview = b"") -> Pending:
        """Send ``head`` under a new id; its answer comes in the returned ``Pending``."""
        rid = next(self._ids)
        future: asyncio.Future[tuple[Head, bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            self.send({**head, "id": rid}, payload)
        except BaseException:
            del self._waiting[rid]
            raise
        return Pending(self, rid, future)

    async def sync(self) -> None:
        """Once the engine has taken every message sent before (metrics observed, say)."""
        await self.request({"op": "sync"}).answer()

    async def _read(self) -> None:
        try:
            while True:
                head, payload = await wire.read(self.reader)
                if head.get("op") == "draining":
                    self.draining = True
                    continue
                future = self._waiting.pop(head["id"], None)
                if future is not None and not future.done():
                    future.set_result((head, payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("the engine closed its link; this front end stops")
        finally:
            gone = {"error": {"type": "NotReady", "message": "the engine has stopped"}}
            for future in self._waiting.values():
                if not future.done():
                    future.set_result((gone, b""))
            self._waiting.clear()
            self.writer.close()
            self.closed.set()

    async def close(self) -> None:
        self.writer.close()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)


@dataclass
class Pending:
    """A request sent to the engine, and the future of its answer."""

    link: EngineLink
    id: int
    future: asyncio.Future[tuple[Head, bytes]]

    async def answer(self, watcher: asyncio.Future[Any] | None = None) -> Head:
        """The engine's answer (an error answer raised as its domain error); ``ClientGone`` once ``watcher``
        (the client leaving) completes first: the engine is told, and drops what has not started."""
        if watcher is not None:
            done, _ = await asyncio.wait((self.future, watcher), return_when=asyncio.FIRST_COMPLETED)
            if self.future not in done:
                with contextlib.suppress(NotReady):
                    self.link.send({"op": "cancel", "id": self.id})
                raise ClientGone()
        head, _ = await self.future
        if "error" in head:
            wire.raise_error(head["error"])
        return head


def result_of(row: Head) -> Result:
    return Result(torch.tensor(row["p"], dtype=torch.float32), row["q"], row["i"], row["b"], row["f"])


class RemoteIntake:
    """The intake of a front end: decode here, queue in the engine."""

    def __init__(self, link: EngineLink, decoders: Decoders, models: dict[str, RemoteModel], settings: Settings):
        self.link, self.decoders, self.decode_timeout_s = link, decoders, settings.decode_timeout_s
        share = settings.frontends  # MAX_QUEUE uploads waiting to be decoded is the server's, shared out
        self._slots = {name: Slots(name, -(-model.max_queue // share)) for name, model in models.items()}

    async def classify(self, served: RemoteModel, upload: Upload, disconnected: Disconnected) -> Answer:
        """Decode ``upload`` on this process's decode threads, then have the engine classify the clip."""
        watcher = asyncio.ensure_future(disconnected())
        try:
            blobs = await self._for_device(served, upload) if self.link.device_jpeg else None
            if blobs is not None:
                queued_at = time.perf_counter()
                [result] = await self._send_jpegs(served, blobs, watcher)
                return Answer(result, queued_at)
            array = await self._decode(served, upload, watcher)
            queued_at = time.perf_counter()
            [result] = await self._classify(served, [array], watcher)
            return Answer(result, queued_at)
        finally:
            watcher.cancel()

    async def _for_device(self, served: RemoteModel, upload: Upload) -> list[bytes] | None:
        """The upload's JPEG frames, parsed here, when the engine's device takes every one of them; None: the
        upload is decoded here (parsed again, on the CPU path)."""
        parsed = await self.decoders.run(parse_upload, upload, served.target)
        images, target = parsed.images, served.target
        if images is None or not 0 < len(images) <= target.limits.max_frames:
            return None
        return images if all(GpuJpeg.eligible(blob, target) for blob in images) else None

    async def _send_jpegs(self, served: RemoteModel, blobs: list[bytes], watcher: asyncio.Future[Any]) -> list[Result]:
        """JPEG frames into one block of the arena (or the message), for the engine to decode on its device."""
        data = b"".join(blobs)
        offset = self.link.blocks.take(len(data))
        where: Head = {"at": 0} if offset is None else {"off": offset}
        if offset is not None:
            arena.view(self.link.memory, offset, (len(data),))[...] = np.frombuffer(data, dtype=np.uint8)
        head = {"op": "jpegs", "model": served.name, "sizes": [len(b) for b in blobs], "where": where}
        try:
            pending = self.link.request(head, data if offset is None else b"")
        except BaseException:
            if offset is not None:
                self.link.blocks.give_back(offset)
            raise
        if offset is not None:
            pending.future.add_done_callback(lambda _: self.link.blocks.give_back(offset))
        answered = await pending.answer(watcher)
        return [result_of(row) for row in answered["results"]]

    async def classify_clips(
        self, served: RemoteModel, clips: list[torch.Tensor], disconnected: Disconnected
    ) -> list[Result]:
        """Clips (T, C, H, W) decoded already (KServe tensors): classified by the engine, all or none."""
        watcher = asyncio.ensure_future(disconnected())
        try:
            return await self._classify(served, [clip.permute(0, 2, 3, 1).numpy() for clip in clips], watcher)
        finally:
            watcher.cancel()

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.decoders.run(fn, *args)

    async def _decode(self, served: RemoteModel, upload: Upload, watcher: asyncio.Future[Any]) -> np.ndarray:
        """The upload's clip (T, H, W, C), decoded within DECODE_TIMEOUT_S while the client stays."""
        slots, loop = self._slots[served.name], asyncio.get_running_loop()
        slots.reserve(1)
        decoded: asyncio.Future[np.ndarray] = loop.create_future()
        stop = threading.Event()

        def done(array: Any, exc: BaseException | None) -> None:  # on a decode thread
            slots.release(1)
            if isinstance(exc, CancelledError):
                exc = DecoderFailed("the decode of this upload was stopped; try again")
            loop.call_soon_threadsafe(_settle, decoded, array, exc)

        try:
            cancel = self.decoders.decode(upload, served.target, done, stop.is_set)
        except BaseException:
            slots.release(1)
            raise
        timeout = self.decode_timeout_s
        finished, _ = await asyncio.wait((decoded, watcher), timeout=timeout, return_when="FIRST_COMPLETED")
        if decoded not in finished:
            stop.set()
            if cancel is not None:
                cancel()
            decoded.add_done_callback(_retrieve)
            raise ClientGone() if watcher in finished else TimedOut(f"not decoded within {self.decode_timeout_s:g} s")
        return decoded.result()

    async def _classify(
        self, served: RemoteModel, arrays: list[np.ndarray], watcher: asyncio.Future[Any]
    ) -> list[Result]:
        """Each clip (T, H, W, C) into a block of the arena (or, where it has no room, into the message), sent
        to the engine; the blocks are this front end's again once the engine has answered."""
        blocks = self.link.blocks
        entries: list[Head] = []
        inline: list[bytes] = []
        taken: list[int] = []
        try:
            for array in arrays:
                offset = blocks.take(array.nbytes)
                if offset is None:
                    entries.append({"shape": list(array.shape), "at": sum(len(b) for b in inline)})
                    inline.append(np.ascontiguousarray(array).tobytes())
                    continue
                taken.append(offset)
                arena.view(self.link.memory, offset, array.shape)[...] = array
                entries.append({"shape": list(array.shape), "off": offset})
            pending = self.link.request({"op": "clips", "model": served.name, "clips": entries}, b"".join(inline))
        except BaseException:
            for offset in taken:
                blocks.give_back(offset)
            raise
        pending.future.add_done_callback(lambda _: blocks.give_back_all(taken))
        head = await pending.answer(watcher)
        return [result_of(row) for row in head["results"]]


def _settle(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass
class RemoteService:
    """``app.service.Serving`` in a front end: the models the engine serves, reached through the link."""

    settings: Settings
    metrics: Any  # app.frontends.relay.RelayedMetrics: observations sent on to the engine's registry
    link: EngineLink
    models: dict[str, RemoteModel]
    default_model: str
    decoders: Decoders  # this front end's decode threads
    intake: RemoteIntake = field(init=False)

    def __post_init__(self) -> None:
        self.intake = RemoteIntake(self.link, self.decoders, self.models, self.settings)

    def check_accepting(self) -> None:
        if self.link.draining or self.link.closed.is_set():
            raise NotReady("the server is shutting down")

    def model(self, name: str | None) -> RemoteModel:
        name = name or self.default_model
        if name not in self.models:
            raise NotFound(f"no model named {name!r}; loaded: {sorted(self.models)}")
        return self.models[name]

    async def append_sequence(
        self, served: RemoteModel, sequence_id: Hashable, start: bool, end: bool, clip: torch.Tensor
    ) -> np.ndarray:
        """Frames of a KServe sequence, stepped by the engine (which holds every sequence's state)."""
        frames = np.ascontiguousarray(clip.permute(0, 2, 3, 1).numpy())
        head = {"op": "sequence", "model": served.name, "sequence": [sequence_id, start, end]}
        head["shape"] = list(frames.shape)
        answered = await self.link.request(head, frames.tobytes()).answer()
        return np.asarray(answered["p"], dtype=np.float32)

    async def explain(self, served: RemoteModel, upload: Upload, disconnected: Disconnected) -> Explained:
        """An explanation, run by the engine on the upload as read (it decodes and explains it there)."""
        head = {"op": "explain", "model": served.name, "kind": upload.kind, "type": upload.content_type}
        watcher = asyncio.ensure_future(disconnected())
        try:
            answered = await self.link.request({**head, "frames": upload.frames}, upload.data).answer(watcher)
        finally:
            watcher.cancel()
        attention = answered["attention"]
        explanation = Explanation(
            torch.tensor(answered["p"]),
            torch.tensor(answered["importance"]),
            None if attention is None else torch.tensor(attention),
        )
        return Explained(explanation, answered["frames"], answered["decode_s"], answered["inference_s"])
