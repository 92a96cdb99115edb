"""What requests need while the server runs: the models, the intake, readiness.

Created in the app's lifespan from what ``app.loading.load`` returns; never at import time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from app.batching import Result
from app.budget import MemoryBudget
from app.errors import NotFound, NotReady
from app.explain import Explained, explain
from app.intake import Answer, Disconnected, Intake
from app.loading import Loaded
from app.metrics import Metrics
from app.served import ModelView, ServedModel
from app.settings import Settings
from app.streams import StreamStore, append
from app.uploads import Upload

T = TypeVar("T")


class Entry(Protocol):
    """What the request routes take a clip through: ``Intake`` in one process, the link to the engine in a
    front end (``app.frontends.link``)."""

    async def classify(self, served: Any, upload: Upload, disconnected: Disconnected) -> Answer: ...

    async def classify_clips(
        self, served: Any, clips: list[torch.Tensor], disconnected: Disconnected
    ) -> list[Result]: ...

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T: ...


class Serving(Protocol):
    """What the classifying routes (``/predict``, ``/v2/.../infer``) need: the ``Service`` in one process
    or in the engine, ``app.frontends.link.RemoteService`` in a front end."""

    settings: Settings

    @property
    def metrics(self) -> Any: ...

    @property
    def intake(self) -> Entry: ...

    def check_accepting(self) -> None: ...

    def model(self, name: str | None) -> ModelView: ...

    async def append_sequence(
        self, served: Any, sequence_id: Hashable, start: bool, end: bool, clip: torch.Tensor
    ) -> np.ndarray: ...

    async def explain(self, served: Any, upload: Upload, disconnected: Disconnected) -> Explained: ...


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    loaded: Loaded
    budget: MemoryBudget
    intake: Intake = field(init=False)
    streams: StreamStore = field(init=False)
    ready: bool = False
    draining: bool = False

    def __post_init__(self) -> None:
        self.intake = Intake(self.loaded.decoders, self.models, self.settings.decode_timeout_s)
        self.streams = StreamStore(self.settings.max_streams, self.settings.stream_idle_s)
        self.metrics.streams_open.labels("stream").set_function(lambda: self.streams.streams)
        self.metrics.streams_open.labels("sequence").set_function(lambda: len(self.streams.sequences))
        self._expiry: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin serving (on the event loop): ready, and idle sequences expire."""
        self.ready = True
        self.metrics.ready.set(1)
        self._expiry = asyncio.get_running_loop().create_task(self._expire_sequences())

    async def _expire_sequences(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.stream_idle_s / 4))
            self.streams.expire()

    @property
    def models(self) -> dict[str, ServedModel]:
        return self.loaded.models

    @property
    def default_model(self) -> str:
        return self.loaded.default_model

    def model(self, name: str | None) -> ServedModel:
        name = name or self.default_model
        if name not in self.models:
            raise NotFound(f"no model named {name!r}; loaded: {sorted(self.models)}")
        return self.models[name]

    @property
    def accepting(self) -> bool:
        """Ready for work: loaded, not shutting down, able to take an upload and its body (readiness)."""
        return self.ready and not self.draining and not self.intake.saturated() and not self.budget.nearly_spent

    def check_accepting(self) -> None:
        if self.draining:
            raise NotReady("the server is shutting down")
        if not self.ready:
            raise NotReady("the server is not ready yet")

    async def explain(self, served: ServedModel, upload: Upload, disconnected: Disconnected) -> Explained:
        """``upload`` explained (``explain=frames``), holding one of the model's upload places while it runs."""
        with self.intake.holding(served):
            timeout_s = self.settings.decode_timeout_s
            return await explain(self.loaded.decoders, served, upload, timeout_s=timeout_s, disconnected=disconnected)

    async def append_sequence(
        self, served: ServedModel, sequence_id: Hashable, start: bool, end: bool, clip: torch.Tensor
    ) -> np.ndarray:
        """Append ``clip`` (T, C, H, W) to its KServe sequence (docs/streams.md): the probabilities after its
        last frame. A sequence whose append fails ends: its state no longer follows what the client sent."""
        sequence = self.streams.sequence(served.stepper, served.name, sequence_id, start)
        ending = end
        try:
            return await append(sequence, clip.permute(0, 2, 3, 1).numpy(), start, self.settings.request_timeout_s)
        except Exception:
            ending = True
            raise
        finally:
            if ending:
                self.streams.end(served.name, sequence_id, sequence)

    async def close(self) -> None:
        """Stop taking work, answer everything accepted, then release the threads and processes."""
        self.ready = False
        self.metrics.ready.set(0)
        if self._expiry is not None:
            self._expiry.cancel()
        for model, sequence_id in list(self.streams.sequences):
            self.streams.end(model, sequence_id)
        await asyncio.gather(*(m.batcher.close() for m in self.models.values()))
        await asyncio.to_thread(self.loaded.close)
