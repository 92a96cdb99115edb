"""KServe v2 / Open Inference Protocol: health, metadata, readiness and inference.

Input ``frames``: UINT8 ``[B, T, H, W, C]`` (frames of other sizes are resized);
output ``probabilities``: FP32 ``[B, K]``. Supports the binary tensor data extension
(``binary_data_size`` inputs after the JSON header, ``binary_data`` outputs) and the
classification extension (``"classification": k`` on an output gives BYTES
``"<probability>:<index>:<label>"``). Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from app import __version__
from app.api.common import ClientGone, run_clips
from app.decode import InputLimits, check_count
from app.deps import ServiceDep, require_api_key
from app.errors import bad_input, not_found, not_ready, too_large, wrong_shape
from app.preprocess import tensor_to_clips
from app.state import ServedModel, Service

HEADER = "inference-header-content-length"
INPUT, OUTPUT = "frames", "probabilities"
EXTENSIONS = ["binary_tensor_data", "classification"]

health = APIRouter(prefix="/v2", tags=["kserve-v2"])
router = APIRouter(prefix="/v2", tags=["kserve-v2"], dependencies=[Depends(require_api_key)])


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "fusionserve", "version": __version__, "extensions": EXTENSIONS}


@health.get("/health/live", summary="Liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@health.get("/health/ready", summary="Readiness: every model loaded and warmed, not shutting down")
async def ready(service: ServiceDep) -> JSONResponse:
    ok = service.ready and not service.draining
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


def served_version(service: Service, name: str, version: str | None) -> ServedModel:
    served = service.model(name)
    if version not in (None, "", served.runtime.version):
        raise not_found(f"model {name!r} has no version {version!r}; it serves {served.runtime.version!r}")
    return served


def metadata(served: ServedModel) -> dict[str, Any]:
    limits, rt = served.limits, served.runtime
    return {
        "name": rt.name,
        "versions": [rt.version],
        "platform": "fusionserve_pytorch",
        "inputs": [
            {"name": INPUT, "datatype": "UINT8", "shape": [-1, -1, limits.height, limits.width, limits.channels]}
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(rt.labels)]}],
        "parameters": {"labels": rt.labels},
    }


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def model_metadata(name: str, service: ServiceDep, version: str | None = None) -> dict[str, Any]:
    return metadata(served_version(service, name, version))


@router.get("/models/{name}/ready", summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(name: str, service: ServiceDep, version: str | None = None) -> JSONResponse:
    served = served_version(service, name, version)
    ok = service.ready and not service.draining
    return JSONResponse({"name": served.runtime.name, "ready": ok}, status_code=200 if ok else 503)


@dataclass(frozen=True)
class InferRequest:
    array: np.ndarray  # uint8 (B, T, H, W, C)
    binary_output: bool
    classification: int | None
    id: Any


def parse_infer(body: bytes, header_length: str | None, limits: InputLimits, max_clips: int) -> InferRequest:
    """Validate a whole v2 inference request (runs on the decode threads, off the event loop)."""
    request, binary = parse_request(body, header_length)
    array = input_array(request, binary, limits, max_clips)
    binary_output, classification = output_options(request)
    return InferRequest(array, binary_output, classification, request.get("id"))


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is not None:
        if not re.fullmatch(r"[0-9]{1,12}", header_length) or int(header_length) > len(body):
            raise bad_input(
                f"Inference-Header-Content-Length {header_length!r} does not fit a body of {len(body)} bytes"
            )
        split = int(header_length)
        head, binary = body[:split], body[split:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad_input(f"the inference request is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(request, dict):
        raise bad_input("the inference request must be a JSON object")
    return request, binary


def parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_input(f"parameters of {where} must be a JSON object")
    return params


def input_array(request: dict[str, Any], binary: bytes, limits: InputLimits, max_clips: int) -> np.ndarray:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise wrong_shape(f"send exactly one input, {INPUT!r}")
    spec = inputs[0]
    if spec.get("name") != INPUT:
        raise wrong_shape(f"unknown input {spec.get('name')!r}; this model takes {INPUT!r}")
    if spec.get("datatype") != "UINT8":
        raise wrong_shape(f"input {INPUT!r} must be UINT8, got {spec.get('datatype')!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) != 5 or not all(type(d) is int and d >= 0 for d in shape):
        raise wrong_shape(f"input shape must be [B, T, H, W, {limits.channels}] of integers >= 0, got {shape!r}")
    clips, frames, height, width, channels = shape
    if channels != limits.channels:
        raise wrong_shape(f"frames must have {limits.channels} channels, got {channels}")
    if clips == 0 or height == 0 or width == 0:
        raise wrong_shape(f"input shape {shape} has an empty dimension")
    if clips > max_clips:
        raise too_large(f"a batch of {clips} clips is more than the {max_clips} this model queues; split it")
    check_count(frames, limits)
    if height * width > limits.max_pixels:
        raise too_large(f"frames are {width}x{height}, more than {limits.max_pixels} pixels")
    count = math.prod(shape)
    size = parameters(spec, f"input {INPUT!r}").get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != count or size > len(binary):
            raise wrong_shape(
                f"binary_data_size {size!r} does not match shape {shape} ({count} bytes) "
                f"or the {len(binary)} bytes sent"
            )
        return np.frombuffer(binary, dtype=np.uint8, count=size).reshape(shape).copy()  # writable for torch
    data = spec.get("data")
    if data is None:
        raise bad_input(f"input {INPUT!r} has neither data nor binary_data_size")
    try:  # no dtype: numpy would truncate 255.9 to 255 and parse "7"; only JSON integers are UINT8 data
        flat = np.asarray(data).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise bad_input(f"input data must be integers ({exc})") from exc
    if flat.size and flat.dtype.kind not in "iu":
        kind = {"f": "floating-point numbers", "b": "booleans", "U": "strings"}.get(flat.dtype.kind, "mixed values")
        raise bad_input(f"UINT8 input data must be JSON integers, got {kind}")
    if flat.size != count:
        raise wrong_shape(f"input has {flat.size} values but shape {shape} needs {count}")
    if flat.min() < 0 or flat.max() > 255:
        raise bad_input("UINT8 input values must be in 0..255")
    return flat.astype(np.uint8).reshape(shape)


def output_options(request: dict[str, Any]) -> tuple[bool, int | None]:
    """(binary output?, classification top-k or None) for the ``probabilities`` output."""
    binary = bool(parameters(request, "the request").get("binary_data_output", False))
    classification = None
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list):
        raise bad_input("outputs must be a list")
    for out in outputs:
        if not isinstance(out, dict) or out.get("name") != OUTPUT:
            raise wrong_shape(
                f"unknown output {out.get('name') if isinstance(out, dict) else out!r}; this model gives {OUTPUT!r}"
            )
        params = parameters(out, f"output {OUTPUT!r}")
        binary = bool(params.get("binary_data", binary))
        if params.get("classification") is not None:
            k = params["classification"]
            if type(k) is not int or k < 1:
                raise bad_input(f"classification must be a positive integer, got {k!r}")
            classification = k
    return binary, classification


def encode_output(
    probs: np.ndarray, labels: list[str], binary: bool, classification: int | None
) -> tuple[dict[str, Any], bytes]:
    B, K = probs.shape
    if classification is None:
        out: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": [B, K]}
        raw = probs.astype("<f4").tobytes()
        data: list[Any] = probs.reshape(-1).tolist()
    else:
        k = min(classification, K)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        strings = [f"{probs[b, i]:.6f}:{i}:{labels[i]}" for b in range(B) for i in order[b]]
        out = {"name": OUTPUT, "datatype": "BYTES", "shape": [B, k]}
        raw = b"".join(len(s.encode()).to_bytes(4, "little") + s.encode() for s in strings)
        data = strings
    if binary:
        out["parameters"] = {"binary_data_size": len(raw)}
        return out, raw
    out["data"] = data
    return out, b""


_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object"},
                "example": {
                    "id": "42",
                    "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [1, 2, 2, 2, 3], "data": [0] * 24}],
                    "outputs": [{"name": OUTPUT, "parameters": {"classification": 3}}],
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "JSON header (length in Inference-Header-Content-Length), then the raw tensors; "
                "inputs carry parameters.binary_data_size",
            },
        },
    },
    "responses": {
        "200": {
            "content": {
                "application/json": {
                    "example": {
                        "model_name": "moving-digits-lstm",
                        "model_version": "1",
                        "id": "42",
                        "outputs": [
                            {
                                "name": OUTPUT,
                                "datatype": "BYTES",
                                "shape": [1, 3],
                                "data": ["0.970000:0:left", "0.010000:1:right", "0.004000:2:up"],
                            }
                        ],
                    }
                }
            }
        }
    },
}


@router.post(
    "/models/{name}/infer", summary="Inference (JSON, or JSON header + binary tensors)", openapi_extra=_INFER_BODY
)
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(name: str, request: Request, service: ServiceDep, version: str | None = None) -> Response:
    if service.draining or not service.ready:
        raise not_ready("the server is not ready" if not service.draining else "the server is shutting down")
    served = served_version(service, name, version)
    body = await request.body()
    req: InferRequest = await service.in_pool(
        parse_infer, body, request.headers.get(HEADER), served.limits, served.batcher.max_queue
    )
    clips: list[torch.Tensor] = await service.in_pool(tensor_to_clips, req.array, served.limits)
    try:
        results = await run_clips(request, served.batcher, clips)
    except ClientGone:
        return Response(status_code=499)
    probs = torch.stack([r.probabilities for r in results]).numpy()
    output, raw = encode_output(probs, served.runtime.labels, req.binary_output, req.classification)
    reply: dict[str, Any] = {
        "model_name": served.runtime.name,
        "model_version": served.runtime.version,
        "outputs": [output],
    }
    if req.id is not None:
        reply["id"] = req.id
    head = json.dumps(reply).encode()
    if not raw:
        return Response(head, media_type="application/json")
    return Response(head + raw, media_type="application/octet-stream", headers={HEADER: str(len(head))})
