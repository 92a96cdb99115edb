"""The KServe v2 bodies on their own (app.api.kserve): requests parsed and validated, answers encoded,
with the binary tensor data and classification extensions. tests/e2e/test_kserve.py sends them
through a real server with tritonclient."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.api.kserve import encode_output, parse_infer
from app.errors import BadInput, TooLarge, WrongShape
from app.preprocess import tensor_to_clips
from app.uploads import Target
from media import FrameFormat, Limits

TARGET = Target(FrameFormat(4, 4, 3), 8, Limits(max_frames=16, max_pixels=64 * 64))


def request(shape: list[int], **spec: object) -> dict[str, object]:
    return {"id": "r1", "inputs": [{"name": "frames", "datatype": "UINT8", "shape": shape, **spec}]}


def test_a_json_request_gives_its_tensor_and_options() -> None:
    data = list(range(2 * 3 * 4 * 4 * 3))
    body = request([2, 3, 4, 4, 3], data=[v % 256 for v in data])
    body["outputs"] = [{"name": "probabilities", "parameters": {"classification": 2}}]
    req = parse_infer(json.dumps(body).encode(), None, TARGET, max_clips=4)
    assert req.array.shape == (2, 3, 4, 4, 3) and req.array.dtype == np.uint8
    assert req.array.reshape(-1).tolist() == [v % 256 for v in data]
    assert (req.binary_output, req.classification, req.id) == (False, 2, "r1")


def test_a_binary_request_reads_its_tensor_after_the_json_header() -> None:
    pixels = np.arange(1 * 2 * 4 * 4 * 3, dtype=np.uint8)
    head = json.dumps(request([1, 2, 4, 4, 3], parameters={"binary_data_size": pixels.size})).encode()
    body = head + pixels.tobytes()
    req = parse_infer(body, str(len(head)), TARGET, max_clips=4)
    assert np.array_equal(req.array.reshape(-1), pixels)
    assert np.shares_memory(req.array, np.frombuffer(body, dtype=np.uint8))  # the body's bytes, not a copy
    clips = tensor_to_clips(req.array, FrameFormat(4, 4, 3))
    assert np.shares_memory(clips[0].numpy(), req.array)  # at the model's size: still no copy


@pytest.mark.parametrize(
    ("body", "header", "error", "message"),
    [
        (b"{not json", None, BadInput, "not valid JSON"),
        (json.dumps(request([1, 2, 4, 4, 3], data=[0.5] * 96)).encode(), None, BadInput, "JSON integers"),
        (json.dumps(request([1, 2, 4, 4, 3], data=[300] * 96)).encode(), None, BadInput, "0..255"),
        (json.dumps(request([1, 2, 4, 4, 3], data=[0] * 95)).encode(), None, WrongShape, "95 values"),
        (json.dumps(request([1, 2, 4, 4, 1], data=[0] * 32)).encode(), None, WrongShape, "3 channels"),
        (json.dumps(request([9, 2, 4, 4, 3], data=[0] * 864)).encode(), None, TooLarge, "9 clips"),
        (json.dumps(request([1, 17, 4, 4, 3], data=[0] * 816)).encode(), None, WrongShape, "limit of 16"),
        (json.dumps(request([1, 1, 100, 100, 3], data=[0] * 30000)).encode(), None, TooLarge, "100x100"),
        (b"{}", "99", BadInput, "does not fit"),
    ],
)
def test_bad_requests_raise_the_error_that_names_the_problem(
    body: bytes, header: str | None, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        parse_infer(body, header, TARGET, max_clips=8)


def test_outputs_as_json_binary_or_classification_strings() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    labels = ["a", "b", "c"]
    out, raw = encode_output(probs, labels, binary=False, classification=None)
    assert out == {"name": "probabilities", "datatype": "FP32", "shape": [2, 3], "data": probs.reshape(-1).tolist()}
    assert raw == b""
    out, raw = encode_output(probs, labels, binary=True, classification=None)
    assert out["parameters"] == {"binary_data_size": 24} and np.array_equal(np.frombuffer(raw, "<f4"), probs.ravel())
    out, _ = encode_output(probs, labels, binary=False, classification=2)
    assert out["shape"] == [2, 2] and out["data"] == ["0.700000:0:a", "0.200000:1:b", "0.600000:2:c", "0.300000:1:b"]
