"""A clip's place in a model's queue (``Ticket``) and what it is answered with (``Result``)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass, field

import torch

NO_CLIP = torch.empty(0, dtype=torch.uint8)


@dataclass(frozen=True)
class Result:
    probabilities: torch.Tensor  # (K,) float32
    queue_s: float
    inference_s: float
    batch_size: int
    frames: int  # the clip's frames (the ticket lets go of them once answered)


@dataclass(frozen=True)
class BatchStats:
    size: int
    frames: int
    queue_s: list[float]
    inference_s: float


@dataclass(eq=False)
class Ticket:
    """One clip's place: taken on the event loop, queued with its clip from any thread (a decode
    thread, once the clip is decoded), answered on ``loop`` through ``future``.

    ``deadline`` is the decode deadline until the clip is queued, then the queue's.
    ``cancelled`` and ``started`` are written under the queue's lock.
    """

    future: asyncio.Future[Result]
    loop: asyncio.AbstractEventLoop
    clip: torch.Tensor = field(default=NO_CLIP)  # (T, C, H, W) uint8, once queued
    enqueued: float = 0.0  # time.perf_counter() when queued
    deadline: float = math.inf
    cancelled: bool = False
    started: bool = False


def new_tickets(count: int, deadline: float = math.inf) -> list[Ticket]:
    """Places for ``count`` clips of one request, answered on the running event loop."""
    loop = asyncio.get_running_loop()
    return [Ticket(loop.create_future(), loop, deadline=deadline) for _ in range(count)]


def settle(ticket: Ticket, result: Result | None = None, exc: BaseException | None = None) -> None:
    """Answer ``ticket`` with ``result`` or ``exc``, from any thread (on its loop; once)."""
    ticket.clip = NO_CLIP  # answered: its frames need not live as long as the request does

    def apply() -> None:
        if ticket.future.done():
            return
        if exc is not None:
            ticket.future.set_exception(exc)
        else:
            ticket.future.set_result(result)  # type: ignore[arg-type]

    with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting any more
        ticket.loop.call_soon_threadsafe(apply)
