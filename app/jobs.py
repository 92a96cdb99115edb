"""Work on one upload that runs beside the clip batcher, on a decode thread: timelines and
explanations.

Such a job parses its upload on any decode thread and then, for a video, waits its turn among the
video decodes (``VideoShare``: all threads but one), so images keep a thread; it runs the model
through ``ModelRuntime.compute`` (its precision, its share of the CPU threads). ``DECODE_TIMEOUT_S``
bounds the whole of it, and ``stop`` tells it, between frames, that its request has timed out or its
client has left.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar

from app.decoding import Decoders
from app.errors import ClientGone, NotReady, TimedOut
from app.intake import Disconnected
from app.uploads import Parsed, Stop, Target, Upload, parse_upload
from media import Stopped

T = TypeVar("T")
Work = Callable[..., T]  # work(parsed upload, stop=stop): the job, asking stop between frames


def submit(decoders: Decoders, upload: Upload, target: Target, work: Callable[[Parsed], T], stop: Stop) -> Future[T]:
    """``work(parsed upload)`` on a decode thread, as the decode threads run a /predict upload: parsed on
    any of them, a video then in its turn among the video decodes, without holding a thread while it
    waits. A job whose request has ended does not start."""
    result: Future[T] = Future()

    def run(parsed: Parsed) -> None:
        try:
            if stop():
                raise Stopped("the job is no longer wanted")
            result.set_result(work(parsed))
        except Exception as exc:
            result.set_exception(exc)

    def parse() -> None:
        try:
            if stop():
                raise Stopped("the job is no longer wanted")
            parsed = parse_upload(upload, target)
        except Exception as exc:
            result.set_exception(exc)
            return
        job = partial(run, parsed)
        if parsed.video is None:
            job()
        elif decoders.videos.admit(job):
            decoders.videos.run(job)

    try:
        decoders.pool.submit(parse)
    except RuntimeError as exc:  # the pool is shut down: the server is stopping
        raise NotReady("the server is shutting down") from exc
    return result


async def run_job(
    decoders: Decoders,
    upload: Upload,
    target: Target,
    work: Work[T],
    *,
    what: str,
    timeout_s: float,
    disconnected: Disconnected,
) -> T:
    """``work`` on ``upload`` done within ``timeout_s`` (DECODE_TIMEOUT_S) or ``TimedOut``; a client that
    leaves stops it (``ClientGone``). ``what`` names the job in the timeout's message."""
    deadline = time.monotonic() + timeout_s
    ended = threading.Event()

    def stop() -> bool:
        return ended.is_set() or time.monotonic() > deadline

    waiter = asyncio.wrap_future(submit(decoders, upload, target, partial(work, stop=stop), stop))
    watcher = asyncio.ensure_future(disconnected())
    late = f"the {what} was not done within {timeout_s:g} s"
    try:
        done, _ = await asyncio.wait((waiter, watcher), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            try:
                return waiter.result()
            except Stopped as exc:  # its thread saw the deadline first
                raise TimedOut(late) from exc
        if watcher in done:
            raise ClientGone()
        raise TimedOut(late)
    finally:
        watcher.cancel()
        if watcher.done() and not watcher.cancelled():
            watcher.exception()  # retrieved: a receive that failed means the connection is gone too
        if not waiter.done():
            ended.set()  # its thread stops at its next frame; nobody awaits the outcome
            waiter.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
