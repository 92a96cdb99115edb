"""Hostile and careless clients against a real server: each finding gets its status, the server's memory
stays bounded, and a normal client is served meanwhile."""

from __future__ import annotations

import base64
import contextlib
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

from tests.support.media import encode, mjpeg, multipart_frames, synth_clip
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


def test_video_frames_past_the_pixel_limit_are_refused_at_the_first_and_memory_stays_bounded(
    default_ckpt: Path,
) -> None:
    from tests.media.test_video import h264, jpeg, numbered

    with spawn_server("--max-batch-size", "2", "--max-pixels", str(1024 * 1024)) as (proc, url):
        before = rss_mb(proc.pid)
        video = mjpeg([jpeg(16, 16)] + [jpeg(3000, 3000)] * 20)  # a small header, then 9 M-pixel frames
        r = httpx.post(f"{url}/predict", files={"video": ("v.avi", video, "video/x-msvideo")}, timeout=60)
        assert r.status_code == 413 and "more than 1048576 pixels" in r.json()["error"]["message"], r.text
        grown = h264(numbered(4, (64, 64))) + h264(numbered(2, (1024, 1032)))  # H.264 that grows mid-stream
        r = httpx.post(f"{url}/predict", files={"video": ("v.h264", grown, "video/h264")}, timeout=60)
        assert r.status_code == 413, r.text
        served_normally(url)
        assert rss_mb(proc.pid) - before < 100  # no frame past the limit was converted


def test_a_video_that_needs_more_frames_decoded_than_the_bound_is_refused(default_ckpt: Path, tmp_path: Path) -> None:
    from tests.media.test_video import numbered
    from tests.support.media import write_video

    video = write_video(tmp_path / "long.mp4", numbered(240), fps=10).read_bytes()  # a keyframe every 4 frames
    with live_server(checkpoint=default_ckpt, max_batch_size=2, max_decoded_frames=40) as url:
        files = {"video": ("long.mp4", video, "video/mp4")}
        r = httpx.post(f"{url}/predict", files=files, params={"frames": 8})  # 8 targets: at most 32 decoded
        assert r.status_code == 200 and r.json()["frames"] == 8, r.text
        r = httpx.post(f"{url}/predict", files=files, params={"frames": 60})  # about 2 decoded per target
        assert r.status_code == 413 and "more than 40 frames decoded" in r.json()["error"]["message"], r.text


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes, from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / 100


def heavy_pngs(count: int, side: int = 1600) -> list[bytes]:
    """Large PNG frames: each takes tens of milliseconds to decode, whatever the model's size."""
    y, x = np.mgrid[0:side, 0:side]
    picture = np.stack([(x * 7 + y * 3) % 256, (x * y) % 256, (x ^ y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, "PNG")
    return [buf.getvalue()] * count


@pytest.mark.parametrize("processes", [0, 2], ids=["decode-threads", "decode-processes"])
def test_a_decode_whose_request_timed_out_stops_within_a_second(default_ckpt: Path, processes: int) -> None:
    from tests.e2e.test_decoding import decode_process_pids

    flags = ("--max-batch-size", "2", "--decode-timeout-s", "0.4", "--decode-processes", str(processes))
    with spawn_server(*flags, "--max-frames", "200", "--max-upload-mb", "64") as (proc, url):
        pids = [proc.pid, *decode_process_pids(proc.pid)]
        body = multipart_frames(heavy_pngs(120), "png")  # about 4 s of decoding on one thread
        started = time.monotonic()
        r = httpx.post(f"{url}/predict", files=body, timeout=60)
        assert r.status_code == 504 and "not decoded within 0.4 s" in r.json()["error"]["message"], r.text
        assert time.monotonic() - started < 3
        time.sleep(1.0)  # the decode notices at its next frame
        busy = cpu_seconds(pids)
        time.sleep(1.0)
        assert cpu_seconds(pids) - busy < 0.3  # nothing decodes on: the work stopped
        served_normally(url)


class SlowVideos:
    """Video decoding that takes as long as the test wants: it runs until released or stopped, asking
    its ``stop`` between 10-ms "frames" as the real decoder does between frames."""

    def __init__(self) -> None:
        self.running = 0
        self.stopped: list[float] = []  # when each noticed its stop
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, data: bytes, fmt, pick, *, max_pixels, max_decoded, stop, threads=False):  # type: ignore[no-untyped-def]
        from media import Stopped

        with self._lock:
            self.running += 1
        try:
            while not self.release.wait(0.01):
                if stop is not None and stop():
                    self.stopped.append(time.monotonic())
                    raise Stopped("no longer wanted")
            return np.zeros((len(pick(16)), fmt.height, fmt.width, fmt.channels), np.uint8)
        finally:
            with self._lock:
                self.running -= 1


def test_videos_leave_images_a_decode_thread_and_stop_when_their_clients_leave(
    default_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.uploads
    from tests.support.media import write_mp4

    slow = SlowVideos()
    monkeypatch.setattr(app.uploads, "decode_video", slow)
    video = write_mp4(synth_clip(frames=8))
    with live_server(checkpoint=default_ckpt, max_batch_size=2, decode_workers=2) as url:
        left: list[float] = []

        def impatient() -> None:  # gives up on its answer after a second and leaves
            try:
                httpx.post(f"{url}/predict", files={"video": ("v.mp4", video, "video/mp4")}, timeout=1.0)
            except httpx.TimeoutException:
                left.append(time.monotonic())

        clients = [threading.Thread(target=impatient) for _ in range(3)]
        for c in clients:
            c.start()
        time.sleep(0.3)
        assert slow.running == 1  # one video decodes; the others wait in line, holding no thread
        for _ in range(3):  # images still have a decode thread
            started = time.monotonic()
            served_normally(url)
            assert time.monotonic() - started < 1.0
        for c in clients:
            c.join()
        deadline = time.monotonic() + 5
        while slow.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow.running == 0 and len(left) == 3
        # each decode that had started stopped within a second of its client leaving (one that had not
        # started by then never starts); none of the three reached the model
        assert slow.stopped and max(slow.stopped) - max(left) < 1.0
        text = httpx.get(f"{url}/metrics").text
        assert metric_value(text, "fusionserve_dropped_clips_total", reason="undecoded") == 3


def test_readiness_says_not_ready_while_the_uploads_waiting_to_be_decoded_are_at_their_limit(
    default_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.uploads
    from tests.support.media import write_mp4

    slow = SlowVideos()
    monkeypatch.setattr(app.uploads, "decode_video", slow)
    video = {"video": ("v.mp4", write_mp4(synth_clip(frames=8)), "video/mp4")}
    with live_server(checkpoint=default_ckpt, max_batch_size=2, max_queue=2) as url:
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        posts = [threading.Thread(target=httpx.post, args=(f"{url}/predict",), kwargs={"files": video, "timeout": 30})]
        posts.append(
            threading.Thread(target=httpx.post, args=(f"{url}/predict",), kwargs={"files": video, "timeout": 30})
        )
        for p in posts:
            p.start()
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/v2/health/ready").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.get(f"{url}/v2/health/ready")
        assert r.status_code == 503 and r.json() == {"ready": False}
        assert httpx.post(f"{url}/predict", files=video).status_code == 503  # what readiness warned of
        slow.release.set()
        for p in posts:
            p.join()
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection; raises if it does not within ``timeout``."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass  # closed with data of ours still unread on its side
    return got


@pytest.fixture(scope="module")
def strict(default_ckpt: Path):  # type: ignore[no-untyped-def]
    """A server with short connection limits, as a subprocess (its RSS is its own)."""
    flags = ("--max-batch-size", "2", "--header-timeout-s", "1", "--body-timeout-s", "2", "--max-connections", "40")
    with spawn_server(*flags) as (proc, url):
        yield proc, url, int(url.rsplit(":", 1)[1])


def test_headers_past_their_limit_get_431_and_memory_stays_bounded(strict) -> None:  # type: ignore[no-untyped-def]
    proc, url, port = strict
    before = rss_mb(proc.pid)
    answers = []
    for _ in range(30):  # unfinished 1 MB headers, each sent in 64 KB writes
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Big: ")
            try:
                for _ in range(16):
                    s.sendall(b"a" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused and closed while it was still sending
            answers.append(read_all(s, 5))
    assert all(a.startswith(b"HTTP/1.1 431 ") or a == b"" for a in answers) and answers[0].startswith(b"HTTP/1.1 431")
    assert rss_mb(proc.pid) - before < 50
    served_normally(url)


def test_silent_and_slow_connections_are_closed_after_the_header_timeout(strict) -> None:  # type: ignore[no-untyped-def]
    _, url, port = strict
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    started = time.monotonic()
    for tick in range(6):  # slowloris: a header byte every 0.3 s, for longer than HEADER_TIMEOUT_S (1 s)
        for s in slow:
            with contextlib.suppress(OSError):  # the server may have closed it already
                s.sendall(b"G")
        time.sleep(0.3)
        if tick == 2:
            served_normally(url)
    answers = [read_all(s, 3) for s in silent + slow]  # each closed by the server, not left open
    assert time.monotonic() - started < 6
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers[:10]), answers[:3]  # silent: told why
    # slow: closed too (its 408 may be lost to the reset our next byte causes)
    for s in silent + slow:
        s.close()


def test_a_body_sent_too_slowly_is_cut_off_with_408(strict) -> None:  # type: ignore[no-untyped-def]
    _, url, port = strict
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=a\r\n")
        s.sendall(b"Content-Length: 10000000\r\n\r\n")
        started = time.monotonic()
        try:
            for _ in range(8):  # 1 KB a second
                s.sendall(b"x" * 1024)
                time.sleep(0.5)
        except OSError:
            pass
        answer = read_all(s, 5)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request body too slow" in answer, answer[:200]
    assert time.monotonic() - started < 4  # BODY_TIMEOUT_S is 2 here
    served_normally(url)


def test_connections_past_the_cap_get_503_at_once(strict) -> None:  # type: ignore[no-untyped-def]
    _, url, port = strict
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as extra:
            started = time.monotonic()
            answer = read_all(extra, 3)
        assert answer.startswith(b"HTTP/1.1 503 ") and time.monotonic() - started < 1, answer[:100]
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    served_normally(url)  # the cap frees as connections close


def test_bodies_in_flight_are_held_to_one_server_wide_budget(default_ckpt: Path) -> None:
    flags = ("--max-batch-size", "2", "--max-inflight-mb", "100", "--max-connections", "200")
    with spawn_server(*flags) as (proc, url):
        port, before = int(url.rsplit(":", 1)[1]), rss_mb(proc.pid)
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=a\r\n"
        held, refused = [], 0
        for _ in range(40):  # each declares 31 MB and sends 4 MB of it, then waits
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head + b"Content-Length: 32505856\r\n\r\n")
            with contextlib.suppress(OSError):
                s.sendall(b"x" * (4 << 20))
            s.settimeout(0.5)
            try:
                answer = s.recv(4096)
            except TimeoutError:
                held.append(s)  # reserved: its body is being read
                continue
            assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower(), answer[:300]
            refused += 1
            s.close()
        assert len(held) == 3 and refused == 37  # 3 x 31 MB fit in 100 MB; the rest before their bodies
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503  # nearly spent: route elsewhere
        assert rss_mb(proc.pid) - before < 150
        for s in held:
            s.close()
        time.sleep(0.3)
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        served_normally(url)
        big_json = b'{"frames": ["' + b"A" * (3 << 20) + b'"]}'  # 3 MB of JSON counts 75 MB: it fits alone
        r = httpx.post(f"{url}/predict", content=big_json, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, r.text  # refused by its content, not by the budget
