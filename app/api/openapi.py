"""What the OpenAPI document says of the routes whose bodies FastAPI cannot infer: the error
statuses, the /predict request body (multipart or JSON), and the v2 inference body."""

from __future__ import annotations

from typing import Any

from app.api.schemas import ErrorBody

INPUT, OUTPUT = "frames", "probabilities"  # the v2 tensors' names

ERRORS: dict[int | str, dict[str, Any]] = {
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
PREDICT_BODY = {
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

INFER_BODY = {
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
