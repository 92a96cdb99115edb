"""Service settings: ``FUSIONSERVE_*`` environment variables, or the same names as flags of ``python -m app``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.runtime import PASS_PIXELS
from models import default_checkpoint


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FUSIONSERVE_", extra="ignore")

    checkpoint: Path = Field(
        default_factory=default_checkpoint,
        description="a .safetensors checkpoint, or a folder of them (one model each); default: the bundled model",
    )
    default_model: str | None = Field(None, description="model that /predict serves; default: the first loaded")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that supports it, else fp32"
    )
    cuda_graphs: bool = Field(True, description="on CUDA: replay equal-length batches from captured CUDA graphs")
    compile: bool = Field(False, description="torch.compile the model's CNN at start (slower start, faster forward)")
    max_batch_size: int = Field(32, ge=1, description="most clips in one batch (set: overrides autotune)")
    max_batch_frames: int = Field(
        512, ge=1, description="most frames in one batch; a longer lone clip still runs (set: overrides autotune)"
    )
    autotune: bool = Field(True, description="measure the model at warm-up and pick the batch limits")
    latency_budget_ms: float = Field(250.0, gt=0, description="autotune: longest forward pass allowed for a batch")
    max_batch_delay_ms: float = Field(0.0, ge=0, description="extra wait for a fuller batch; 0: none")
    max_queue: int = Field(
        256,
        ge=1,
        description="clips waiting per model before new ones get 503 (queued, and as many waiting to be decoded)",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="a clip still queued after this gets 504")
    decode_timeout_s: float = Field(
        60.0,
        gt=0,
        description="an upload still not decoded this long after it was read gets 504 (a decoder that hangs)",
    )
    max_frames: int = Field(64, ge=1, description="most frames in one clip")
    max_upload_mb: float = Field(32.0, gt=0, description="largest request body")
    max_pixels: int = Field(4096 * 4096, ge=1, description="largest width x height of one decoded frame")
    api_key: SecretStr | None = Field(None, description="when set, required as Bearer token or X-API-Key")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's choice")
    wide_lane: bool = Field(
        True,
        description="on the CPU, run a forward pass that has every torch thread on one thread kept for that, "
        "with every other thread at one torch thread (app.runtime.CpuThreads); false: each pass sets its "
        "caller's threads",
    )
    instances: int | None = Field(
        None,
        ge=1,
        description="forward passes of a model that may run side by side on the CPU, sharing torch's threads; "
        "default: 2 on a CPU with two or more torch threads, 1 on CUDA",
    )
    share_from: int | None = Field(
        None,
        ge=1,
        description="with INSTANCES above 1, clips that must wait before a second forward pass starts beside "
        "a busy one; default: a quarter of the batch limit, or 1 where the warm-up measured no gain from "
        "batching (above 1.2x)",
    )
    encoder_pass_pixels: int = Field(
        PASS_PIXELS,
        ge=0,
        description="on the CPU: most pixels (frames x height x width) the frame encoder takes in one pass, "
        "so that a large batch needs the activation memory of one slice; 0: the whole batch at once",
    )
    decode_workers: int = Field(2, ge=1, description="threads that decode images and videos")
    decode_split_kb: float = Field(
        128.0,
        ge=0,
        description="a clip whose encoded frames total this many KB or more is decoded in two halves on two "
        "decode threads at once (when one is free); 0: every clip on one thread",
    )
    decode_processes: int | None = Field(
        None,
        ge=0,
        description="processes that decode /predict's images and videos instead of the decode threads; "
        "default: on CUDA half the usable cores up to 8, none under 4 (one process's interpreter cannot "
        "feed a GPU); on the CPU 0 (decode on threads in the server's process)",
    )
    memory_trim_s: float = Field(
        10.0,
        ge=0,
        description="on the CPU, hand free heap memory back to the system at most this often (seconds), once "
        "a batch is answered, so that RSS follows what is in use under sustained load, and once more when no "
        "batch has run for as long; 0: never",
    )
    keep_alive_s: int = Field(
        75,
        ge=1,
        description="seconds an idle HTTP keep-alive connection stays open; longer than clients' own expiry "
        "(httpx: 5 s) and load balancers' idle timeouts, so that the server never closes a connection just as "
        "a client sends a request on it",
    )
    loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="uvicorn's event loop; auto: uvloop when installed (uvicorn[standard] installs it)"
    )
    http: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="uvicorn's HTTP/1.1 parser; auto: httptools when installed (uvicorn[standard] installs it)"
    )
    warmup: bool = Field(True, description="run dummy batches before reporting ready")
    drain_s: float = Field(0.0, ge=0, description="after SIGTERM, seconds to report not-ready before closing")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @model_validator(mode="after")
    def _paths(self) -> Settings:
        if not self.checkpoint.exists():
            raise ValueError(f"checkpoint {self.checkpoint} does not exist")
        return self

    @property
    def longest_request_s(self) -> int:
        """How long an accepted request can take to be answered once its body is read: decoding, then
        waiting in the queue, then its batch (5 s). Shutdown waits this long for accepted requests."""
        return math.ceil(self.decode_timeout_s + self.request_timeout_s) + 5

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
