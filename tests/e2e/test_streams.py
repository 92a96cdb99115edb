"""WebSocket streams and KServe v2 sequences through a real server: parity with /predict, step
batching across streams, limits and faults (tests/e2e/test_stream_load.py holds the load and the
shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from models import default_checkpoint
from tests.support.media import encode, multipart_frames, picture, synth_clip
from tests.support.servers import SERVER_KINDS, live_server, server_of
from tests.support.waiting import wait_for

LSTM, ATTENTION = "moving-digits-lstm", "moving-digits-attention"
KEY = "s3cret-key"


def ws_url(url: str, path: str = "/stream") -> str:
    return url.replace("http://", "ws://") + path


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both bundled models (the LSTM steps, the attention model answers from a window)."""
    # the step batch cap set, not measured: the batching test needs room for it on a busy machine
    settings = {"checkpoint": default_checkpoint().parent, "default_model": LSTM, "stream_max_batch": 64}
    with server_of(request.param, **settings) as url:
        yield url


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return np.concatenate([synth_clip("left", 12, seed=3), synth_clip("up", 12, seed=4)])  # (24, 32, 32, 3)


def predict(url: str, frames: np.ndarray, model: str) -> dict[str, float]:
    files = multipart_frames([encode(f, "PNG") for f in frames], "png")
    r = httpx.post(f"{url}/models/{model}/predict", files=files, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["probabilities"]


async def stream_answers(url: str, frames: np.ndarray, path: str = "/stream", **kw: Any) -> list[dict[str, Any]]:
    """Send every frame (PNG), then read one answer per frame."""
    async with connect(ws_url(url, path), **kw) as ws:
        for frame in frames:
            await ws.send(encode(frame, "PNG"))
        return [json.loads(await ws.recv()) for _ in frames]


def assert_probs_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(want)
    np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-4, rtol=0)


def test_a_stepped_stream_answers_each_frame_as_predict_on_the_frames_so_far(server: str, clip: np.ndarray) -> None:
    answers = asyncio.run(stream_answers(server, clip, "/stream?top_k=2"))
    assert [a["frame"] for a in answers] == list(range(len(clip)))
    for i, answer in enumerate(answers):
        assert_probs_close(answer["probabilities"], predict(server, clip[: i + 1], LSTM))
        assert len(answer["top_k"]) == 2 and answer["top_k"][0]["label"] == answer["label"]
        assert set(answer["timing_ms"]) == {"decode", "queue", "step", "total"}
    info = httpx.get(f"{server}/models/{LSTM}").json()
    assert info["streams"]["mode"] == "step"


def test_a_windowed_stream_answers_each_frame_as_predict_on_its_window(server: str, clip: np.ndarray) -> None:
    info = httpx.get(f"{server}/models/{ATTENTION}").json()
    assert info["streams"] == {"mode": "window", "window": 16, "max_batch": 64, "autotuned": False, "tuning": None}
    answers = asyncio.run(stream_answers(server, clip, f"/models/{ATTENTION}/stream"))
    for i, answer in enumerate(answers):
        assert answer["frame"] == i
        assert_probs_close(answer["probabilities"], predict(server, clip[max(0, i - 15) : i + 1], ATTENTION))


def test_reset_every_bad_frames_and_unknown_controls(server: str, clip: np.ndarray) -> None:
    async def session() -> list[dict[str, Any]]:
        async with connect(ws_url(server, "/stream?every=3")) as ws:
            for frame in clip[:6]:
                await ws.send(encode(frame, "PNG"))
            await ws.send(b"not an image")  # frame 6: an error, and the stream goes on
            await ws.send(json.dumps({"reset": True, "every": 1}))
            await ws.send("hello")  # not JSON
            await ws.send(json.dumps({"rewind": 3}))  # not a control
            await ws.send(json.dumps({"every": 0}))
            await ws.send(encode(clip[0], "PNG"))  # frame 0 again, of a new state
            await ws.send(encode(clip[1], "PNG"))
            return [json.loads(await ws.recv()) for _ in range(2 + 1 + 3 + 2)]

    got = asyncio.run(session())
    assert [a.get("frame") for a in got] == [2, 5, 6, None, None, None, 0, 1]  # every 3rd: frames 2 and 5
    assert got[2]["error"]["code"] == "bad_input" and "frame 6" in got[2]["error"]["message"]
    assert all(a["error"]["code"] == "bad_input" for a in got[3:6])
    assert "unknown control ['rewind']" in got[4]["error"]["message"]
    first = asyncio.run(stream_answers(server, clip[:2]))
    for after_reset, fresh in zip(got[6:], first, strict=True):
        np.testing.assert_allclose(
            list(after_reset["probabilities"].values()), list(fresh["probabilities"].values()), atol=1e-4
        )


def test_hostile_messages_get_their_own_error_and_the_stream_goes_on(server: str, clip: np.ndarray) -> None:
    broken_exif = b"\xff\xd8Exif\x00\x00garbage"  # a JPEG start and an EXIF marker, then nothing

    async def session() -> list[dict[str, Any]]:
        async with connect(ws_url(server)) as ws:
            await ws.send(broken_exif)
            await ws.send("[" * 3000 + "]" * 3000)  # a text message too long for a control
            await ws.send(encode(clip[0], "PNG"))
            return [json.loads(await ws.recv()) for _ in range(3)]

    bad_frame, bad_control, frame = asyncio.run(session())
    assert bad_frame["frame"] == 0 and bad_frame["error"]["code"] == "bad_input"
    assert "error" in bad_control and "frame" not in bad_control
    assert frame["frame"] == 1 and "label" in frame
    r = httpx.post(f"{server}/predict", files=[("frames", ("f.jpg", broken_exif, "image/jpeg"))])
    assert r.status_code == 400, r.text
    unknown = "модель-" * 30  # a close reason is cut to 123 bytes of UTF-8, not characters

    async def unknown_model() -> tuple[int, str]:
        async with connect(ws_url(server, f"/models/{unknown}/stream")) as ws:
            return await closed_with(ws)

    code, reason = asyncio.run(unknown_model())
    assert code == 1008 and reason.startswith("no model named") and len(reason.encode()) <= 123


def test_streams_at_once_are_stepped_in_shared_batches(server: str, clip: np.ndarray) -> None:
    async def many() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(stream_answers(server, clip[i : i + 12]) for i in range(8)))

    def batches() -> tuple[float, float]:
        text = httpx.get(f"{server}/metrics").text
        values = {}
        for line in text.splitlines():
            if line.startswith("fusionserve_step_batch_size_") and f'model="{LSTM}"' in line:
                values[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
        return values["fusionserve_step_batch_size_sum"], values["fusionserve_step_batch_size_count"]

    frames_before, batches_before = batches()
    results = asyncio.run(many())
    frames_after, batches_after = batches()
    assert frames_after - frames_before == 8 * 12
    assert (frames_after - frames_before) / (batches_after - batches_before) > 1  # frames of streams shared batches
    for i, answers in enumerate(results):  # and each stream's answers are its own
        assert_probs_close(answers[-1]["probabilities"], predict(server, clip[i : i + 12], LSTM))


def infer(client: triton.InferenceServerClient, frames: np.ndarray, **sequence: Any) -> np.ndarray:
    data = triton.InferInput("frames", [1, *frames.shape], "UINT8")
    data.set_data_from_numpy(frames[None])
    return client.infer(LSTM, [data], **sequence).as_numpy("probabilities")[0]


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_a_kserve_sequence_in_chunks_equals_the_whole_clip(server: str, clip: np.ndarray, chunk: int) -> None:
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    frames = clip[:15]
    seq = 1000 + chunk
    for start in range(0, 15, chunk):
        end = start + chunk
        got = infer(client, frames[start:end], sequence_id=seq, sequence_start=start == 0, sequence_end=end >= 15)
        np.testing.assert_allclose(got, infer(client, frames[:end]), atol=1e-4, rtol=0)
    with pytest.raises(InferenceServerException, match="not open") as ended:  # sequence_end closed it
        infer(client, frames[:1], sequence_id=seq)
    assert ended.value.status() == "400"


def test_kserve_sequences_by_string_id_and_their_errors(server: str, clip: np.ndarray) -> None:
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="not open"):
        infer(client, clip[:2], sequence_id="never-started")
    infer(client, clip[:4], sequence_id="cam-7", sequence_start=True)
    restarted = infer(client, clip[:4], sequence_id="cam-7", sequence_start=True)  # a start starts over
    np.testing.assert_allclose(restarted, infer(client, clip[:4]), atol=1e-4, rtol=0)
    two = np.stack([clip[:3], clip[3:6]])
    r = httpx.post(
        f"{server}/v2/models/{LSTM}/infer",
        json={
            "inputs": [{"name": "frames", "datatype": "UINT8", "shape": list(two.shape), "data": two.ravel().tolist()}],
            "parameters": {"sequence_id": 5, "sequence_start": True},
        },
    )
    assert r.status_code == 422 and "one clip" in r.json()["error"]
    r = httpx.post(
        f"{server}/v2/models/{LSTM}/infer",
        json={
            "inputs": [{"name": "frames", "datatype": "UINT8", "shape": [1, 1, 32, 32, 3], "data": [0] * 3072}],
            "parameters": {"sequence_id": [1]},
        },
    )
    assert r.status_code == 400 and "sequence_id" in r.json()["error"]
    r = httpx.post(
        f"{server}/v2/models/{LSTM}/infer",
        json={
            "inputs": [{"name": "frames", "datatype": "UINT8", "shape": [1, 1, 32, 32, 3], "data": [0] * 3072}],
            "parameters": {"sequence_id": False},  # not "no sequence": not an id at all
        },
    )
    assert r.status_code == 400 and "sequence_id" in r.json()["error"]


@pytest.fixture(scope="module")
def guarded() -> Iterator[str]:
    """A server with an API key, two stream places, a short idle timeout and small frame limits."""
    with live_server(api_key=KEY, max_streams=2, stream_idle_s=1.5, max_upload_mb=0.5, max_pixels=64 * 64) as url:
        yield url


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


def test_the_api_key_by_header_or_by_subprotocol(guarded: str, clip: np.ndarray) -> None:
    async def check() -> None:
        async with connect(ws_url(guarded)) as ws:
            assert await closed_with(ws) == (
                1008,
                "an API key is required (Authorization: Bearer, X-API-Key, or a bearer.<key> protocol)",
            )
        async with connect(ws_url(guarded), additional_headers={"X-API-Key": "wrong"}) as ws:
            assert await closed_with(ws) == (1008, "wrong API key")
        answers = await stream_answers(guarded, clip[:2], additional_headers={"Authorization": f"Bearer {KEY}"})
        assert [a["frame"] for a in answers] == [0, 1]
        async with connect(
            ws_url(guarded), subprotocols=[Subprotocol("fusionserve"), Subprotocol(f"bearer.{KEY}")]
        ) as ws:  # as a browser can
            assert ws.subprotocol == "fusionserve"
            await ws.send(encode(clip[0], "PNG"))
            assert json.loads(await ws.recv())["frame"] == 0

    asyncio.run(check())


def test_too_many_streams_idle_streams_and_expired_sequences(guarded: str, clip: np.ndarray) -> None:
    auth = {"X-API-Key": KEY}

    async def check() -> None:
        async with (
            connect(ws_url(guarded), additional_headers=auth) as a,
            connect(ws_url(guarded), additional_headers=auth) as b,
        ):
            for ws in (a, b):
                await ws.send(encode(clip[0], "PNG"))
                assert json.loads(await ws.recv())["frame"] == 0
            async with connect(ws_url(guarded), additional_headers=auth) as third:
                code, reason = await closed_with(third)
                assert code == 1013 and "MAX_STREAMS=2" in reason
            r = httpx.post(  # a sequence takes a place too
                f"{guarded}/v2/models/{LSTM}/infer",
                headers=auth,
                json={
                    "inputs": [{"name": "frames", "datatype": "UINT8", "shape": [1, 1, 32, 32, 3], "data": [0] * 3072}],
                    "parameters": {"sequence_id": 9, "sequence_start": True},
                },
            )
            assert r.status_code == 503 and r.headers["retry-after"]
            started = time.monotonic()
            code, reason = await closed_with(a)  # a says nothing more: idle
            assert code == 1000 and reason.startswith("idle") and time.monotonic() - started < 5

    asyncio.run(check())
    client = triton.InferenceServerClient(guarded.removeprefix("http://"))
    data = triton.InferInput("frames", [1, 2, 32, 32, 3], "UINT8")
    data.set_data_from_numpy(clip[None, :2])
    client.infer(LSTM, [data], headers=auth, sequence_id=3, sequence_start=True)
    client.infer(LSTM, [data], headers=auth, sequence_id=3)
    time.sleep(1.5 + 1.5)  # idle past STREAM_IDLE_S, and the expiry's next look
    with pytest.raises(InferenceServerException, match="not open"):
        client.infer(LSTM, [data], headers=auth, sequence_id=3)


def test_frames_past_the_limits(guarded: str, clip: np.ndarray) -> None:
    auth = {"X-API-Key": KEY}

    async def check() -> None:
        async with connect(ws_url(guarded), additional_headers=auth) as ws:
            await ws.send(encode(picture(128, 128), "PNG"))  # 16 K pixels, over MAX_PIXELS: that frame's error
            await ws.send(encode(clip[0], "PNG"))
            too_many = json.loads(await ws.recv())
            assert too_many["frame"] == 0 and too_many["error"]["code"] == "too_large"
            assert json.loads(await ws.recv())["frame"] == 1
            await ws.send(b"\xff" * (600 * 1024))  # over MAX_UPLOAD_MB: the message closes the stream
            assert (await closed_with(ws))[0] == 1009
        r = httpx.get(f"{guarded}/v2/health/live")  # and the server is fine
        assert r.status_code == 200

    asyncio.run(check())


def test_a_client_that_reads_no_answers_loses_its_stream(guarded: str, clip: np.ndarray) -> None:
    """Its answers fill the socket, its frames fill STREAM_QUEUE, and after STREAM_IDLE_S without room
    the server drops the connection: the place is free again, and the socket is closed."""
    host, port = guarded.removeprefix("http://").split(":")

    def open_streams() -> float:
        text = httpx.get(f"{guarded}/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("fusionserve_streams_open{") and 'kind="stream"' in line
        )

    async def check() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that takes almost nothing
        sock.connect((host, int(port)))
        frame = encode(clip[0], "PNG")
        async with connect(ws_url(guarded), sock=sock, max_queue=1, additional_headers={"X-API-Key": KEY}) as ws:

            async def flood() -> None:
                with contextlib.suppress(ConnectionClosed, OSError):
                    while True:
                        await ws.send(frame)

            sender = asyncio.ensure_future(flood())
            assert await asyncio.to_thread(wait_for, lambda: open_streams() == 1, 10)
            started = time.monotonic()
            assert await asyncio.to_thread(wait_for, lambda: open_streams() == 0, 30)
            assert time.monotonic() - started > 1.0  # not before STREAM_IDLE_S without room
            await asyncio.wait_for(sender, 30)
            print("sender failed after", time.monotonic() - started)  # the server dropped the socket: sending fails
            sender.result()

    asyncio.run(check())
