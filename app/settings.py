"""Service settings: ``FUSIONSERVE_*`` environment variables, or the same names as flags of ``python -m app``.

The settings are grouped by what they tune (``GROUPS``); every group's fields are flat fields of
``Settings``, so each keeps its one variable and its one flag. docs/configuration.md says when
and why to change each. This module imports no torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PASS_PIXELS = 64 * 64 * 64  # ENCODER_PASS_PIXELS: 64 frames of 64x64


class ModelSettings(BaseModel):
    checkpoint: Path | None = Field(
        None, description="a .safetensors checkpoint or a folder of them; default: the bundled model"
    )
    default_model: str | None = Field(None, description="the model /predict serves; default: the first loaded")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that has it, else fp32"
    )
    cuda_graphs: bool = Field(True, description="on CUDA, replay batches of equal clips from captured CUDA graphs")
    compile: bool = Field(False, description="torch.compile the CNN at start (a slower start)")
    warmup: bool = Field(True, description="run dummy batches before reporting ready")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @model_validator(mode="after")
    def _checkpoint_exists(self) -> ModelSettings:
        if self.checkpoint is not None and not self.checkpoint.exists():
            raise ValueError(f"checkpoint {self.checkpoint} does not exist")
        return self


class BatchingSettings(BaseModel):
    max_batch_size: int = Field(32, ge=1, description="most clips in one batch (set: no autotune)")
    max_batch_frames: int = Field(512, ge=1, description="most frames in one batch; a longer lone clip still runs")
    autotune: bool = Field(True, description="measure the model at start and pick the batch limits")
    latency_budget_ms: float = Field(250.0, gt=0, description="autotune: the longest forward pass a batch may take")
    max_batch_delay_ms: float = Field(0.0, ge=0, description="extra wait for a fuller batch; 0: none")
    max_queue: int = Field(256, ge=1, description="clips queued per model (and uploads awaiting decoding) before 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a clip queued longer than this gets 504")
    instances: int | None = Field(
        None, ge=1, description="forward passes per model side by side (CPU); default 2, CUDA 1"
    )
    share_from: int | None = Field(None, ge=1, description="clips waiting before a second instance joins a busy one")


class DecodingSettings(BaseModel):
    max_frames: int = Field(64, ge=1, description="most frames in one clip")
    max_pixels: int = Field(4096 * 4096, ge=1, description="largest width x height of one frame")
    max_decoded_frames: int = Field(10_000, ge=1, description="most frames decoded from one video (413 past it)")
    decode_workers: int = Field(2, ge=1, description="threads that decode images and videos")
    decode_processes: int | None = Field(
        None, ge=0, description="processes that decode uploads; default: CUDA 4+ cores, else 0"
    )
    decode_split_kb: float = Field(128.0, ge=0, description="a clip of this many KB decodes in two halves; 0: never")
    decode_timeout_s: float = Field(
        60.0, gt=0, description="an upload not decoded this long after it was read gets 504"
    )
    gpu_decode: bool = Field(
        True, description="on CUDA, decode JPEG frames on the GPU (nvJPEG) where torchvision can; the rest on the CPU"
    )


class CpuSettings(BaseModel):
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's choice")
    wide_lane: bool = Field(True, description="a pass with every torch thread runs on one thread kept for it")
    encoder_pass_pixels: int = Field(
        PASS_PIXELS, ge=0, description="most pixels per encoder pass on the CPU; 0: no slices"
    )


class MemorySettings(BaseModel):
    memory_trim_s: float = Field(
        10.0, ge=0, description="hand free heap memory back at most this often (CPU); 0: never"
    )
    max_inflight_mb: float | None = Field(
        None, gt=0, description="request bodies in flight, server-wide, before 503; default: a quarter of memory"
    )


class HttpSettings(BaseModel):
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    max_upload_mb: float = Field(32.0, gt=0, description="largest request body, on the wire and inflated")
    max_json_mb: float = Field(4.0, gt=0, description="largest JSON body (parsed, JSON takes up to about 25x its size)")
    keep_alive_s: int = Field(75, ge=1, description="seconds an idle keep-alive connection stays open")
    max_connections: int = Field(1000, ge=1, description="open connections; past them a new one gets 503")
    max_header_kb: float = Field(64.0, gt=0, description="largest request head (request line and headers)")
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must arrive within this")
    body_timeout_s: float = Field(60.0, gt=0, description="a request's body must arrive within this")
    body_min_kbps: float = Field(8.0, ge=0, description="a body arriving slower than this (after 5 s) is cut off")
    loop: Literal["auto", "asyncio", "uvloop"] = Field("auto", description="uvicorn's event loop")
    http: Literal["auto", "h11", "httptools"] = Field("auto", description="uvicorn's HTTP/1.1 parser")
    drain_s: float = Field(0.0, ge=0, description="after SIGTERM, seconds of 503 on readiness before closing")
    frontends: int = Field(
        1, ge=1, description="HTTP processes sharing the port, beside one engine process that runs the models"
    )
    frontend_shm_mb: float = Field(
        256.0, gt=0, description="shared memory per front end for the decoded clips it hands the engine"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    page: bool = Field(True, description="serve the page at / to browsers (JSON clients get the summary either way)")


class StreamSettings(BaseModel):
    max_streams: int = Field(256, ge=1, description="open streams and KServe sequences, server-wide; past it 1013/503")
    stream_idle_s: float = Field(60.0, gt=0, description="a stream or sequence with no frame for this long is closed")
    stream_queue: int = Field(8, ge=1, description="frames a stream may have waiting before its socket is not read")
    stream_max_batch: int = Field(64, ge=1, description="most frames in one cross-stream step batch (set: no autotune)")
    max_timeline_frames: int = Field(20_000, ge=1, description="most frames a timeline samples from one video")
    max_video_mb: float = Field(256.0, gt=0, description="largest video a timeline request may upload")


class SecuritySettings(BaseModel):
    api_key: SecretStr | None = Field(None, description="when set, required as Bearer token or X-API-Key")


GROUPS: dict[str, type[BaseModel]] = {
    "models": ModelSettings,
    "batching": BatchingSettings,
    "decoding": DecodingSettings,
    "CPU": CpuSettings,
    "memory": MemorySettings,
    "HTTP": HttpSettings,
    "streams": StreamSettings,
    "security": SecuritySettings,
}


class Settings(
    ModelSettings,
    BatchingSettings,
    DecodingSettings,
    CpuSettings,
    MemorySettings,
    HttpSettings,
    StreamSettings,
    SecuritySettings,
    BaseSettings,
):
    model_config = SettingsConfigDict(env_prefix="FUSIONSERVE_", extra="ignore")

    @property
    def longest_request_s(self) -> int:
        """How long an accepted request can take once its body is read: decoding, waiting in the queue,
        then its batch (5 s). Shutdown waits this long for accepted requests."""
        return math.ceil(self.decode_timeout_s + self.request_timeout_s) + 5

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def is_set(self, name: str) -> bool:
        """Whether ``name`` was given (by variable, flag or argument), not left at its default."""
        return name in self.model_fields_set
