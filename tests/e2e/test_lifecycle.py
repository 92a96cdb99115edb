"""Load, faults and shutdown through real servers: overload, timeouts, disconnects, SIGTERM, the CLI."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.media import encode, multipart_frames, synth_clip
from tests.support.servers import live_server, metric_value, spawn_server


def slow_frames(n: int = 8) -> list[bytes]:
    return [encode(f) for f in synth_clip("left", frames=n, size=64)]


async def burst(url: str, count: int, timeout: float = 120) -> list[httpx.Response]:
    files = multipart_frames(slow_frames())
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=count)) as client:
        return await asyncio.gather(*(client.post(f"{url}/predict", files=files) for _ in range(count)))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_overload_gives_503_with_retry_after_and_memory_stays_bounded(slow_checkpoint: Path) -> None:
    with spawn_server("--checkpoint", str(slow_checkpoint), "--max-queue", "3", "--max-batch-size", "2") as (proc, url):
        asyncio.run(burst(url, 4))  # warm the allocator before measuring
        rss_before = rss_kb(proc.pid)
        for _ in range(3):
            responses = asyncio.run(burst(url, 40))
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {200, 503}, statuses
            assert statuses.count(503) > 0 and statuses.count(200) >= 3
            for r in responses:
                if r.status_code == 503:
                    assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
        growth_mb = (rss_kb(proc.pid) - rss_before) / 1024
        assert growth_mb < 200, f"RSS grew {growth_mb:.0f} MB over three bursts of 40 requests"
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def test_queue_timeout_gives_504_and_disconnected_clients_are_dropped(slow_checkpoint: Path) -> None:
    # 30 clips of about 45 ms each on two instances need far longer than the 0.2 s a clip may wait
    with live_server(checkpoint=slow_checkpoint, max_batch_size=1, request_timeout_s=0.2) as url:
        statuses = [r.status_code for r in asyncio.run(burst(url, 30))]
        assert 504 in statuses and 200 in statuses and set(statuses) <= {200, 504}
        assert metric_value(httpx.get(f"{url}/metrics").text, "fusionserve_requests_total", status="504") > 0

    with live_server(checkpoint=slow_checkpoint, max_batch_size=1) as url:

        async def leave_early() -> None:
            files = multipart_frames(slow_frames())
            async with httpx.AsyncClient(timeout=60) as client:
                keep = [asyncio.ensure_future(client.post(f"{url}/predict", files=files)) for _ in range(2)]
                await asyncio.sleep(0.05)
                async with httpx.AsyncClient(timeout=0.05) as impatient:
                    gone = [impatient.post(f"{url}/predict", files=files) for _ in range(6)]
                    await asyncio.gather(*gone, return_exceptions=True)
                assert [r.status_code for r in await asyncio.gather(*keep)] == [200, 200]

        asyncio.run(leave_early())
        time.sleep(0.5)
        text = httpx.get(f"{url}/metrics").text
        dropped = sum(  # queued, or still waiting for a decode thread when the client left
            metric_value(text, "fusionserve_dropped_clips_total", reason=r) for r in ("cancelled", "undecoded")
        )
        computed = metric_value(text, "fusionserve_batch_size_sum")
        assert dropped >= 1, "a clip whose client left should be dropped before compute"
        assert computed <= 8 - dropped  # a dropped clip never reached the model


def test_sigterm_answers_every_accepted_request(slow_checkpoint: Path) -> None:
    with spawn_server("--checkpoint", str(slow_checkpoint), "--max-batch-size", "1", "--drain-s", "0.5") as (proc, url):

        async def main() -> list[httpx.Response]:
            files = multipart_frames(slow_frames())
            async with httpx.AsyncClient(timeout=120) as client:
                tasks = [asyncio.ensure_future(client.post(f"{url}/predict", files=files)) for _ in range(8)]
                deadline = time.monotonic() + 30
                while True:  # wait until the server has accepted all 8 (they sit in its queue or model)
                    text = (await client.get(f"{url}/metrics")).text
                    taken = metric_value(text, "fusionserve_batch_size_sum") + metric_value(
                        text, "fusionserve_queue_depth"
                    )
                    if taken >= 8 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.1)
                ready = await client.get(f"{url}/v2/health/ready")
                assert ready.status_code == 503  # draining: not ready, still answering
                late = await client.post(f"{url}/predict", files=files)
                assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
                return await asyncio.gather(*tasks)

        responses = asyncio.run(main())
        assert [r.status_code for r in responses] == [200] * 8
        # uvicorn re-raises the signal once shutdown is complete, so the exit status is "killed by SIGTERM".
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = proc.stdout.read() if proc.stdout else ""
        assert "answering accepted requests" in log and "Finished server process" in log


def test_shutdown_waits_for_a_decode_backlog_longer_than_the_queue_timeout(default_ckpt: Path) -> None:
    # Every accepted request is answered on shutdown, however long its decoding waits: the grace
    # period covers DECODE_TIMEOUT_S and REQUEST_TIMEOUT_S, where it once covered the latter only (6 s
    # here, while these 14 uploads keep the one decode thread busy for about 9 s).
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((3000, 3000, 3), np.uint8)).save(buf, "PNG")
    files = multipart_frames([buf.getvalue()] * 16, "png")
    flags = ("--checkpoint", str(default_ckpt), "--request-timeout-s", "1", "--decode-timeout-s", "60")
    with spawn_server(*flags, "--decode-workers", "1", "--decode-split-kb", "0") as (proc, url):

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=14)) as client:
                tasks = [asyncio.ensure_future(client.post(f"{url}/predict", files=files)) for _ in range(14)]
                await asyncio.sleep(1.5)  # every body read, most still waiting for the decode thread
                proc.send_signal(signal.SIGINT)
                return await asyncio.gather(*tasks)

        started = time.monotonic()
        statuses = [r.status_code for r in asyncio.run(main())]
        took = time.monotonic() - started
        assert proc.wait(timeout=120) == 130
        log = proc.stdout.read() if proc.stdout else ""
    assert statuses == [200] * 14, (statuses, took)
    assert "timeout graceful shutdown exceeded" not in log and "Traceback" not in log


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["foreground", "sigint-inherited-ignored"])
def test_ctrl_c_shuts_down_cleanly_without_a_traceback(default_ckpt: Path, sigint_ignored: bool) -> None:
    # uvicorn handles SIGINT itself either way; started with it ignored (a background job), the
    # re-raised signal is ignored too, and the exit status must still say "interrupted"
    flags = ("--checkpoint", str(default_ckpt), "--max-batch-size", "2")
    with spawn_server(*flags, sigint_ignored=sigint_ignored) as (proc, url):
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        log = proc.stdout.read() if proc.stdout else ""
    assert "answering accepted requests" in log and "Finished server process" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log


@pytest.mark.parametrize(
    ("flags", "loop", "parser"),
    [((), "uvloop", "HttpToolsProtocol"), (("--loop", "asyncio", "--http", "h11"), "asyncio", "H11Protocol")],
    ids=["auto", "asyncio-h11"],
)
def test_event_loop_and_http_parser_are_chosen_served_and_logged(
    default_ckpt: Path, flags: tuple[str, ...], loop: str, parser: str
) -> None:
    frames = [encode(f) for f in synth_clip("left", frames=4, size=64)]
    with spawn_server("--checkpoint", str(default_ckpt), "--max-batch-size", "2", *flags) as (proc, url):
        answer = httpx.post(f"{url}/predict", files=multipart_frames(frames), timeout=60)
        assert answer.status_code == 200, answer.text
        assert abs(sum(answer.json()["probabilities"].values()) - 1) < 1e-4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        log = proc.stdout.read() if proc.stdout else ""
    assert f"event loop: {loop}" in log and f"HTTP parser: {parser}" in log
    assert "answering accepted requests" in log and "Traceback" not in log
    bad = subprocess.run([sys.executable, "-m", "app", "--loop", "tokio"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "loop" in bad.stderr and "'asyncio'" in bad.stderr


def test_cli_flags_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "app", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in (
        "--checkpoint",
        "--device",
        "--max-batch-size",
        "--max-batch-frames",
        "--max-batch-delay-ms",
        "--max-queue",
        "--request-timeout-s",
        "--max-frames",
        "--max-upload-mb",
        "--api-key",
        "--host",
        "--port",
    ):
        assert flag in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "app", "--max-batch-size", "0"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "max_batch_size" in bad.stderr


def test_env_variables_configure_the_server(default_ckpt: Path) -> None:
    env = {"FUSIONSERVE_MAX_BATCH_SIZE": "3", "FUSIONSERVE_MAX_QUEUE": "17"}
    with spawn_server(env=env) as (_, url):
        info = httpx.get(f"{url}/models/moving-digits-lstm").json()
        assert info["batching"]["max_batch_size"] == 3 and info["batching"]["max_queue"] == 17
        assert "moving-digits-lstm" in httpx.get(f"{url}/metrics").text


def _get_on(sock: socket.socket, path: str = "/v2/health/live") -> bytes:
    """One HTTP/1.1 keep-alive request on ``sock``; the response's bytes (b"" when the server had closed it)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(v for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return data


def test_idle_keep_alive_connections_outlive_clients_expiry(default_ckpt: Path) -> None:
    # uvicorn's own default (5 s) equals httpx's keep-alive expiry: a client could send on a connection
    # just as the server closed it (a reset: ReadError). The server keeps idle connections KEEP_ALIVE_S.
    for keep_alive, idle_s, still_open in (("1", 2.0, False), (None, 6.0, True)):  # 6 s: past uvicorn's 5
        flags = ("--checkpoint", str(default_ckpt), "--max-batch-size", "4")  # set: no autotune, a quicker start
        flags += ("--keep-alive-s", keep_alive) if keep_alive else ()
        with spawn_server(*flags) as (_, url):
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                assert _get_on(sock).startswith(b"HTTP/1.1 200")
                time.sleep(idle_s)
                try:
                    again = _get_on(sock)
                except ConnectionResetError:
                    again = b""
                assert again.startswith(b"HTTP/1.1 200") == still_open, (keep_alive, again[:80])
