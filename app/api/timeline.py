"""``POST /timeline``, ``POST /models/{name}/timeline``: a long video's labels over time."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict

from app.api.deps import ServiceDep, disconnected, require_api_key
from app.api.openapi import ERRORS, PREDICT_BODY
from app.api.predict import read_upload
from app.served import ServedModel
from app.service import Service
from app.timeline import Placement, Timeline, timeline

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["timeline"])

# frames sampled per second: above any video's frame rate more would only repeat frames; below a
# frame per 1000 s, a few frames' times would overflow to infinity, which JSON cannot carry
MIN_FPS, MAX_FPS = 0.001, 1000.0

FpsQuery = Annotated[
    float,
    Query(ge=MIN_FPS, le=MAX_FPS, description="frames sampled per second of video (frames parts: their rate)"),
]
WindowQuery = Annotated[
    int | None, Query(ge=1, description="sampled frames per window (default: the model's clip length)")
]
StrideQuery = Annotated[
    int | None, Query(ge=1, description="sampled frames between window starts (default: half a window)")
]


class Segment(BaseModel):
    start_s: float
    end_s: float
    label: str
    probabilities: dict[str, float]


class TimelineAnswer(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "moving-digits-lstm",
                    "fps": 8.0,
                    "duration_s": 3.0,
                    "frames": 24,
                    "segments": [
                        {"start_s": 0.0, "end_s": 2.0, "label": "left", "probabilities": {"left": 0.97, "...": 0.0}},
                        {"start_s": 1.0, "end_s": 3.0, "label": "up", "probabilities": {"up": 0.88, "...": 0.0}},
                    ],
                }
            ]
        },
    )
    model: str
    fps: float
    duration_s: float
    frames: int
    segments: list[Segment]


def answer(served: ServedModel, result: Timeline) -> TimelineAnswer:
    labels = served.labels
    segments = []
    for i, probs in enumerate(result.probabilities.tolist()):
        start_s, end_s = result.span(i)
        best = max(range(len(probs)), key=probs.__getitem__)
        segments.append(
            Segment(
                start_s=start_s,
                end_s=end_s,
                label=labels[best],
                probabilities=dict(zip(labels, probs, strict=True)),
            )
        )
    return TimelineAnswer(
        model=served.name,
        fps=result.fps,
        duration_s=round(result.duration_s, 6),
        frames=result.frames,
        segments=segments,
    )


async def timeline_with(
    request: Request, service: Service, name: str | None, fps: float, window: int | None, stride: int | None
) -> TimelineAnswer:
    service.check_accepting()
    served = service.model(name)
    placement = Placement.of(served.target, fps, window, stride)  # a bad window is refused before the body is read
    upload = await read_upload(request, None)
    settings = service.settings
    with service.intake.holding(served):
        result = await timeline(
            service.loaded.decoders,
            served,
            upload,
            placement,
            max_frames=settings.max_timeline_frames,
            timeout_s=settings.decode_timeout_s,
            disconnected=partial(disconnected, request),
        )
    return answer(served, result)


@router.post(
    "/timeline",
    response_model=TimelineAnswer,
    responses=ERRORS,
    openapi_extra=PREDICT_BODY,
    summary="Label a long video over time with the default model",
)
async def post_timeline(
    request: Request,
    service: ServiceDep,
    fps: FpsQuery = 8.0,
    window: WindowQuery = None,
    stride: StrideQuery = None,
) -> TimelineAnswer:
    """Send one `video` part (or `frames` parts, or JSON, as for `/predict`).

    The video is sampled at `fps` frames per second; the model answers every window of `window`
    sampled frames, one starting every `stride` frames. Frames sent as images are taken as
    sampled at `fps` already. Each sampled frame is encoded once.
    """
    return await timeline_with(request, service, None, fps, window, stride)


@router.post(
    "/models/{name}/timeline",
    response_model=TimelineAnswer,
    responses=ERRORS,
    openapi_extra=PREDICT_BODY,
    summary="Label a long video over time with a named model",
)
async def post_timeline_named(
    name: str,
    request: Request,
    service: ServiceDep,
    fps: FpsQuery = 8.0,
    window: WindowQuery = None,
    stride: StrideQuery = None,
) -> TimelineAnswer:
    """As `POST /timeline`, for the model called `name`."""
    return await timeline_with(request, service, name, fps, window, stride)
