"""KServe v2 / Open Inference Protocol routes: health, metadata, readiness and inference.

Input ``frames``: UINT8 ``[B, T, H, W, C]`` (frames of other sizes are resized); output
``probabilities``: FP32 ``[B, K]``. The bodies are parsed and written in ``app.api.kserve``.
Errors are ``{"error": "..."}`` (``app.api.errors``).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from app import __version__
from app.api.deps import ServiceDep, ServingDep, disconnected, require_api_key
from app.api.kserve import InferRequest, encode_output, parse_infer
from app.api.openapi import INFER_BODY, INPUT, OUTPUT, V2_ERRORS
from app.errors import NotFound
from app.preprocess import tensor_to_clips
from app.served import ModelView, ServedModel
from app.service import Service, Serving

HEADER = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "classification"]

health = APIRouter(prefix="/v2", tags=["kserve-v2"])
router = APIRouter(prefix="/v2", tags=["kserve-v2"], dependencies=[Depends(require_api_key)])
infer_router = APIRouter(prefix="/v2", tags=["kserve-v2"], dependencies=[Depends(require_api_key)])  # front ends too


_AUTH: dict[int | str, dict[str, Any]] = {401: V2_ERRORS[401]}
_MODEL: dict[int | str, dict[str, Any]] = {code: V2_ERRORS[code] for code in (401, 404)}


@router.get("", summary="Server metadata", responses=_AUTH)
async def server_metadata() -> dict[str, Any]:
    return {"name": "fusionserve", "version": __version__, "extensions": EXTENSIONS}


@health.get("/health/live", summary="Liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@health.get(
    "/health/ready",
    summary="Readiness: every model loaded and warmed, not shutting down, uploads not at their limit",
    responses={503: {"description": "not ready"}},
)
async def ready(service: ServiceDep) -> JSONResponse:
    ok = service.accepting
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


def served_version(service: Serving, name: str, version: str | None) -> ModelView:
    served = service.model(name)
    if version not in (None, "", served.version):
        raise NotFound(f"model {name!r} has no version {version!r}; it serves {served.version!r}")
    return served


def metadata(served: ServedModel) -> dict[str, Any]:
    spec = served.spec
    return {
        "name": served.name,
        "versions": [served.version],
        "platform": "fusionserve_pytorch",
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, -1, spec.height, spec.width, spec.channels]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(served.labels)]}],
        "parameters": {"labels": served.labels},
    }


@router.get("/models/{name}", summary="Model metadata", responses=_MODEL)
async def model_metadata(name: str, service: ServiceDep) -> dict[str, Any]:
    return metadata(service.model(name))


@router.get("/models/{name}/versions/{version}", summary="Model metadata, of one version", responses=_MODEL)
async def model_version_metadata(name: str, version: str, service: ServiceDep) -> dict[str, Any]:
    served_version(service, name, version)
    return metadata(service.model(name))


def readiness(service: Service, served: ServedModel) -> JSONResponse:
    ok = service.accepting
    return JSONResponse({"name": served.name, "ready": ok}, status_code=200 if ok else 503)


_READY: dict[int | str, dict[str, Any]] = {**_MODEL, 503: {"description": "not ready"}}


@router.get("/models/{name}/ready", summary="Model readiness", responses=_READY)
async def model_ready(name: str, service: ServiceDep) -> JSONResponse:
    return readiness(service, service.model(name))


@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness, of one version", responses=_READY)
async def model_version_ready(name: str, version: str, service: ServiceDep) -> JSONResponse:
    served_version(service, name, version)
    return readiness(service, service.model(name))


@infer_router.post(
    "/models/{name}/infer",
    summary="Inference (JSON, or JSON header + binary tensors)",
    openapi_extra=INFER_BODY,
    responses=V2_ERRORS,
)
async def infer(name: str, request: Request, service: ServingDep) -> Response:
    return await infer_with(request, service, name, None)


@infer_router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference on one version",
    openapi_extra=INFER_BODY,
    responses=V2_ERRORS,
)
async def infer_version(name: str, version: str, request: Request, service: ServingDep) -> Response:
    return await infer_with(request, service, name, version)


async def infer_with(request: Request, service: Serving, name: str, version: str | None) -> Response:
    service.check_accepting()
    served = served_version(service, name, version)
    body = await request.body()
    intake = service.intake
    max_clips = served.max_queue
    req: InferRequest = await intake.off_loop(parse_infer, body, request.headers.get(HEADER), served.target, max_clips)
    clips: list[torch.Tensor] = await intake.off_loop(tensor_to_clips, req.array, served.target.format)
    if req.sequence is not None:
        seq = req.sequence
        probs = (await service.append_sequence(served, seq.id, seq.start, seq.end, clips[0]))[None]
    else:
        results = await intake.classify_clips(served, clips, partial(disconnected, request))
        probs = torch.stack([r.probabilities for r in results]).numpy()
    output, raw = encode_output(probs, served.labels, req.binary_output, req.classification)
    reply: dict[str, Any] = {"model_name": served.name, "model_version": served.version, "outputs": [output]}
    if req.id is not None:
        reply["id"] = req.id
    head = json.dumps(reply).encode()
    if not raw:
        return Response(head, media_type="application/json")
    return Response(head + raw, media_type="application/octet-stream", headers={HEADER: str(len(head))})
