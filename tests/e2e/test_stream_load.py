"""Streams under load and at shutdown, against ``python -m app`` in its own process: many streams at
once with resets, bad frames and clients that vanish; SIGTERM with streams open."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support.media import encode, synth_clip
from tests.support.servers import spawn_server

STREAMS, FRAMES = 64, 200


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/stream"


def frames_jpeg(count: int) -> list[bytes]:
    clip = np.concatenate([synth_clip(label, 10, seed=i) for i, label in enumerate(["left", "up", "zoom_in"] * 7)])
    return [encode(clip[i % len(clip)], "JPEG", quality=90) for i in range(count)]


async def one_stream(url: str, n: int, frames: list[bytes]) -> dict[str, Any]:
    """Stream ``frames``; stream 5k resets at frame 100, 5k+1 sends a bad frame at 50, 16k+3 vanishes at
    frame 120 without reading. Returns what was expected and what came back."""
    expected: list[tuple[int, bool]] = []  # (frame number, is an error), in the order sent
    vanish = n % 16 == 3
    got: list[dict[str, Any]] = []
    async with connect(ws_url(url), max_queue=None) as ws:

        async def receive() -> None:
            while len(got) < len(expected) or not sending.done():
                got.append(json.loads(await ws.recv()))

        async def send() -> None:
            index = 0
            for i, data in enumerate(frames):
                if vanish and i == 120:
                    return
                if n % 5 == 0 and i == 100:
                    await ws.send(json.dumps({"reset": True}))
                    index = 0
                bad = n % 5 == 1 and i == 50
                await ws.send(b"\x00garbage" if bad else data)
                expected.append((index, bad))
                index += 1
                if i % 8 == 7:
                    await asyncio.sleep(0)  # other streams' turn

        sending = asyncio.ensure_future(send())
        if vanish:
            await sending
            ws.transport.abort()  # gone without a close, its frames unanswered
            return {"vanished": True}
        receiving = asyncio.ensure_future(receive())
        await sending
        while len(got) < len(expected):
            await asyncio.sleep(0.01)
            if receiving.done():
                receiving.result()
        receiving.cancel()
    return {"vanished": False, "expected": expected, "got": got}


def test_many_streams_each_frame_answered_once_in_order_and_memory_returns() -> None:
    frames = frames_jpeg(FRAMES)
    with spawn_server("--memory-trim-s", "2", "--stream-max-batch", "64") as (proc, url):

        async def run(count: int, length: int) -> list[dict[str, Any]]:
            return await asyncio.gather(*(one_stream(url, n, frames[:length]) for n in range(count)))

        asyncio.run(run(4, 20))  # warm: the paths the load takes, once
        time.sleep(3)
        before = rss_mb(proc.pid)
        metrics = httpx.get(f"{url}/metrics").text
        started = time.monotonic()
        results = asyncio.run(run(STREAMS, FRAMES))
        took = time.monotonic() - started
        metrics_after = httpx.get(f"{url}/metrics").text
        for n, result in enumerate(results):
            if result["vanished"]:
                continue
            assert [a["frame"] for a in result["got"]] == [i for i, _ in result["expected"]], f"stream {n}"
            errors = [("error" in a) for a in result["got"]]
            assert errors == [bad for _, bad in result["expected"]], f"stream {n}"
        assert sum(r["vanished"] for r in results) == 4
        size_sum = batch_metric(metrics_after, "sum") - batch_metric(metrics, "sum")
        size_count = batch_metric(metrics_after, "count") - batch_metric(metrics, "count")
        assert size_sum >= (STREAMS - 4) * (FRAMES - 1)  # every frame of the streams that stayed (less bad ones)
        assert size_sum / size_count > 2, f"{size_sum / size_count:.1f} frames per step batch"
        deadline = time.monotonic() + 20
        while (after := rss_mb(proc.pid)) > before * 1.1 and time.monotonic() < deadline:
            time.sleep(0.5)  # the streams' state goes at once; the heap is trimmed once idle (MEMORY_TRIM_S)
        assert after <= before * 1.1, f"RSS {before:.0f} MB before, {after:.0f} MB after ({took:.1f} s of load)"
        assert metric(httpx.get(f"{url}/metrics").text, "fusionserve_streams_open", 'kind="stream"') == 0


def batch_metric(text: str, what: str) -> float:
    return metric(text, f"fusionserve_step_batch_size_{what}", "")


def metric(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels}")


def test_sigterm_answers_every_frame_received_then_closes_1001() -> None:
    frames = frames_jpeg(300)
    with spawn_server() as (proc, url):

        async def stream(answers: list[int], first: asyncio.Event) -> int | None:
            async with connect(ws_url(url)) as ws:

                async def send() -> None:
                    for data in frames:
                        await ws.send(data)

                sender = asyncio.ensure_future(send())
                try:
                    while True:
                        answers.append(json.loads(await ws.recv())["frame"])
                        first.set()
                except ConnectionClosed:
                    pass
                sender.cancel()
                return ws.close_code

        async def run() -> tuple[list[list[int]], list[int | None]]:
            answers: list[list[int]] = [[], [], []]
            firsts = [asyncio.Event() for _ in answers]
            tasks = [asyncio.ensure_future(stream(a, f)) for a, f in zip(answers, firsts, strict=True)]
            for f in firsts:
                await f.wait()
            proc.send_signal(signal.SIGTERM)  # mid-stream: frames are in flight on every stream
            codes = await asyncio.gather(*tasks)
            return answers, codes

        answers, codes = asyncio.run(run())
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal once it has shut down
    assert codes == [1001, 1001, 1001]
    closed = [(int(a), int(b)) for a, b in re.findall(r"closed: (\d+) frames received, (\d+) answered", out)]
    assert len(closed) == 3, out
    for got in answers:
        assert got == list(range(len(got))) and 0 < len(got) < len(frames)
    # every frame the server read was answered, and the clients got each of those answers
    assert sorted(received for received, _ in closed) == sorted(len(got) for got in answers)
    assert all(received == answered for received, answered in closed)
    assert "Traceback" not in out
