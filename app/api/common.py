"""Helpers shared by the routes: queueing clips, and waiting for them while watching for the client leaving."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from fastapi import Request

from app.batcher import Batcher, Closed, InferenceFailed, Overloaded, Result, Ticket, TimedOut
from app.errors import ApiError, not_ready, overloaded, timed_out
from app.preprocess import array_to_clip


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def decode_and_queue(batcher: Batcher, tickets: list[Ticket], decode: Callable[..., np.ndarray], *args: Any) -> None:
    """On a decode thread: decode one clip (``app.decode``: pixels (T, H, W, C)) and queue it under
    ``tickets`` at once; a failure (undecodable input, a full queue) answers the tickets instead.
    A clip whose request ended while it waited for this thread (timed out, or the client left) is not
    decoded: a backlog of dead uploads would otherwise hold the threads from the live ones."""
    if not batcher.abandoned(tickets):
        queue_clip(batcher, tickets, decode, *args)


def queue_clip(batcher: Batcher, tickets: list[Ticket], decode: Callable[..., np.ndarray], *args: Any) -> None:
    """Queue ``decode(*args)`` under ``tickets``, or answer them with its failure (as ``decode_and_queue``,
    without the check for an ended request: for a clip already decoded elsewhere)."""
    try:
        batcher.enqueue(tickets, [array_to_clip(decode(*args))])
    except Exception as exc:
        batcher.fail(tickets, exc)


@contextlib.contextmanager
def batcher_errors() -> Iterator[None]:
    """The batcher's refusals and failures as API errors (503, 504, 422)."""
    try:
        yield
    except Overloaded as exc:
        raise overloaded(str(exc)) from exc
    except Closed as exc:
        raise not_ready(str(exc)) from exc
    except TimedOut as exc:
        raise timed_out(str(exc)) from exc
    except InferenceFailed as exc:
        raise ApiError(422, "inference_failed", f"the model could not process this clip: {exc}") from exc


async def answers(request: Request, batcher: Batcher, tickets: list[Ticket]) -> list[Result]:
    """Wait for the clips of ``tickets``; if the client disconnects first, withdraw them (dropped
    before compute) and raise ``ClientGone``. Their failures come out as API errors (a decode
    error as it was raised).

    The route awaits the clips' futures itself (``Batcher.wait``), not a task around them: the
    worker's answer reaches it in one turn of the event loop.
    """

    def gone(watcher: asyncio.Task[None]) -> None:
        if watcher.cancelled():
            return  # answered first
        watcher.exception()  # retrieved: a receive that failed means the connection is gone too
        for ticket in tickets:
            if not ticket.future.done():
                ticket.future.set_exception(ClientGone())

    watcher = asyncio.ensure_future(_wait_disconnect(request))
    watcher.add_done_callback(gone)
    try:
        with batcher_errors():
            return await batcher.wait(tickets)
    finally:
        watcher.cancel()


async def run_clips(request: Request, batcher: Batcher, clips: list[torch.Tensor]) -> list[Result]:
    """Queue ``clips`` (all or none) and wait for them as ``answers`` does."""
    tickets = batcher.tickets(len(clips), asyncio.get_running_loop())
    with batcher_errors():
        batcher.enqueue(tickets, clips)
    return await answers(request, batcher, tickets)
