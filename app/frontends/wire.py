"""The messages between a front end and the engine, on a Unix stream socket.

A message is a JSON head and an optional payload of raw bytes, each preceded by its length (two
little-endian uint32). Pixels travel in shared memory (``app.frontends.arena``), so the head only
says where they lie; a payload carries them only when the arena has no room. An error crosses as its
class name and message and is raised again on the other side as the same domain error, so the HTTP
edge gives it the same status as in one process.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from app import errors

PREFIX = struct.Struct("<II")
ERRORS: dict[str, type[Exception]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ in ("app.errors", "media.errors")
}


def pack(head: dict[str, Any], payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """One message, as the buffers to write in order."""
    encoded = json.dumps(head, separators=(",", ":")).encode()
    return (
        [PREFIX.pack(len(encoded), len(payload)), encoded, payload]
        if payload
        else [PREFIX.pack(len(encoded), 0) + encoded]
    )


async def read(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    """The next message; ``asyncio.IncompleteReadError`` once the other side has closed."""
    head_size, payload_size = PREFIX.unpack(await reader.readexactly(PREFIX.size))
    head = json.loads(await reader.readexactly(head_size))
    payload = await reader.readexactly(payload_size) if payload_size else b""
    return head, payload


def error_head(exc: BaseException) -> dict[str, str]:
    """An error as it crosses: a domain error by its class, anything else as a failure of the model."""
    name = type(exc).__name__
    if name not in ERRORS:
        return {"type": "InferenceFailed", "message": f"internal error: {exc}"}
    return {"type": name, "message": str(exc)}


def raise_error(head: dict[str, str]) -> None:
    raise ERRORS.get(head.get("type", ""), errors.InferenceFailed)(head.get("message", ""))
