"""Every open stream and KServe v2 sequence of the server: at most ``MAX_STREAMS`` together.

A WebSocket stream holds its place for as long as its socket is open. A sequence is kept by its id
between requests and expires once no request has come for ``STREAM_IDLE_S`` (``expire``, called
periodically by the service).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from app.errors import BadInput, Overloaded, TimedOut
from app.streams.stepper import Step, Stepped, Stepper, Stream


@dataclass
class Sequence:
    """One KServe v2 sequence: its stream on its model's stepper, when a request last used it, and how
    many requests are stepping it now (a sequence in use does not expire)."""

    stepper: Stepper
    stream: Stream
    used: float = field(default_factory=time.monotonic)
    busy: int = 0


class StreamStore:
    def __init__(self, max_streams: int, idle_s: float) -> None:
        self.max_streams, self.idle_s = max_streams, idle_s
        self.streams = 0  # WebSocket streams open
        self.sequences: dict[tuple[str, Hashable], Sequence] = {}

    @property
    def open(self) -> int:
        return self.streams + len(self.sequences)

    def acquire(self) -> bool:
        """Take a place for a WebSocket stream; False when every place is taken."""
        if self.open >= self.max_streams:
            return False
        self.streams += 1
        return True

    def release(self) -> None:
        self.streams -= 1

    def sequence(self, stepper: Stepper, model: str, sequence_id: Hashable, start: bool) -> Sequence:
        """The sequence ``sequence_id`` of ``model``: started over when ``start`` (a new one if it is not
        open); else the open one, or ``BadInput`` when there is none."""
        key = (model, sequence_id)
        found = self.sequences.get(key)
        if found is None and not start:
            raise BadInput(
                f"sequence {sequence_id!r} of model {model!r} is not open: start it with sequence_start=true "
                f"(sequences expire after {self.idle_s:g} s without a request)"
            )
        if found is None:
            if self.open >= self.max_streams:
                raise Overloaded(f"{self.open} streams and sequences are open (MAX_STREAMS={self.max_streams})")
            found = self.sequences[key] = Sequence(stepper, stepper.open())
        found.used = time.monotonic()
        return found

    def end(self, model: str, sequence_id: Hashable, sequence: Sequence | None = None) -> None:
        """Close the sequence (only if it is still ``sequence``, when given: not one started since)."""
        key = (model, sequence_id)
        found = self.sequences.get(key)
        if found is None or (sequence is not None and found is not sequence):
            return
        del self.sequences[key]
        found.stepper.discard(found.stream)

    def expire(self, now: float | None = None) -> int:
        """Drop the sequences idle for ``idle_s``; how many went."""
        now = time.monotonic() if now is None else now
        idle = [key for key, seq in self.sequences.items() if not seq.busy and now - seq.used > self.idle_s]
        for key in idle:
            self.end(*key)
        return len(idle)


async def append(sequence: Sequence, frames: np.ndarray, start: bool, timeout_s: float) -> np.ndarray:
    """Step ``frames`` (T, H, W, C) uint8 through ``sequence`` (started over first when ``start``);
    the probabilities (K,) after its last frame. Every frame's step must succeed (else the first error
    is raised) within ``timeout_s`` (``TimedOut``)."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Stepped]] = []
    sequence.busy += 1
    try:
        for i, frame in enumerate(frames):
            futures.append(loop.create_future())
            last = i == len(frames) - 1
            sequence.stepper.submit(sequence.stream, Step(frame, start and i == 0, last, futures[-1]))
        _, pending = await asyncio.wait(futures, timeout=timeout_s)
    finally:
        sequence.busy -= 1
        sequence.used = time.monotonic()
    if pending:
        raise TimedOut(f"the sequence's {len(frames)} frames were not stepped within {timeout_s:g} s")
    for future in futures:
        if future.cancelled():
            raise TimedOut("the sequence ended before its frames were stepped")
        if future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
    stepped = futures[-1].result()
    assert stepped.probs is not None
    return stepped.probs
