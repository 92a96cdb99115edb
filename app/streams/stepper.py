"""Cross-stream step batching: the newest frame of every stream with one waiting, stepped together.

A ``Stream`` is one client's sequence of frames on one model (a WebSocket stream or a KServe v2
sequence). Its model's ``Stepper`` has one thread that takes, in turn, the oldest waiting frame of
up to ``max_batch`` streams, runs their frames through the encoder in one batch, and then:

- **step** mode (heads whose state stays bounded: a unidirectional LSTM, the mean, causal attention
  with a window): one batched head step, the streams' states stacked by ``state_group`` and split
  back, so each frame is one encoder pass and one head step, and the answer after frame i is the
  model's answer on frames 0..i;
- **window** mode (every other head: a bidirectional LSTM, full attention): each stream keeps the
  features of its last ``window`` frames, and the head runs on the windows of the frames to be
  answered, as one ragged batch; a frame's features are computed once and reused by every window
  that holds it.

A stream's frames are taken in order, one per batch, so its order is never broken; frames wait
while a batch runs, so batches grow with the load, as the clip batcher's do. Futures are settled on
the event loop that submitted them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.errors import NotReady
from app.runtime import ModelRuntime
from host.threads import name_os_thread
from models import FusedClassifier
from models.heads import State

log = logging.getLogger(__name__)

NARROW_FRAMES = 2  # a step batch of at most this many frames ...
NARROW_PAUSE_S = 0.01  # ... this long after the last one ended runs on one thread


@dataclass(frozen=True)
class Stepped:
    """One frame's outcome: its probabilities (None when it was not to be answered), how long it
    waited for its batch, how long the batch took, and the batch's size."""

    probs: np.ndarray | None
    queue_s: float
    step_s: float
    batch: int


@dataclass
class Step:
    """One decoded frame of a stream: (H, W, C) uint8 at the model's size."""

    frame: np.ndarray
    reset: bool  # the stream's state starts over before this frame
    answer: bool  # compute its probabilities (a stream answering every N-th frame skips the rest)
    future: asyncio.Future[Stepped]
    submitted: float = field(default_factory=time.perf_counter)


class Stream:
    """One stream's place in its model's stepper: frames waiting, and its state or window."""

    def __init__(self, window: int) -> None:
        self.pending: deque[Step] = deque()
        self.queued = False  # in the stepper's line of streams with a frame waiting
        self.closed = False
        self.state: State | None = None  # step mode
        self.window: deque[torch.Tensor] = deque(maxlen=window)  # window mode: features (D,) of its last frames


class Stepper:
    """One model's stream steps, on a thread of its own (``start``, ``close``). ``on_batch(size, seconds)``
    observes each batch; ``after_batch`` runs after each (housekeeping such as ``app.memory.HeapRelease``)."""

    def __init__(
        self,
        runtime: ModelRuntime,
        max_batch: int,
        on_batch: Callable[[int, float], None] | None = None,
        after_batch: Callable[[], object] | None = None,
    ) -> None:
        self.runtime, self.max_batch = runtime, max_batch
        self.tuning: dict[str, Any] | None = None  # what autotune measured, when it chose max_batch
        self._after_batch = after_batch or (lambda: None)
        self.mode = "step" if runtime.checkpoint.model.head.steps_bounded else "window"
        self.window = runtime.spec.frames
        self._on_batch = on_batch or (lambda size, seconds: None)
        self._ready: deque[Stream] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=f"stepper-{runtime.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def open(self) -> Stream:
        return Stream(self.window)

    def submit(self, stream: Stream, step: Step) -> None:
        """Queue ``step`` after the stream's earlier frames (from the event loop); ``NotReady`` once the
        stepper has stopped."""
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                raise NotReady("the server is shutting down")
            stream.pending.append(step)
            if not stream.queued:
                stream.queued = True
                self._ready.append(stream)
                self._cond.notify()

    def discard(self, stream: Stream) -> None:
        """The stream has ended: frames of it not yet stepped are not (their futures cancelled), and the
        stepper thread, the only one that touches states, drops its state after its current batch."""
        with self._cond:
            stream.closed = True
            dropped = list(stream.pending)
            stream.pending.clear()
        for step in dropped:
            _call(step.future, _cancel)

    def close(self) -> None:
        """Step every frame submitted, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def probe(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One step batch of ``lengths.numel()`` new streams, frames (B, C, H, W) uint8, as ``_step_batch``
        runs it (the encoder, then a head step or the head on windows of ``window`` frames): what
        ``app.autotune`` times to choose ``max_batch``."""
        return self.runtime.compute(self._probe, frames)

    def _probe(self, model: FusedClassifier, frames: torch.Tensor) -> torch.Tensor:
        feats = model.forward_features(frames.to(model.mean.device))  # (B, D)
        head, batch = model.head, feats.shape[0]
        if self.mode == "step":
            return head.step(feats, head.init_state(batch, device=feats.device))[0]
        windows = feats.repeat_interleave(self.window, dim=0)  # (B * window, D): full windows
        return model.forward_head(windows, torch.full((batch,), self.window))

    def _take(self) -> list[tuple[Stream, Step]] | None:
        """The oldest frame of each of up to ``max_batch`` streams, in turn; None once closed and empty."""
        with self._cond:
            while True:
                while not self._ready:
                    if self._stopping:
                        return None
                    self._cond.wait()
                batch: list[tuple[Stream, Step]] = []
                for _ in range(len(self._ready)):  # each stream once
                    if len(batch) == self.max_batch:
                        break
                    stream = self._ready.popleft()
                    if stream.pending:
                        batch.append((stream, stream.pending.popleft()))
                    if stream.pending:
                        self._ready.append(stream)  # behind the others: its next frame goes in a later batch
                    else:
                        stream.queued = False  # drained, or discarded while it waited
                if batch:
                    return batch

    def _work(self) -> None:
        name_os_thread()
        ended = 0.0  # when the last batch ended
        while (batch := self._take()) is not None:
            started = time.perf_counter()
            # a small batch after a pause runs on one thread: the team of two would have gone to sleep,
            # and waking it takes longer than the batch (docs/streams.md: a lone stream)
            narrow = len(batch) <= NARROW_FRAMES and started - ended > NARROW_PAUSE_S
            try:
                probs = self.runtime.compute(self._step_batch, batch, narrow=narrow)
            except Exception as exc:  # a fault of the model, not of one frame: every frame of the batch learns it
                log.exception("%s: a stream step failed", self.runtime.name)
                for _, step in batch:
                    _call(step.future, _fail, exc)
                continue
            finally:
                for stream, _ in batch:
                    if stream.closed:  # discarded meanwhile: its state goes now, on this thread
                        stream.state = None
                        stream.window.clear()
            ended = time.perf_counter()
            took = ended - started
            for (_, step), p in zip(batch, probs, strict=True):
                _call(step.future, _settle, Stepped(p, started - step.submitted, took, len(batch)))
            try:
                self._on_batch(len(batch), took)
                self._after_batch()
            except Exception:  # housekeeping never stops the steps
                log.exception("%s: after a step batch", self.runtime.name)

    def _step_batch(self, model: FusedClassifier, batch: list[tuple[Stream, Step]]) -> list[np.ndarray | None]:
        """Encode the batch's frames once, then step or window each stream (in the runtime's compute)."""
        device = model.mean.device
        pixels = torch.from_numpy(np.stack([step.frame for _, step in batch])).permute(0, 3, 1, 2)  # (B, C, H, W)
        feats = model.forward_features(pixels.to(device, non_blocking=True))  # (B, D)
        streams = [stream for stream, _ in batch]
        for stream, step in batch:
            if step.reset:
                stream.state = None
                stream.window.clear()
        if self.mode == "step":
            logits = self._steps(model, streams, feats)
        else:
            logits = self._windows(model, streams, feats, [step.answer for _, step in batch])
        out: list[np.ndarray | None] = [None] * len(batch)
        for i, row in logits.items():
            if batch[i][1].answer:
                out[i] = row
        return out

    @staticmethod
    def _steps(model: FusedClassifier, streams: list[Stream], feats: torch.Tensor) -> dict[int, np.ndarray]:
        head = model.head
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for i, stream in enumerate(streams):
            if stream.state is None:
                stream.state = head.init_state(1, device=feats.device)
            groups[head.state_group(stream.state)].append(i)
        rows: dict[int, np.ndarray] = {}
        for members in groups.values():
            stacked = head.stack_states([streams[i].state for i in members])  # type: ignore[misc]
            logits, after = head.step(feats[members], stacked)
            probs = logits.float().softmax(dim=-1).cpu().numpy()
            for i, state, p in zip(members, head.unstack_state(after), probs, strict=True):
                streams[i].state = as_float32(state)  # under bf16 autocast: not rounded frame after frame
                rows[i] = p
        return rows

    @staticmethod
    def _windows(
        model: FusedClassifier, streams: list[Stream], feats: torch.Tensor, answer: list[bool]
    ) -> dict[int, np.ndarray]:
        for stream, feat in zip(streams, feats, strict=True):
            stream.window.append(feat.clone())  # its own copy: a view would hold the whole batch's features
        wanted = [i for i, a in enumerate(answer) if a]
        if not wanted:
            return {}
        windows = [torch.stack(list(streams[i].window)) for i in wanted]
        lengths = torch.tensor([len(w) for w in windows])
        probs = model.forward_head(torch.cat(windows), lengths).float().softmax(dim=-1).cpu().numpy()
        return dict(zip(wanted, probs, strict=True))


def as_float32(state: Any) -> Any:
    """A state's floating tensors (in dicts, lists, tuples) as float32."""
    if isinstance(state, torch.Tensor):
        return state.float() if state.is_floating_point() else state
    if isinstance(state, dict):
        return {key: as_float32(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(as_float32(value) for value in state)
    return state


def _call(future: asyncio.Future[Stepped], fn: Callable[..., None], *args: Any) -> None:
    """``fn(future, *args)`` on the future's own event loop; nothing if that loop has closed."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for the answer
        future.get_loop().call_soon_threadsafe(fn, future, *args)


def _settle(future: asyncio.Future[Stepped], outcome: Stepped) -> None:
    if not future.done():
        future.set_result(outcome)


def _cancel(future: asyncio.Future[Stepped]) -> None:
    if not future.done():
        future.cancel()


def _fail(future: asyncio.Future[Stepped], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
