"""Helpers shared by the routes: submitting a clip while watching for the client leaving."""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from fastapi import Request

from app.batcher import Batcher, Closed, InferenceFailed, Overloaded, Result, TimedOut
from app.errors import ApiError, not_ready, overloaded, timed_out


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a withdrawn gather's outcome so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


async def run_clips(request: Request, batcher: Batcher, clips: list[torch.Tensor]) -> list[Result]:
    """Queue ``clips``; if the client disconnects first, withdraw them (dropped before compute)."""
    task = asyncio.ensure_future(batcher.submit_many(clips))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        waiting: set[asyncio.Future[Any]] = {task, watcher}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        task.add_done_callback(_consume)
        raise ClientGone()
    try:
        return task.result()
    except Overloaded as exc:
        raise overloaded(str(exc)) from exc
    except Closed as exc:
        raise not_ready(str(exc)) from exc
    except TimedOut as exc:
        raise timed_out(str(exc)) from exc
    except InferenceFailed as exc:
        raise ApiError(422, "inference_failed", f"the model could not process this clip: {exc}") from exc
