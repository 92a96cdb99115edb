"""One model as the service serves it: its runtime, its batcher, its stream stepper, and what its uploads
decode to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.batching import Batcher
from app.runtime import ModelRuntime
from app.streams import Stepper
from app.uploads import Target
from models import InputSpec


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
