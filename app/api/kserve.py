"""The KServe v2 / Open Inference Protocol's request and response bodies, for the ``frames`` input
and the ``probabilities`` output.

Parsing runs on a decode thread, off the event loop. Supports the binary tensor data extension
(``binary_data_size`` inputs after the JSON header, ``binary_data`` outputs) and the
classification extension (``"classification": k`` on an output gives BYTES
``"<probability>:<index>:<label>"``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.api.openapi import INPUT, OUTPUT
from app.errors import BadInput, TooLarge, WrongShape
from app.uploads import Target


@dataclass(frozen=True)
class SequenceParams:
    """A request's place in a sequence, as tritonclient sends it: ``sequence_id`` (a non-zero integer
    or a non-empty string), ``sequence_start``, ``sequence_end``."""

    id: int | str
    start: bool
    end: bool


@dataclass(frozen=True)
class InferRequest:
    array: np.ndarray  # uint8 (B, T, H, W, C)
    binary_output: bool
    classification: int | None
    id: str | None
    sequence: SequenceParams | None = None


def parse_infer(body: bytes, header_length: str | None, target: Target, max_clips: int) -> InferRequest:
    """Validate a whole v2 inference request (runs on the decode threads, off the event loop)."""
    request, binary = parse_request(body, header_length)
    array = input_array(request, binary, target, max_clips)
    binary_output, classification = output_options(request)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInput(f"the request id must be a string, got {type(request_id).__name__}")
    sequence = sequence_params(parameters(request, "the request"))
    if sequence is not None and array.shape[0] != 1:
        raise WrongShape(f"a sequence's input {INPUT!r} holds one clip, [1, T, H, W, C]; got {array.shape[0]}")
    return InferRequest(array, binary_output, classification, request_id, sequence)


def sequence_params(params: dict[str, Any]) -> SequenceParams | None:
    """The sequence a request belongs to, or None (no ``sequence_id``, or Triton's 0 or "": none)."""
    seq_id = params.get("sequence_id")
    start, end = flag(params, "sequence_start", False), flag(params, "sequence_end", False)
    if seq_id is not None and (isinstance(seq_id, bool) or not isinstance(seq_id, int | str)):
        raise BadInput(f"sequence_id must be an integer or a string, got {seq_id!r}")
    if seq_id is None or seq_id == 0 or seq_id == "":
        if start or end:
            raise BadInput("sequence_start and sequence_end need a sequence_id")
        return None
    return SequenceParams(seq_id, start, end)


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes | memoryview]:
    if header_length is not None:
        if not re.fullmatch(r"[0-9]{1,12}", header_length) or int(header_length) > len(body):
            raise BadInput(
                f"Inference-Header-Content-Length {header_length!r} does not fit a body of {len(body)} bytes"
            )
        split = int(header_length)
        head = body[:split]
        binary: bytes | memoryview = memoryview(body)[split:]  # the tensor's bytes: a view, not a copy
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadInput(f"the inference request is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(request, dict):
        raise BadInput("the inference request must be a JSON object")
    return request, binary


def parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadInput(f"parameters of {where} must be a JSON object")
    return params


def input_array(request: dict[str, Any], binary: bytes | memoryview, target: Target, max_clips: int) -> np.ndarray:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise WrongShape(f"send exactly one input, {INPUT!r}")
    spec = inputs[0]
    if spec.get("name") != INPUT:
        raise WrongShape(f"unknown input {spec.get('name')!r}; this model takes {INPUT!r}")
    if spec.get("datatype") != "UINT8":
        raise WrongShape(f"input {INPUT!r} must be UINT8, got {spec.get('datatype')!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) != 5 or not all(type(d) is int and d >= 0 for d in shape):
        raise WrongShape(f"input shape must be [B, T, H, W, {target.format.channels}] of integers >= 0, got {shape!r}")
    clips, frames, height, width, channels = shape
    if channels != target.format.channels:
        raise WrongShape(f"frames must have {target.format.channels} channels, got {channels}")
    if clips == 0 or height == 0 or width == 0:
        raise WrongShape(f"input shape {shape} has an empty dimension")
    if clips > max_clips:
        raise TooLarge(f"a batch of {clips} clips is more than the {max_clips} this model queues; split it")
    target.check_count(frames)
    if height * width > target.limits.max_pixels:
        raise TooLarge(f"frames are {width}x{height}, more than {target.limits.max_pixels} pixels")
    count = math.prod(shape)
    size = parameters(spec, f"input {INPUT!r}").get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != count or size > len(binary):
            raise WrongShape(
                f"binary_data_size {size!r} does not match shape {shape} ({count} bytes) "
                f"or the {len(binary)} bytes sent"
            )
        return np.frombuffer(binary, dtype=np.uint8, count=size).reshape(shape)  # the body's bytes, not a copy
    data = spec.get("data")
    if data is None:
        raise BadInput(f"input {INPUT!r} has neither data nor binary_data_size")
    try:  # no dtype: numpy would truncate 255.9 to 255 and parse "7"; only JSON integers are UINT8 data
        flat = np.asarray(data).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadInput(f"input data must be integers ({exc})") from exc
    if flat.size and flat.dtype.kind not in "iu":
        kind = {"f": "floating-point numbers", "b": "booleans", "U": "strings"}.get(flat.dtype.kind, "mixed values")
        raise BadInput(f"UINT8 input data must be JSON integers, got {kind}")
    if flat.size != count:
        raise WrongShape(f"input has {flat.size} values but shape {shape} needs {count}")
    if flat.min() < 0 or flat.max() > 255:
        raise BadInput("UINT8 input values must be in 0..255")
    return flat.astype(np.uint8).reshape(shape)


def flag(params: dict[str, Any], name: str, default: bool) -> bool:
    """A boolean parameter: JSON ``true`` or ``false`` only (the string "false" is not false)."""
    value = params.get(name, default)
    if type(value) is not bool:
        raise BadInput(f"parameter {name} must be true or false, got {value!r}")
    return value


def output_options(request: dict[str, Any]) -> tuple[bool, int | None]:
    """(binary output?, classification top-k or None) for the ``probabilities`` output."""
    binary = flag(parameters(request, "the request"), "binary_data_output", False)
    classification = None
    outputs = request.get("outputs")
    outputs = [] if outputs is None else outputs
    if not isinstance(outputs, list):
        raise BadInput("outputs must be a list")
    for out in outputs:
        if not isinstance(out, dict) or out.get("name") != OUTPUT:
            raise WrongShape(
                f"unknown output {out.get('name') if isinstance(out, dict) else out!r}; this model gives {OUTPUT!r}"
            )
        params = parameters(out, f"output {OUTPUT!r}")
        binary = flag(params, "binary_data", binary)
        if params.get("classification") is not None:
            k = params["classification"]
            if type(k) is not int or k < 1:
                raise BadInput(f"classification must be a positive integer, got {k!r}")
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
