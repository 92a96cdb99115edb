"""Streams: frames that arrive one at a time (WebSocket streams, KServe v2 sequences), stepped per
stream and batched across streams."""

from app.streams.stepper import Step, Stepped, Stepper, Stream
from app.streams.store import Sequence, StreamStore, append

__all__ = ["Sequence", "Step", "Stepped", "Stepper", "Stream", "StreamStore", "append"]
