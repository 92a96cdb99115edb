"""What requests need while the server runs: the models, the intake, readiness.

Created in the app's lifespan from what ``app.loading.load`` returns; never at import time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from app.budget import MemoryBudget
from app.errors import NotFound, NotReady
from app.intake import Intake
from app.loading import Loaded
from app.metrics import Metrics
from app.served import ServedModel
from app.settings import Settings
from app.streams import StreamStore


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
