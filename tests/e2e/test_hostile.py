"""Hostile and careless clients against a real server: each finding gets its status, the server's memory
stays bounded, and a normal client is served meanwhile."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.media import encode, multipart_frames, synth_clip
from tests.support.servers import live_server, metric_value, spawn_server


@pytest.fixture(scope="module")
def server(default_ckpt: Path):  # type: ignore[no-untyped-def]
    with live_server(checkpoint=default_ckpt, max_batch_size=4) as url:
        yield url


def served_normally(url: str) -> None:
    """A well-behaved client gets its answer."""
    r = httpx.post(f"{url}/predict", files=multipart_frames([encode(f) for f in synth_clip(frames=4)]), timeout=30)
    assert r.status_code == 200, r.text


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_leaves_mid_body_is_counted_499_and_logs_no_traceback(default_ckpt: Path) -> None:
    with spawn_server("--max-batch-size", "2") as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=abc\r\n"
            s.sendall(head + b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
            time.sleep(0.3)
        served_normally(url)
        text = httpx.get(f"{url}/metrics").text
        assert metric_value(text, "fusionserve_requests_total", status="499") == 1
        assert metric_value(text, "fusionserve_requests_total", status="500") == 0
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


def test_binary_output_flags_must_be_json_booleans(server: str) -> None:
    body = {"inputs": [{"name": "frames", "datatype": "UINT8", "shape": [1, 1, 2, 2, 3], "data": [0] * 12}]}
    url = f"{server}/v2/models/moving-digits-lstm/infer"
    for params in ({"binary_data_output": "false"}, {"binary_data_output": 0}):
        r = httpx.post(url, json={**body, "parameters": params})
        assert r.status_code == 400 and "binary_data_output must be true or false" in r.json()["error"], r.text
    r = httpx.post(url, json={**body, "outputs": [{"name": "probabilities", "parameters": {"binary_data": "no"}}]})
    assert r.status_code == 400 and "binary_data must be true or false" in r.json()["error"]
    r = httpx.post(url, json={**body, "parameters": {"binary_data_output": False}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"


def test_error_messages_show_no_memory_addresses(server: str) -> None:
    files = [("frames", ("notes.txt", b"this is not an image at all\n" * 10, "text/plain"))]
    r = httpx.post(f"{server}/predict", files=files)
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "not a known image format" in message
    assert "0x" not in message and "object at" not in message, message


def test_a_part_without_a_name_is_refused_not_ignored(server: str) -> None:
    frame = encode(synth_clip(frames=1)[0])
    body = b'--abc\r\nContent-Disposition: form-data; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    body += frame + b"\r\n--abc--\r\n"
    r = httpx.post(f"{server}/predict", content=body, headers={"content-type": "multipart/form-data; boundary=abc"})
    assert r.status_code == 400 and "without a form-data name" in r.json()["error"]["message"], r.text


def portrait(orientation: int) -> tuple[bytes, np.ndarray]:
    """A JPEG stored sideways with an EXIF orientation, and the upright picture it shows."""
    upright = synth_clip("up", frames=1, size=64)[0].copy()
    upright[:32] = np.maximum(upright[:32], 200)  # a bright top half: which way is up shows
    stored = {6: np.rot90(upright, 1), 8: np.rot90(upright, -1), 3: upright[::-1, ::-1]}[orientation]
    image = Image.fromarray(np.ascontiguousarray(stored))
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue(), upright


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_honoured(server: str, orientation: int) -> None:
    turned, upright = portrait(orientation)
    answers = []
    for frame in (turned, encode(upright, "JPEG", quality=95)):
        r = httpx.post(f"{server}/predict", files=multipart_frames([frame] * 4), params={"top_k": 8})
        assert r.status_code == 200, r.text
        answers.append(np.array([r.json()["probabilities"][k] for k in sorted(r.json()["probabilities"])]))
    # the same picture up to JPEG's loss: the turned one is decoded upright (sideways it answers otherwise)
    np.testing.assert_allclose(answers[0], answers[1], atol=0.02)


def test_a_large_json_body_is_parsed_off_the_event_loop_and_bounded(default_ckpt: Path) -> None:
    with spawn_server("--max-batch-size", "2", "--max-json-mb", "8") as (proc, url):
        crowd = b'{"frames": [' + b"{}," * 2_500_000 + b"{}]}"  # 7.5 MB of objects: about 190 MB parsed
        before = rss_mb(proc.pid)
        stalls: list[float] = []
        done = threading.Event()

        def probe() -> None:
            with httpx.Client(timeout=10) as client:
                while not done.is_set():
                    started = time.perf_counter()
                    assert client.get(f"{url}/v2/health/live").status_code == 200
                    stalls.append(time.perf_counter() - started)
                    time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            r = httpx.post(f"{url}/predict", content=crowd, headers={"content-type": "application/json"}, timeout=60)
        finally:
            done.set()
            prober.join()
        assert r.status_code == 422 and "more than the limit" in r.json()["error"]["message"], r.text
        assert max(stalls) < 0.5, max(stalls)  # the loop kept answering while the body was parsed
        too_big = b'{"frames": ["' + b"A" * (9 * 1024 * 1024) + b'"]}'
        r = httpx.post(f"{url}/predict", content=too_big, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 413, r.text
        frames = [base64.b64encode(encode(f)).decode() for f in synth_clip(frames=3)]
        r = httpx.post(
            f"{url}/predict", content=json.dumps({"frames": frames}), headers={"content-type": "application/json"}
        )
        assert r.status_code == 200 and r.json()["frames"] == 3
        assert rss_mb(proc.pid) - before < 400  # one parse at a time per decode thread, each bounded
