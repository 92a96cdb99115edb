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
    """One KServe v2 sequence: its stream on its model's stepper, and when a request last used it."""

    stepper: Stepper
    stream: Stream
    used: float = field(default_factory=time.monotonic)


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

    def sequence(self, stepper: Stepper, model: str, sequence_id: Hashable, start: bool) -> tuple[Sequence, bool]:
        """The sequence ``sequence_id`` of ``model``: started over when ``start`` (a new one if it is not
        open); else the open one, or ``BadInput`` when there is none. Returns it and whether it starts."""
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
        return found, start

    def end(self, model: str, sequence_id: Hashable) -> None:
        found = self.sequences.pop((model, sequence_id), None)
        if found is not None:
            found.stepper.discard(found.stream)

    def expire(self, now: float | None = None) -> int:
        """Drop the sequences idle for ``idle_s``; how many went."""
        now = time.monotonic() if now is None else now
        idle = [key for key, seq in self.sequences.items() if now - seq.used > self.idle_s]
        for key in idle:
            self.end(*key)
        return len(idle)


async def append(sequence: Sequence, frames: np.ndarray, start: bool) -> np.ndarray:
    """Step ``frames`` (T, H, W, C) uint8 through ``sequence`` (started over first when ``start``);
    the probabilities (K,) after its last frame."""
    loop = asyncio.get_running_loop()
    last: asyncio.Future[Stepped] | None = None
    for i, frame in enumerate(frames):
        last = loop.create_future()
        is_last = i == len(frames) - 1
        sequence.stepper.submit(sequence.stream, Step(frame, start and i == 0, is_last, last))
    assert last is not None, "a sequence request holds at least one frame"
    await asyncio.wait((last,))
    sequence.used = time.monotonic()
    if last.cancelled():
        raise TimedOut("the sequence ended (or expired) before its frames were stepped")
    stepped = last.result()
    assert stepped.probs is not None
    return stepped.probs
