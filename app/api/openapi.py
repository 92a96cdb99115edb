"""What the OpenAPI document says of the routes whose bodies FastAPI cannot infer: the error
statuses of both surfaces, the /predict request body (multipart or JSON), and the v2 inference body.

A schema cannot say "bytes that decode as a JPEG" or "data whose length matches its shape": such
requests are schema-valid and still get 400 or 422, which the error statuses document.
"""

from __future__ import annotations

from typing import Any

from app.api.schemas import ErrorBody, V2ErrorBody

INPUT, OUTPUT = "frames", "probabilities"  # the v2 tensors' names

_STATUSES = {
    400: "undecodable input",
    401: "missing or wrong API key",
    404: "unknown model (or version)",
    413: "too large",
    415: "unsupported media type or content encoding",
    422: "wrong shape or frame count",
    503: "overloaded or not ready (Retry-After)",
    504: "timed out",
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in _STATUSES.items()
}
V2_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2ErrorBody, "description": text} for code, text in _STATUSES.items()
}

# a 2x2 PNG: the JSON example is a request the server answers
EXAMPLE_FRAME = (
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP4paGh8UuDQUPj169fGgAmnAX7JLrnRAAAAABJRU5ErkJggg=="
)
_FRAMES_OR_VIDEO = [{"required": ["frames"]}, {"required": ["video"]}]  # one of them, not null

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
                    "additionalProperties": False,
                    "description": "frames parts, or one video part",
                },
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "frames": {
                            "type": ["array", "null"],
                            "minItems": 1,
                            "items": {"type": "string", "format": "byte"},
                            "description": "base64 images, in order; null is absent",
                        },
                        "video": {"type": ["string", "null"], "format": "byte", "description": "or a base64 video"},
                    },
                    "anyOf": _FRAMES_OR_VIDEO,
                },
                "example": {"frames": [EXAMPLE_FRAME, EXAMPLE_FRAME]},
            },
        },
    }
}

_V2_INPUT = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "enum": [INPUT]},
        "datatype": {"type": "string", "enum": ["UINT8"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 5, "maxItems": 5},
        "data": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
        "parameters": {"type": ["object", "null"]},
    },
}
_V2_OUTPUT = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "enum": [OUTPUT]},
        "parameters": {
            "type": ["object", "null"],
            "properties": {
                "binary_data": {"type": "boolean"},
                "classification": {"type": ["integer", "null"], "minimum": 1},
            },
        },
    },
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": ["string", "null"]},
                        "inputs": {"type": "array", "items": _V2_INPUT, "minItems": 1, "maxItems": 1},
                        "outputs": {"type": ["array", "null"], "items": _V2_OUTPUT},
                        "parameters": {
                            "type": ["object", "null"],
                            "properties": {"binary_data_output": {"type": "boolean"}},
                        },
                    },
                },
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
            "description": "the probabilities, as JSON or as a JSON header and binary tensors",
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
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}
