"""Response bodies, as pydantic models so the OpenAPI docs show them with examples."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TopK(BaseModel):
    label: str
    probability: float


class Timing(BaseModel):
    decode: float = Field(description="decoding and resizing the input, ms")
    queue: float = Field(description="waiting for a batch, ms")
    inference: float = Field(description="the batch's forward pass, ms")
    total: float = Field(description="from request start to answer, ms")


class Prediction(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "moving-digits-lstm",
                    "model_version": "1",
                    "label": "left",
                    "probabilities": {
                        "left": 0.97,
                        "right": 0.01,
                        "up": 0.004,
                        "down": 0.004,
                        "clockwise": 0.003,
                        "counterclockwise": 0.003,
                        "zoom_in": 0.003,
                        "zoom_out": 0.003,
                    },
                    "top_k": [{"label": "left", "probability": 0.97}, {"label": "right", "probability": 0.01}],
                    "frames": 12,
                    "timing_ms": {"decode": 1.9, "queue": 0.1, "inference": 6.2, "total": 8.9},
                }
            ]
        },
    )
    model: str
    model_version: str
    label: str
    probabilities: dict[str, float]
    top_k: list[TopK]
    frames: int
    timing_ms: Timing
    frame_importance: list[float] | None = Field(
        None,
        description="with explain=frames: per frame, how much the predicted label's probability falls "
        "when that frame is left out (a one-frame clip: its probability above 1 / labels)",
    )
    attention: list[float] | None = Field(
        None, description="with explain=frames, for heads that pool by attention: each frame's pooling weight"
    )


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str
    version: str
    default: bool
    labels: list[str]
    input: dict[str, Any]
    metrics: dict[str, Any]
    arch: dict[str, Any]
    device: str
    precision: str = Field(description="fp32, or bf16 (autocast) on a GPU that supports it")
    cuda_graphs: bool = Field(description="equal-length batches replay captured CUDA graphs")
    compiled: bool = Field(description="the CNN runs through torch.compile")
    encoder: dict[str, Any] = Field(
        description="the frame encoder: name (small_cnn, resnet, timm:NAME, torchvision:NAME), parameters, "
        "FLOPs per frame at the input size"
    )
    batchnorm_folded: int = Field(description="batch norms folded into the convolution before them at load")
    frames_per_pass: int | None = Field(
        description="on the CPU, most frames the encoder takes in one pass (ENCODER_PASS_PIXELS); null: a whole batch"
    )
    created_at: str
    batching: dict[str, Any]
    streams: dict[str, Any] = Field(
        description="how /stream and v2 sequences run it: mode step (a state per stream, one head step per "
        "frame) or window (the head on the last `window` frames), and the most frames per step batch"
    )


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class V2ErrorBody(BaseModel):
    """The KServe v2 protocol's error body."""

    error: str
