"""KServe v2 / Open Inference Protocol, driven by the official tritonclient HTTP client."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support.media import encode, multipart_frames, synth_clip
from tests.support.servers import SERVER_KINDS, server_of

MODEL = "moving-digits-lstm"


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(default_ckpt: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    with server_of(request.param, checkpoint=default_ckpt) as url:
        yield url


@pytest.fixture
def client(server: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=server.removeprefix("http://"))


def batch() -> np.ndarray:
    """Two clips of 8 frames at the model's size: uint8 (2, 8, 32, 32, 3)."""
    return np.stack([synth_clip("right", frames=8, seed=5), synth_clip("zoom_out", frames=8, seed=6)])


def predict_json(server: str, clip: np.ndarray) -> np.ndarray:
    """The same clip through /predict as lossless PNG frames."""
    r = httpx.post(f"{server}/predict", files=multipart_frames([encode(f, "PNG") for f in clip], "png"), timeout=30)
    assert r.status_code == 200, r.text
    labels = httpx.get(f"{server}/models/{MODEL}").json()["labels"]
    return np.array([r.json()["probabilities"][k] for k in labels])


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    server_meta = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server_meta["extensions"])
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "frames", "datatype": "UINT8", "shape": [-1, -1, 32, 32, 3]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 8]}]


@pytest.mark.parametrize("binary_in,binary_out", [(False, False), (True, True), (True, False)])
def test_infer_matches_predict(
    server: str, client: triton.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    frames = batch()
    inp = triton.InferInput("frames", list(frames.shape), "UINT8")
    inp.set_data_from_numpy(frames, binary_data=binary_in)
    out = triton.InferRequestedOutput("probabilities", binary_data=binary_out)
    result = client.infer(MODEL, [inp], outputs=[out], request_id="req-1")
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (2, 8)
    assert result.get_response()["id"] == "req-1"
    for i in range(2):
        np.testing.assert_allclose(probs[i], predict_json(server, frames[i]), atol=1e-5)


def test_classification_extension(client: triton.InferenceServerClient) -> None:
    frames = batch()
    inp = triton.InferInput("frames", list(frames.shape), "UINT8")
    inp.set_data_from_numpy(frames, binary_data=True)
    result = client.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("probabilities", class_count=3)])
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    full = client.infer(MODEL, [inp]).as_numpy("probabilities")
    for b in range(2):
        entries = [c.decode().split(":") for c in classes[b]]
        assert [int(idx) for _, idx, _ in entries] == list(np.argsort(-full[b], kind="stable")[:3])
        assert entries[0][2] == ("right" if b == 0 else "zoom_out")
        np.testing.assert_allclose([float(v) for v, _, _ in entries], np.sort(full[b])[::-1][:3], atol=1e-6)


def test_frames_of_other_sizes_are_resized(client: triton.InferenceServerClient) -> None:
    frames = np.stack([synth_clip("up", frames=6, seed=7, size=48)])
    inp = triton.InferInput("frames", list(frames.shape), "UINT8")
    inp.set_data_from_numpy(frames)
    assert client.infer(MODEL, [inp]).as_numpy("probabilities").shape == (1, 8)


@pytest.mark.parametrize(
    "shape,dtype,data,status",
    [
        ([2, 8, 32, 32], "UINT8", None, 422),  # 4-D
        ([1, 2, 32, 32, 3], "FP32", None, 422),  # wrong datatype
        ([1, 2, 32, 32, 3], "UINT8", [1, 2, 3], 422),  # data does not fill the shape
        ([1, 1, 2, 2, 3], "UINT8", [300] * 12, 400),  # not uint8 values
    ],
)
def test_wrong_shape_or_datatype(
    server: str, shape: list[int], dtype: str, data: list[int] | None, status: int
) -> None:
    n = int(np.prod(shape))
    body = {"inputs": [{"name": "frames", "shape": shape, "datatype": dtype, "data": data or [0] * n}]}
    r = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


def test_unknown_model_and_version(server: str, client: triton.InferenceServerClient) -> None:
    r = httpx.post(f"{server}/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    assert httpx.get(f"{server}/v2/models/{MODEL}/versions/99").status_code == 404
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("nope")


def test_binary_header_length_mismatch(server: str) -> None:
    r = httpx.post(
        f"{server}/v2/models/{MODEL}/infer",
        content=b'{"inputs": []}',
        headers={"Inference-Header-Content-Length": "999", "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]


@pytest.mark.parametrize(
    "body,status",
    [
        (
            {
                "inputs": [
                    {
                        "name": "frames",
                        "shape": [1, 1, 2, 2, 3],
                        "datatype": "UINT8",
                        "data": [0] * 12,
                        "parameters": "x",
                    }
                ]
            },
            400,
        ),
        (
            {
                "inputs": [{"name": "frames", "shape": [1, 1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12}],
                "parameters": [1],
            },
            400,
        ),
        (
            {
                "inputs": [{"name": "frames", "shape": [1, 1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12}],
                "outputs": [{"name": "probabilities", "parameters": 3}],
            },
            400,
        ),
        ({"inputs": [{"name": "frames", "shape": [1, 1, 0, 0, 3], "datatype": "UINT8", "data": []}]}, 422),
        ({"inputs": [{"name": "frames", "shape": [True, True, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12}]}, 422),
        ({"inputs": [{"name": "frames", "shape": [1, 1, 2**32, 2**32, 3], "datatype": "UINT8", "data": []}]}, 413),
        (
            {
                "inputs": [
                    {
                        "name": "frames",
                        "shape": [100000, 1, 1, 1, 3],
                        "datatype": "UINT8",
                        "parameters": {"binary_data_size": 300000},
                    }
                ]
            },
            413,
        ),
        ({"inputs": "frames"}, 422),
        ({"inputs": [{"name": "frames", "shape": [1, 1, 2, 2, 3], "datatype": "UINT8", "data": [[0, 1], "x"]}]}, 400),
    ],
)
def test_malformed_requests_get_4xx_not_500(server: str, body: dict, status: int) -> None:
    r = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str)


@pytest.mark.parametrize(
    ("data", "kind"), [([255.9, -0.9, 7], "floating-point"), (["7", "8", "9"], "strings"), ([True] * 3, "booleans")]
)
def test_uint8_data_that_is_not_integers_is_refused_not_truncated(server: str, data: list, kind: str) -> None:
    body = {"inputs": [{"name": "frames", "shape": [1, 1, 1, 1, 3], "datatype": "UINT8", "data": data}]}
    r = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 400, r.text
    assert "must be JSON integers" in r.json()["error"] and kind in r.json()["error"]
    body["inputs"][0]["data"] = [255, 0, 7]  # the same request with integers is served
    assert httpx.post(f"{server}/v2/models/{MODEL}/infer", json=body).status_code == 200


def test_hostile_bodies_get_400(server: str) -> None:
    deep = b"[" * 100_000
    r = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    r = httpx.post(
        f"{server}/v2/models/{MODEL}/infer",
        content=b'{"inputs": []}',
        headers=[(b"Inference-Header-Content-Length", "\u00b2".encode("latin-1"))],
    )
    assert r.status_code == 400, r.text
    r = httpx.post(f"{server}/predict", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_input"
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary_in", [False, True])
def test_compressed_requests_from_tritonclient(
    client: triton.InferenceServerClient, algorithm: str, binary_in: bool
) -> None:
    frames = batch()
    inp = triton.InferInput("frames", list(frames.shape), "UINT8")
    inp.set_data_from_numpy(frames, binary_data=binary_in)
    plain = client.infer(MODEL, [inp]).as_numpy("probabilities")
    packed = client.infer(MODEL, [inp], request_compression_algorithm=algorithm).as_numpy("probabilities")
    np.testing.assert_array_equal(packed, plain)


def test_compressed_bodies_that_are_bombs_broken_or_unknown(server: str) -> None:
    frames = [encode(f) for f in synth_clip("up", frames=3, seed=4)]
    form = httpx.Request("POST", f"{server}/predict", files=multipart_frames(frames))
    body, ctype = form.read(), form.headers["content-type"]
    plain = httpx.post(f"{server}/predict", content=body, headers={"content-type": ctype})
    packed = httpx.post(
        f"{server}/predict", content=gzip.compress(body), headers={"content-type": ctype, "content-encoding": "gzip"}
    )
    assert plain.status_code == packed.status_code == 200
    assert packed.json()["probabilities"] == plain.json()["probabilities"]
    url = f"{server}/v2/models/{MODEL}/infer"
    json_type = {"content-type": "application/json"}
    bomb = zlib.compress(b" " * (40 << 20), 9)  # 40 MB of spaces in about 40 KB, over the 32 MB limit
    r = httpx.post(url, content=bomb, headers={**json_type, "content-encoding": "deflate"})
    assert r.status_code == 413 and "inflates to more than" in r.json()["error"], r.text
    r = httpx.post(url, content=b"not gzip at all", headers={**json_type, "content-encoding": "gzip"})
    assert r.status_code == 400 and "does not inflate" in r.json()["error"], r.text
    r = httpx.post(
        url, content=gzip.compress(b'{"inputs": []}')[:-12], headers={**json_type, "content-encoding": "gzip"}
    )
    assert r.status_code == 400 and "truncated" in r.json()["error"], r.text
    r = httpx.post(f"{server}/predict", content=body, headers={"content-type": ctype, "content-encoding": "br"})
    assert r.status_code == 415 and "'br' is not supported" in r.json()["error"]["message"], r.text
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
