"""The engine's side: the clip port every front end connects to.

A front end says which it is (``hello``) and is answered with the models it may serve; from then on
it sends clips (in its arena, or in the message), KServe sequences' frames, explanations' uploads,
cancellations of requests whose client left, and its metrics. Each request runs as a task of the
engine's event loop through the same ``Service`` a one-process server uses, so a front end's clips
meet the same bounded queue, deadlines and batches as any other; its answer goes back on the same
connection. A front end that goes away (it exited, or was killed) withdraws its requests: clips not
yet started are dropped before compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from app.batching import Result
from app.frontends import arena, wire
from app.frontends.relay import RELAYED
from app.preprocess import array_to_clip
from app.service import Service
from app.uploads import Upload

log = logging.getLogger(__name__)
Head = dict[str, Any]


def describe(service: Service) -> Head:
    """What a front end needs to know of the models: to check, decode and answer requests for them."""
    models = []
    for served in service.models.values():
        target = served.target
        fmt = target.format
        models.append(
            {
                "name": served.name,
                "version": served.version,
                "labels": served.labels,
                "max_queue": served.max_queue,
                "clip_frames": target.clip_frames,
                "format": {"height": fmt.height, "width": fmt.width, "channels": fmt.channels},
                "limits": {
                    "max_frames": target.limits.max_frames,
                    "max_pixels": target.limits.max_pixels,
                    "max_decoded": target.limits.max_decoded,
                },
            }
        )
    return {
        "models": models,
        "default": service.default_model,
        "draining": service.draining,
        "device_jpeg": service.loaded.decoders.device is not None,  # JPEG frames come undecoded: decoded here
    }


def row_of(r: Result) -> Head:
    return {"p": r.probabilities.tolist(), "q": r.queue_s, "i": r.inference_s, "b": r.batch_size, "f": r.frames}


class ClipPort:
    """A Unix socket at ``path`` that serves front ends; ``arenas`` maps each front end's index to its arena."""

    def __init__(self, service: Service, path: str, arenas: Callable[[int], mmap.mmap]) -> None:
        self.service, self.path, self.arenas = service, path, arenas
        self.connections: set[FrontendConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._connected, path=self.path)

    def drain(self) -> None:
        """Tell every front end that the engine is shutting down: new requests get 503."""
        for connection in self.connections:
            connection.send({"op": "draining"})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.writer.close()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello, _ = await wire.read(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        connection = FrontendConnection(self.service, reader, writer, self.arenas(int(hello["frontend"])))
        self.connections.add(connection)
        connection.send(describe(self.service))
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)


class FrontendConnection:
    """One front end's connection: its requests, each a task, answered by id."""

    def __init__(
        self, service: Service, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, memory: mmap.mmap
    ) -> None:
        self.service, self.reader, self.writer, self.memory = service, reader, writer, memory
        self.gone: dict[int, asyncio.Event] = {}  # requests in hand: set once their client has left
        self.tasks: set[asyncio.Task[None]] = set()
        self.handlers = {"clips": self.clips, "jpegs": self.jpegs, "sequence": self.sequence, "explain": self.explain}

    def send(self, head: Head) -> None:
        if not self.writer.is_closing():
            self.writer.writelines(wire.pack(head))

    async def serve(self) -> None:
        try:
            while True:
                head, payload = await wire.read(self.reader)
                op = head.get("op")
                if op == "cancel":
                    if head["id"] in self.gone:
                        self.gone[head["id"]].set()
                elif op == "observe":
                    self.observe(head["items"], str(head.get("frontend", "")))
                elif op == "sync":
                    self.send({"id": head["id"]})
                elif op in self.handlers:
                    self.gone[head["id"]] = asyncio.Event()
                    task = asyncio.create_task(self.run(self.handlers[op], head, payload))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:  # the front end has gone: so have its clients
            for event in self.gone.values():
                event.set()
            self.writer.close()

    async def run(self, handler: Callable[..., Any], head: Head, payload: bytes) -> None:
        rid = head["id"]
        try:
            reply = {"id": rid, **await handler(head, payload, self.gone[rid].wait)}
        except Exception as exc:
            reply = {"id": rid, "error": wire.error_head(exc)}
        finally:
            self.gone.pop(rid, None)
        self.send(reply)

    def observe(self, items: list[list[Any]], frontend: str) -> None:
        metrics = self.service.metrics
        for name, labels, value in items:
            if name not in RELAYED:
                continue
            if name == "requests":
                metrics.frontend_requests.labels(frontend).inc()
            child = getattr(metrics, name).labels(*labels)
            with contextlib.suppress(Exception):  # a malformed observation is not worth a front end
                (child.inc if name == "requests" else child.observe)(value)

    def frames(self, entry: Head, payload: bytes) -> np.ndarray:
        """A clip's (T, H, W, C) pixels: in the front end's arena, not copied, or in the message."""
        shape = tuple(entry["shape"])
        if "off" in entry:
            return arena.view(self.memory, entry["off"], shape)
        count = int(np.prod(shape))
        at = entry["at"]
        return np.frombuffer(bytearray(payload[at : at + count]), dtype=np.uint8).reshape(shape)  # writable

    async def clips(self, head: Head, payload: bytes, gone: Callable[[], Any]) -> Head:
        served = self.service.model(head["model"])
        clips = [array_to_clip(self.frames(entry, payload)) for entry in head["clips"]]
        results = await self.service.intake.classify_clips(served, clips, gone)
        return {"results": [row_of(r) for r in results]}

    async def jpegs(self, head: Head, payload: bytes, gone: Callable[[], Any]) -> Head:
        """A clip's JPEG frames, undecoded: decoded here on the device (``GPU_DECODE``), on the CPU where the
        device refuses them, holding one of the model's upload places meanwhile."""
        served = self.service.model(head["model"])
        data = self.frames({"shape": [sum(head["sizes"])], **head["where"]}, payload)
        ends = np.cumsum(head["sizes"]).tolist()
        blobs = [data[start:end].tobytes() for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        intake = self.service.intake
        with intake.holding(served):
            clip = await intake.off_loop(self.service.loaded.decoders.decode_images, blobs, served.target)
        if not isinstance(clip, torch.Tensor):
            clip = array_to_clip(clip)
        results = await intake.classify_clips(served, [clip], gone)
        return {"results": [row_of(r) for r in results]}

    async def sequence(self, head: Head, payload: bytes, gone: Callable[[], Any]) -> Head:
        served = self.service.model(head["model"])
        sequence_id, start, end = head["sequence"]
        clip = array_to_clip(self.frames({"shape": head["shape"], "at": 0}, payload))
        probs = await self.service.append_sequence(served, sequence_id, start, end, clip)
        return {"p": probs.tolist()}

    async def explain(self, head: Head, payload: bytes, gone: Callable[[], Any]) -> Head:
        served = self.service.model(head["model"])
        upload = Upload(head["kind"], payload, head["type"], head["frames"])
        explained = await self.service.explain(served, upload, gone)
        ex = explained.explanation
        return {
            "p": ex.probabilities.tolist(),
            "importance": ex.importance.tolist(),
            "attention": None if ex.attention is None else ex.attention.tolist(),
            "frames": explained.frames,
            "decode_s": explained.decode_s,
            "inference_s": explained.inference_s,
        }
