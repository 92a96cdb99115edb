"""One model as the service serves it: its runtime, its batcher, its stream stepper, and what its uploads
decode to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from app.batching import Batcher
from app.runtime import ModelRuntime
from app.streams import Stepper
from app.uploads import Target
from models import InputSpec


class ModelView(Protocol):
    """A model as the classifying routes see it: enough to check a request and word its answer."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def labels(self) -> list[str]: ...

    @property
    def target(self) -> Target: ...

    @property
    def max_queue(self) -> int: ...


@dataclass(frozen=True)
class ServedModel:
    runtime: ModelRuntime
    batcher: Batcher
    target: Target
    stepper: Stepper  # its streams' frames, stepped across streams
    tuning: dict[str, Any] | None = None  # what autotune measured and chose; None when the limits were set

    @property
    def name(self) -> str:
        return self.runtime.name

    @property
    def version(self) -> str:
        return self.runtime.version

    @property
    def labels(self) -> list[str]:
        return self.runtime.labels

    @property
    def spec(self) -> InputSpec:
        return self.runtime.spec

    @property
    def max_queue(self) -> int:
        return self.batcher.policy.max_queue
