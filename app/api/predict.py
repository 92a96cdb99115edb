"""``POST /predict``, ``POST /models/{name}/predict``, ``GET /models``, ``GET /models/{name}``."""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request

from app.api.deps import ServiceDep, ServingDep, disconnected, require_api_key
from app.api.openapi import ERRORS, PREDICT_BODY
from app.api.schemas import ModelInfo, ModelList, Prediction, Timing, TopK
from app.errors import UnsupportedMedia
from app.explain import Explained
from app.served import ModelView, ServedModel
from app.service import Service, Serving
from app.uploads import Upload

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["predict"])  # classifying: served by front ends too
models_router = APIRouter(dependencies=[Depends(require_api_key)], tags=["predict"])

TopKQuery = Annotated[int, Query(ge=1, le=1000, description="how many labels to list in top_k")]
FramesQuery = Annotated[int | None, Query(ge=1, description="frames to sample from a video (default: the model's)")]
ExplainQuery = Annotated[
    Literal["frames"] | None,
    Query(description="frames: add each frame's importance (leave-one-out) and attention pooling weights"),
]


async def read_upload(request: Request, frames: int | None) -> Upload:
    """The request body as an upload, parsed later on a decode thread: a multipart form or JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return Upload("form", await request.body(), request.headers["content-type"], frames)
    if content_type == "application/json":
        return Upload("json", await request.body(), content_type, frames)
    raise UnsupportedMedia(
        f"content type {content_type or 'none'!r} is not supported; "
        "send multipart/form-data (frames or video parts) or application/json"
    )


async def predict_with(
    request: Request, service: Serving, name: str | None, top_k: int, frames: int | None, explaining: bool = False
) -> Prediction:
    started = time.perf_counter()
    service.check_accepting()
    served = service.model(name)
    upload = await read_upload(request, frames)
    gone = partial(disconnected, request)
    if explaining:
        return explanation(served, await service.explain(served, upload, gone), top_k, started)
    answer = await service.intake.classify(served, upload, gone)
    service.metrics.decode_seconds.labels("request").observe(answer.queued_at - started)
    result = answer.result
    timing = (answer.queued_at - started, result.queue_s, result.inference_s)
    return prediction(served, result.probabilities.tolist(), result.frames, top_k, timing, started)


def prediction(
    served: ModelView,
    probs: list[float],
    frames: int,
    top_k: int,
    timing: tuple[float, float, float],
    started: float,
    **extra: list[float] | None,
) -> Prediction:
    """The answer for a clip of ``frames`` frames with ``probs``; ``timing``: its decode, queue and
    inference seconds."""
    labels = served.labels
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    decode, queue, inference = timing
    return Prediction(
        model=served.name,
        model_version=served.version,
        label=labels[order[0]],
        probabilities=dict(zip(labels, probs, strict=True)),
        top_k=[TopK(label=labels[i], probability=probs[i]) for i in order[:top_k]],
        frames=frames,
        timing_ms=Timing(
            decode=ms(decode), queue=ms(queue), inference=ms(inference), total=ms(time.perf_counter() - started)
        ),
        **extra,
    )


def explanation(served: ModelView, result: Explained, top_k: int, started: float) -> Prediction:
    ex = result.explanation
    timing = (result.decode_s, 0.0, result.inference_s)
    attention = None if ex.attention is None else ex.attention.tolist()
    return prediction(
        served,
        ex.probabilities.tolist(),
        result.frames,
        top_k,
        timing,
        started,
        frame_importance=ex.importance.tolist(),
        attention=attention,
    )


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@router.post(
    "/predict",
    response_model=Prediction,
    response_model_exclude_none=True,
    responses=ERRORS,
    openapi_extra=PREDICT_BODY,
    summary="Classify a clip with the default model",
)
async def predict(
    request: Request,
    service: ServingDep,
    top_k: TopKQuery = 5,
    frames: FramesQuery = None,
    explain: ExplainQuery = None,
) -> Prediction:
    """Send frames (multipart `frames` parts in order, or JSON base64 `frames`) or one `video`.

    Frames of any size are resized to the model's input; a video is sampled evenly to
    the model's clip length unless `frames` asks for another count. `explain=frames` adds each
    frame's importance (the predicted label's probability drop when it is left out) and, for
    attention pooling, each frame's weight; it costs a head pass over T^2 frames beside the batches.
    """
    return await predict_with(request, service, None, top_k, frames, explain == "frames")


@router.post(
    "/models/{name}/predict",
    response_model=Prediction,
    response_model_exclude_none=True,
    responses=ERRORS,
    openapi_extra=PREDICT_BODY,
    summary="Classify a clip with a named model",
)
async def predict_named(
    name: str,
    request: Request,
    service: ServingDep,
    top_k: TopKQuery = 5,
    frames: FramesQuery = None,
    explain: ExplainQuery = None,
) -> Prediction:
    """As `POST /predict`, for the model called `name`."""
    return await predict_with(request, service, name, top_k, frames, explain == "frames")


def model_info(service: Service, served: ServedModel) -> ModelInfo:
    policy, threads = served.batcher.policy, service.loaded.threads
    return ModelInfo(
        **served.runtime.describe(),
        default=served.name == service.default_model,
        batching={
            "max_batch_size": policy.max_batch_size,
            "max_batch_frames": policy.max_batch_frames,
            "max_delay_ms": policy.max_delay_s * 1000,
            "max_queue": policy.max_queue,
            "instances": policy.instances,
            "share_from": policy.share_from,
            # on the CPU: torch threads, and whether a pass that has them all runs on the wide lane
            "torch_threads": threads.total,
            "wide_lane": threads.wide_lane,
            "timeout_s": policy.timeout_s,
            "autotuned": served.tuning is not None,
            "tuning": served.tuning,
        },
        streams={
            "mode": served.stepper.mode,
            "window": served.stepper.window if served.stepper.mode == "window" else None,
            "max_batch": served.stepper.max_batch,
            "autotuned": served.stepper.tuning is not None,
            "tuning": served.stepper.tuning,
        },
    )


@models_router.get("/models", response_model=ModelList, summary="List the loaded models")
async def list_models(service: ServiceDep) -> ModelList:
    return ModelList(default=service.default_model, models=[model_info(service, m) for m in service.models.values()])


@models_router.get(
    "/models/{name}",
    response_model=ModelInfo,
    responses={404: ERRORS[404]},
    summary="One model: version, labels, input spec, metrics, batching",
)
async def get_model(name: str, service: ServiceDep) -> ModelInfo:
    return model_info(service, service.model(name))
