"""``POST /predict``, ``POST /models/{name}/predict``, ``GET /models``, ``GET /models/{name}``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from app.api.common import ClientGone, answers
from app.batcher import Ticket
from app.decode import base64_frames, form_frames, video_frames
from app.deps import ServiceDep, require_api_key
from app.errors import bad_input, unsupported
from app.schemas import ErrorBody, ModelInfo, ModelList, Prediction, Timing, TopK
from app.state import ServedModel, Service

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["predict"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "undecodable input",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "too large",
        415: "unsupported media type",
        422: "wrong shape or frame count",
        503: "overloaded or not ready",
        504: "timed out in the queue",
    }.items()
}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "frames": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one part per frame, in order (JPEG, PNG, WebP, BMP)",
                        },
                        "video": {
                            "type": "string",
                            "format": "binary",
                            "description": "or one video (MP4, WebM, AVI, MKV, ...)",
                        },
                    },
                },
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "frames": {"type": "array", "items": {"type": "string", "format": "byte"}},
                        "video": {"type": "string", "format": "byte"},
                    },
                },
                "example": {"frames": ["/9j/4AAQSkZJRgABAQ...", "/9j/4AAQSkZJRgABAQ..."]},
            },
        },
    }
}

TopKQuery = Annotated[int, Query(ge=1, le=1000, description="how many labels to list in top_k")]
FramesQuery = Annotated[int | None, Query(ge=1, description="frames to sample from a video (default: the model's)")]


async def read_and_queue(
    request: Request, service: Service, served: ServedModel, tickets: list[Ticket], frames: int | None
) -> None:
    """Read the request body, whatever its form, and start decoding it on a decode thread (or in a
    decode process): one clip (T, C, H, W) uint8 at the model's size, queued under ``tickets``."""
    limits = served.limits

    def queue(decode: Callable[..., np.ndarray], *args: Any) -> None:
        service.decode_and_queue(served.batcher, tickets, decode, *args)

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":  # split into parts on the decode thread too
        queue(form_frames, await request.body(), request.headers["content-type"], limits, frames)
        return
    if content_type == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise bad_input(f"the body is not valid JSON ({type(exc).__name__})") from exc
        # a key set to null is absent: clients often write their optional fields that way
        video, images = (body.get("video"), body.get("frames")) if isinstance(body, dict) else (None, None)
        if video is None and images is None:
            raise bad_input('the JSON body must be {"frames": ["<base64 image>", ...]} or {"video": "<base64>"}')
        if video is not None and images is not None:
            raise bad_input('send "frames" or "video", not both')
        if video is not None:
            if not isinstance(video, str):
                raise bad_input(f'"video" must be a base64 string, not {type(video).__name__}')
            try:
                data = base64.b64decode(video, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise bad_input(f"video is not valid base64 ({exc})") from exc
            queue(video_frames, data, limits, frames)
            return
        if not isinstance(images, list):
            raise bad_input('"frames" must be a list of base64 strings')
        queue(base64_frames, images, limits)
        return
    raise unsupported(
        f"content type {content_type or 'none'!r} is not supported; "
        "send multipart/form-data (frames or video parts) or application/json"
    )


async def predict_with(
    request: Request, service: Service, name: str | None, top_k: int, frames: int | None
) -> Prediction | Response:
    started = time.perf_counter()
    service.check_accepting()
    served = service.model(name)
    tickets = served.batcher.tickets(1, asyncio.get_running_loop())
    await read_and_queue(request, service, served, tickets, frames)
    try:
        [result] = await answers(request, served.batcher, tickets)
    except ClientGone:
        return Response(status_code=499)
    [ticket] = tickets
    decoded = ticket.enqueued  # set by the decode thread when it queued the clip (perf_counter, as ``started``)
    service.metrics.decode_seconds.labels("request").observe(decoded - started)
    probs = result.probabilities.tolist()
    labels = served.runtime.labels
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    return Prediction(
        model=served.runtime.name,
        model_version=served.runtime.version,
        label=labels[order[0]],
        probabilities=dict(zip(labels, probs, strict=True)),
        top_k=[TopK(label=labels[i], probability=probs[i]) for i in order[:top_k]],
        frames=result.frames,
        timing_ms=Timing(
            decode=ms(decoded - started),
            queue=ms(result.queue_s),
            inference=ms(result.inference_s),
            total=ms(time.perf_counter() - started),
        ),
    )


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@router.post(
    "/predict",
    response_model=Prediction,
    responses=_ERRORS,
    openapi_extra=_PREDICT_BODY,
    summary="Classify a clip with the default model",
)
async def predict(
    request: Request, service: ServiceDep, top_k: TopKQuery = 5, frames: FramesQuery = None
) -> Prediction | Response:
    """Send frames (multipart `frames` parts in order, or JSON base64 `frames`) or one `video`.

    Frames of any size are resized to the model's input; a video is sampled evenly to
    the model's clip length unless `frames` asks for another count.
    """
    return await predict_with(request, service, None, top_k, frames)


@router.post(
    "/models/{name}/predict",
    response_model=Prediction,
    responses=_ERRORS,
    openapi_extra=_PREDICT_BODY,
    summary="Classify a clip with a named model",
)
async def predict_named(
    name: str, request: Request, service: ServiceDep, top_k: TopKQuery = 5, frames: FramesQuery = None
) -> Prediction | Response:
    """As `POST /predict`, for the model called `name`."""
    return await predict_with(request, service, name, top_k, frames)


def model_info(service: Service, served: ServedModel) -> ModelInfo:
    b = served.batcher
    return ModelInfo(
        **served.runtime.describe(),
        default=served.runtime.name == service.default_model,
        batching={
            "max_batch_size": b.max_batch_size,
            "max_batch_frames": b.max_batch_frames,
            "max_delay_ms": b.max_delay_s * 1000,
            "max_queue": b.max_queue,
            "instances": b.workers,
            "share_from": b.share_from,
            # on the CPU: torch threads, and whether a pass that has them all runs on the wide lane
            "torch_threads": service.threads.total if service.threads is not None else None,
            "wide_lane": service.threads.wide_lane if service.threads is not None else False,
            "timeout_s": b.timeout_s,
            "autotuned": served.tuning is not None,
            "tuning": served.tuning,
        },
    )


@router.get("/models", response_model=ModelList, summary="List the loaded models")
async def list_models(service: ServiceDep) -> ModelList:
    return ModelList(default=service.default_model, models=[model_info(service, m) for m in service.models.values()])


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    responses={404: _ERRORS[404]},
    summary="One model: version, labels, input spec, metrics, batching",
)
async def get_model(name: str, service: ServiceDep) -> ModelInfo:
    return model_info(service, service.model(name))
