"""``WS /stream`` and ``WS /models/{name}/stream``: frames in, one answer per frame out.

The client sends each frame as one binary message (an encoded image), in order, and JSON controls
as text (``{"reset": true}``, ``{"every": N}``, ``{"top_k": K}``). Frame i (counted from 0 since the
start or the last reset) is answered with ``{"frame": i, "label", "probabilities", "top_k",
"timing_ms"}``, or ``{"frame": i, "error": {"code", "message"}}`` when it cannot be decoded; the
stream goes on either way. docs/streams.md has the whole contract.

A stream is read and answered on two tasks: the reader decodes each frame on a decode thread and
hands it to its model's stepper (``app.streams``); the writer sends the answers in order. At most
``STREAM_QUEUE`` frames are unanswered: past them the reader stops reading, so the socket's flow
control slows a fast sender instead of frames being dropped. Close codes: 1000 idle
(``STREAM_IDLE_S``), 1001 server shutting down (after every frame received is answered), 1008 a
missing or wrong API key or an unknown model, 1013 too many streams or not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import reprlib
import secrets
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from app.api.connections import CLOSING
from app.api.errors import status_of
from app.errors import BadInput, NotFound, Overloaded, TooLarge
from app.served import ServedModel
from app.service import Service
from app.streams import Step, Stepped, Stream
from media import decode_image

log = logging.getLogger(__name__)

router = APIRouter(tags=["streams"])

SUBPROTOCOL = "fusionserve"  # offered by browsers, with "bearer.<key>" when a key is needed
KEY_PREFIX = "bearer."
CONTROLS = {"reset", "every", "top_k"}
UNREAD = "answers not read"
MAX_CONTROL = 4096  # characters of a text message
FLUSH_S = 10.0  # at most this long to write the answers of a closing stream (a client may not read them)


class Refused(Exception):
    """The stream cannot be served: closed with ``code`` and ``reason`` once accepted."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, clip_reason(reason)


def clip_reason(reason: str) -> str:
    """A close frame's reason: at most 123 bytes of UTF-8."""
    return reason.encode()[:120].decode(errors="ignore")


@dataclass
class Options:
    top_k: int = 5
    every: int = 1

    def update(self, values: dict[str, Any]) -> None:
        for name in ("top_k", "every"):
            if name in values:
                value = values[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise BadInput(f"{name} must be a whole number of at least 1, got {value!r}")
                setattr(self, name, value)


@dataclass
class Outgoing:
    """What the writer sends next: a frame's answer (``future``), or an error (``error``)."""

    index: int | None
    received: float
    future: asyncio.Future[Stepped] | None = None
    error: Exception | None = None
    decode_s: float = 0.0
    top_k: int = 5
    held: bool = True  # holds a place in STREAM_QUEUE until it is written


END = Outgoing(None, 0.0, held=False)


def offered_key(websocket: WebSocket) -> str | None:
    """The API key of a handshake: ``Authorization: Bearer``, ``X-API-Key``, or (browsers, which cannot
    set headers) a ``bearer.<key>`` subprotocol offered beside ``fusionserve``."""
    headers = websocket.headers
    if "x-api-key" in headers:
        return headers["x-api-key"]
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for protocol in websocket.scope.get("subprotocols", []):
        if protocol.startswith(KEY_PREFIX):
            return protocol[len(KEY_PREFIX) :]
    return None


def check(websocket: WebSocket, service: Service, name: str | None) -> ServedModel:
    expected = service.settings.api_key
    if expected is not None:
        given = offered_key(websocket)
        if given is None:
            raise Refused(1008, "an API key is required (Authorization: Bearer, X-API-Key, or a bearer.<key> protocol)")
        if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
            raise Refused(1008, "wrong API key")
    if service.draining:
        raise Refused(1001, "the server is shutting down")
    if not service.ready:
        raise Refused(1013, "the server is not ready yet")
    try:
        return service.model(name)
    except NotFound as exc:
        raise Refused(1008, str(exc)) from exc


@router.websocket("/stream")
async def stream(websocket: WebSocket) -> None:
    """Stream frames to the default model."""
    await serve(websocket, None)


@router.websocket("/models/{name}/stream")
async def stream_named(websocket: WebSocket, name: str) -> None:
    """Stream frames to the model ``name``."""
    await serve(websocket, name)


async def serve(websocket: WebSocket, name: str | None) -> None:
    service: Service = websocket.app.state.service
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(SUBPROTOCOL if SUBPROTOCOL in offered else None)
    try:
        served = check(websocket, service, name)
        options = Options()
        try:
            options.update({k: _whole(k, v) for k, v in websocket.query_params.items() if k in CONTROLS - {"reset"}})
        except BadInput as exc:
            raise Refused(1008, str(exc)) from exc
        if not service.streams.acquire():
            raise Refused(1013, f"too many streams open (MAX_STREAMS={service.settings.max_streams}); try again later")
    except Refused as refused:
        log.info("stream refused: %s", refused.reason)
        await websocket.close(refused.code, refused.reason)
        return
    try:
        await Session(websocket, service, served, options).run()
    finally:
        service.streams.release()


def _whole(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise BadInput(f"{name} must be a whole number, got {text!r}") from exc


class Session:
    """One open stream: its reader and writer, its place in the stepper, and how it ends."""

    def __init__(self, websocket: WebSocket, service: Service, served: ServedModel, options: Options) -> None:
        self.ws, self.service, self.served, self.options = websocket, service, served, options
        self.stepper = served.stepper
        self.stream: Stream = self.stepper.open()
        self.settings = service.settings
        self.slots = asyncio.Semaphore(self.settings.stream_queue)
        self.answers: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.index = 0  # the next frame's number
        self.received = self.answered = 0  # frames read, and frames whose answer (or error) was sent
        self.reset = False  # the next frame starts the state over
        self.connected = True
        self.frame_seconds = service.metrics.stream_frame_seconds.labels(served.name)

    async def run(self) -> None:
        protocol = self.ws.scope.get(CLOSING)
        if protocol is not None:
            protocol.app_finishes = True  # shutdown sets its event, and this stream closes (1001)
        closing = asyncio.create_task((asyncio.Event() if protocol is None else protocol.closing).wait())
        writer = asyncio.create_task(self.write())
        try:
            ending = await self.read(closing, writer)
            self.answers.put_nowait(END)
            # every frame received is answered, then the stream closes; a client that reads no answers
            # holds neither its place nor its socket
            unread = ending is not None and ending[1].startswith(UNREAD)
            flush = 0.0 if unread else min(self.settings.stream_idle_s, FLUSH_S)
            await asyncio.wait((writer,), timeout=flush)
            if not writer.done():
                log.info("closing a stream whose client reads no answers")
                self.connected = False
                if protocol is not None:
                    protocol.transport.abort()  # a close frame would wait behind the unread answers
            elif writer.exception() is not None:
                log.error("a stream's writer failed", exc_info=writer.exception())
            elif ending is not None and self.connected:
                await self.close(*ending)
        finally:
            closing.cancel()
            writer.cancel()
            self.stepper.discard(self.stream)
            log.info(
                "stream on %s closed: %d frames received, %d answered", self.served.name, self.received, self.answered
            )

    async def close(self, code: int, reason: str) -> None:
        if self.ws.client_state is WebSocketState.CONNECTED:
            with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):  # the client left first
                await self.ws.close(code, clip_reason(reason))

    async def read(self, closing: asyncio.Task[Any], writer: asyncio.Task[None]) -> tuple[int, str] | None:
        """Read until the client leaves (None), or the stream idles or the server shuts down (a close code
        and reason). Only a wait for the next message is cut short: a frame read is always answered."""
        idle = self.settings.stream_idle_s
        receiving: asyncio.Future[Any] | None = None
        try:
            while True:
                receiving = asyncio.ensure_future(self.ws.receive())
                await asyncio.wait((receiving, closing, writer), timeout=idle, return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    if closing.done():
                        return 1001, "the server is shutting down"
                    if writer.done():
                        return 1011, "the server could not answer this stream"
                    return 1000, f"idle: no message for {idle:g} s"
                message = receiving.result()
                if message["type"] == "websocket.disconnect":
                    self.connected = False
                    return None
                try:
                    await self.take(message)
                except TimeoutError:  # its answers have not been read for STREAM_IDLE_S: a place held for nothing
                    return 1008, f"{UNREAD} for {idle:g} s"
                if closing.done():
                    return 1001, "the server is shutting down"  # the last message read is answered; no more is read
        finally:
            if receiving is not None and not receiving.done():
                receiving.cancel()

    async def take(self, message: MutableMapping[str, Any]) -> None:
        if message.get("bytes") is not None:
            await self.frame(message["bytes"])
        elif message.get("text") is not None:
            # a control's error answer holds a place in STREAM_QUEUE as a frame's does
            await asyncio.wait_for(self.slots.acquire(), self.settings.stream_idle_s)
            self.control(message["text"])

    def control(self, text: str) -> None:
        """Apply a JSON control; a bad one is answered with an error (its slot is the writer's to free)."""
        try:
            if len(text) > MAX_CONTROL:
                raise BadInput(f"a control is a small JSON object; this text message has {len(text)} characters")
            try:
                values = json.loads(text)
            except ValueError as exc:
                raise BadInput(f"a text message must be a JSON control: {exc}") from exc
            if not isinstance(values, dict) or not values or set(values) - CONTROLS:
                unknown = sorted(set(values) - CONTROLS) if isinstance(values, dict) else values
                raise BadInput(f"unknown control {reprlib.repr(unknown)}; controls are {sorted(CONTROLS)}")
            if "reset" in values and values["reset"] is not True:
                raise BadInput(f"reset must be true, got {reprlib.repr(values['reset'])}")
            self.options.update(values)
        except BadInput as exc:
            self.answers.put_nowait(Outgoing(None, time.perf_counter(), error=exc, held=True))
            return
        self.slots.release()  # applied: nothing to answer
        if values.get("reset"):
            self.index, self.reset = 0, True

    async def frame(self, data: bytes) -> None:
        """Decode a frame and hand it to the stepper; its answer is the writer's."""
        # at most STREAM_QUEUE unanswered: past them, the socket is not read
        await asyncio.wait_for(self.slots.acquire(), self.settings.stream_idle_s)
        self.received += 1
        received = time.perf_counter()
        index, self.index = self.index, self.index + 1
        out = Outgoing(index, received, top_k=self.options.top_k)
        try:
            pixels = await self.decode(data, index)
        except Exception as exc:  # that frame's error (a domain error's status, else internal): the stream goes on
            out.error = exc
        else:
            out.decode_s = time.perf_counter() - received
            out.future = asyncio.get_running_loop().create_future()
            answer = (index + 1) % self.options.every == 0
            self.stepper.submit(self.stream, Step(pixels, self.reset, answer, out.future))
            self.reset = False
        self.answers.put_nowait(out)

    async def decode(self, data: bytes, index: int) -> np.ndarray:
        """One frame on a decode thread, its bytes held against the server's memory budget meanwhile:
        while the budget is spent the stream waits, unread, up to ``STREAM_IDLE_S``."""
        budget = self.service.budget
        if len(data) > budget.total:
            raise TooLarge(f"frame {index} of {len(data)} bytes is more than MAX_INFLIGHT_MB")
        deadline = time.monotonic() + self.settings.stream_idle_s
        while not budget.reserve(len(data)):
            if time.monotonic() > deadline:
                raise Overloaded(f"the server holds {budget.used >> 20} MB of requests in flight; frame {index} waited")
            await asyncio.sleep(0.01)
        try:
            target = self.served.target
            return await self.service.intake.off_loop(
                decode_image, data, target.format, target.limits.max_pixels, index
            )
        finally:
            budget.release(len(data))

    async def write(self) -> None:
        """Send each answer in order; after the client has gone, only wait for the rest."""
        while (out := await self.answers.get()) is not END:
            try:
                message = await self.message(out)
            finally:
                if out.held:
                    self.slots.release()
            if message is not None and self.connected:
                try:
                    await self.ws.send_text(message)
                except (WebSocketDisconnect, RuntimeError, OSError):
                    self.connected = False
                else:
                    self.answered += out.index is not None

    async def message(self, out: Outgoing) -> str | None:
        if out.error is not None:
            _, code, text, _ = status_of(out.error)
            body: dict[str, Any] = {"error": {"code": code, "message": text}}
            return json.dumps(body if out.index is None else {"frame": out.index, **body})
        assert out.future is not None
        await asyncio.wait((out.future,))
        if out.future.cancelled():
            return None  # the stream was discarded
        if out.future.exception() is not None:
            _, code, text, _ = status_of(out.future.exception())  # type: ignore[arg-type]
            return json.dumps({"frame": out.index, "error": {"code": code, "message": text}})
        stepped = out.future.result()
        if stepped.probs is None:
            return None  # not an N-th frame
        took = time.perf_counter() - out.received
        self.frame_seconds.observe(took)
        return json.dumps(answer(self.served.labels, out, stepped, took))


def answer(labels: list[str], out: Outgoing, stepped: Stepped, took: float) -> dict[str, Any]:
    """A frame's answer message."""
    probs = stepped.probs.tolist()  # type: ignore[union-attr]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    return {
        "frame": out.index,
        "label": labels[order[0]],
        "probabilities": dict(zip(labels, probs, strict=True)),
        "top_k": [{"label": labels[i], "probability": probs[i]} for i in order[: out.top_k]],
        "timing_ms": {
            "decode": round(out.decode_s * 1000, 3),
            "queue": round(stepped.queue_s * 1000, 3),
            "step": round(stepped.step_s * 1000, 3),
            "total": round(took * 1000, 3),
        },
        "batch": stepped.batch,
    }
