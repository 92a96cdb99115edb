"""Streams against clips: how many cameras one server follows over ``WS /stream`` and over ``/predict``.

``python -m bench streams --checkpoint FILE|seed`` starts the real server (``python -m app``, as
``bench serve`` does) and loads it with S streams, each a camera sending real JPEG frames at
``--fps``, open loop: a stream sends each frame on its schedule whether or not earlier answers have
come back, and a frame's latency runs from its scheduled send to its answer, so a lagging client
cannot hide the server's queueing. Each level runs two ways, interleaved:

- **streams**: one ``WS /stream`` per camera, one binary message per frame, one answer per frame
  (the server steps each stream's state one frame at a time, batched across streams);
- **clips** (the way before streams): each frame a ``POST /predict`` of the camera's last
  ``--window`` frames (the model's clip length; fewer at the start, never fewer than its
  ``min_frames``), over the camera's own keep-alive connections (a new one when all are busy).

A level is held when its p99 is at most ``--p99-ms`` and every frame is answered; one not held is
tried again (``--attempts``: on a shared machine another tenant's burst can stall the server's
OpenMP team for a few hundred milliseconds), and a way's sweep stops at its first level held in
no try. Then the saturation runs (``--saturation-streams``, each stream keeping
``--saturation-window`` frames unanswered: as many frames as the server takes) and the model's
in-process ceiling, the encoder plus one batched head step per frame at ``--ceiling-batches``
frames, measured before and after the load with the server idle. The streams' best frames/s is
reported as a share of it.

The clients are one asyncio loop (uvloop when installed) in this process, sharing the machine's
cores with the server; messages and requests are built before the load starts, and /predict goes
over raw keep-alive sockets, not httpx. Each level reports the CPU that the client, the server and
every other process used (cores, and ms per answered frame), so that a server starved by its
client or by another tenant shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from bench import loadgen
from bench.media import encode_jpeg, synth_clips
from bench.serve import (
    ServerProcess,
    cpu_seconds,
    machine,
    parse_env,
    quiet_client_logs,
    resolve_checkpoint,
    running,
    scrape,
    server_split,
    settle,
    write_outputs,
)

log = logging.getLogger(__name__)

LATE_S = 0.005  # a frame sent this long after its slot counts late (the client fell behind)
GRACE_S = 2.0  # after the last slot, how long answers are awaited before the rest count as unanswered
WAYS = ("streams", "clips")
Load = Callable[[int, float, float], Awaitable["Tally"]]  # (streams, warm-up s, measured s) -> what the client saw


@dataclass(frozen=True)
class Media:
    """A camera's frames as JPEG, cycled, and the prebuilt ``/predict`` requests of every window of them.

    Camera ``k`` shows frame ``(k * STRIDE + i) % len(frames)`` at its frame ``i``, so that cameras
    differ; a window is keyed by its last frame's place in the cycle and its length.
    """

    frames: tuple[bytes, ...]
    requests: dict[tuple[int, int], bytes]  # (last frame % len(frames), length) -> the whole HTTP request
    window: int
    min_frames: int

    STRIDE = 7

    @classmethod
    def build(cls, size: int, window: int, min_frames: int, port: int, cycle: int | None = None) -> Media:
        """JPEG frames of moving digits, ``size`` pixels square, ``cycle`` of them (default: two windows,
        at least 32), and the requests of ``min_frames`` to ``window`` frames ending at each."""
        cycle = cycle or max(32, 2 * window)
        clips = synth_clips(-(-cycle // window), window, size)
        frames = tuple(encode_jpeg(frame) for clip in clips for frame in clip)[:cycle]
        requests = {}
        for last in range(len(frames)):
            for length in range(min_frames, window + 1):
                parts = [
                    ("frames", f"{t:03d}.jpg", frames[(last - length + 1 + t) % len(frames)], "image/jpeg")
                    for t in range(length)
                ]
                body, ctype = loadgen.multipart(parts)
                head = (
                    f"POST /predict HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: {ctype}\r\n"
                    f"content-length: {len(body)}\r\n\r\n"
                )
                requests[(last, length)] = head.encode() + body
        return cls(frames, requests, window, min_frames)

    def frame(self, camera: int, i: int) -> bytes:
        return self.frames[(camera * self.STRIDE + i) % len(self.frames)]

    def request(self, camera: int, i: int) -> bytes:
        """The ``/predict`` of camera ``camera``'s frames up to its ``i``-th (the camera ran before it was
        watched: a window at the start reaches back to ``min_frames``)."""
        length = min(self.window, max(i + 1, self.min_frames))
        return self.requests[((camera * self.STRIDE + i) % len(self.frames), length)]


@dataclass(frozen=True)
class Schedule:
    """A level's clock: warm-up from ``start``, measured from ``measured`` to ``end``."""

    start: float
    measured: float
    end: float

    @classmethod
    def from_now(cls, warmup_s: float, duration_s: float, lead_s: float = 0.2) -> Schedule:
        start = time.perf_counter() + lead_s
        return cls(start, start + warmup_s, start + warmup_s + duration_s)

    def slots(self, phase: float, fps: float) -> list[float]:
        """The send times of one camera, ``phase`` seconds into the first frame's period."""
        count = int((self.end - self.start - phase) * fps + 1 - 1e-9)
        return [self.start + phase + i / fps for i in range(max(0, count))]


STEP_METRICS = ("fusionserve_step_seconds_sum", "fusionserve_step_seconds_count", "fusionserve_step_batch_size_sum")


@dataclass(frozen=True)
class Usage:
    """At one moment: CPU seconds used so far by this process (the client), the server's process tree
    and every process of the machine (/proc/stat), and the server's stream-step totals (/metrics)."""

    wall: float
    client: float
    server: float | None
    machine: float | None
    steps: dict[str, float]

    @classmethod
    async def take(cls, http: httpx.AsyncClient, server: ServerProcess) -> Usage:
        steps = dict.fromkeys(STEP_METRICS, 0.0)
        for line in (await http.get(f"{server.url}/metrics")).text.splitlines():
            if (name := line.split("{", 1)[0].split(" ", 1)[0]) in steps:
                steps[name] += float(line.rpartition(" ")[2])
        return cls(time.perf_counter(), time.process_time(), cpu_seconds(server.pid), machine_busy_s(), steps)

    def since(self, before: Usage, answered: int) -> dict[str, float | None]:
        """Cores used between ``before`` and this moment, CPU ms per answered frame, and how busy the
        server's stepper thread was (the share of the time it spent in step batches, and the frames/s
        of its batches while it did: against the in-process ceiling at the same batch)."""
        wall, client = self.wall - before.wall, self.client - before.client
        server = None if self.server is None or before.server is None else self.server - before.server
        machine = None if self.machine is None or before.machine is None else self.machine - before.machine
        stepping, batches, frames = (self.steps[k] - before.steps[k] for k in STEP_METRICS)
        per_frame = 1000.0 / max(answered, 1)
        return {
            "client_cores": round(client / wall, 3),
            "server_cores": None if server is None else round(server / wall, 3),
            # the rest of the machine: other tenants, and the kernel's loopback work for both
            "other_cores": None if server is None or machine is None else round((machine - client - server) / wall, 3),
            "client_cpu_ms_per_frame": round(client * per_frame, 3),
            "server_cpu_ms_per_frame": None if server is None else round(server * per_frame, 3),
            "stepper_busy": round(stepping / wall, 3),
            "step_ms_per_batch": round(stepping / batches * 1000, 3) if batches else None,
            "step_frames_per_s_busy": round(frames / stepping, 1) if stepping else None,
        }


def machine_busy_s() -> float | None:
    """CPU seconds every process of the machine has used since boot (/proc/stat), None without it."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Tally:
    """What the client saw of one level: frames whose slot fell in the measured window, their fate, and
    the CPU used over that window."""

    window_s: float
    scheduled: int = 0
    latencies_s: list[float] = field(default_factory=list)  # answered frames
    errors: Counter[str] = field(default_factory=Counter)  # error answers, statuses, exceptions, unanswered
    late: int = 0
    batches: list[int] = field(default_factory=list)  # streams: the step batch each answer came from
    server_ms: list[float] = field(default_factory=list)  # the server's own total per answer (timing_ms)
    usage: tuple[Usage, Usage] | None = None

    def answer(self, sent: float, body: dict[str, Any]) -> None:
        """One answer (parsed), received now, to a frame sent (or scheduled) at ``sent``."""
        took = time.perf_counter() - sent
        if "error" in body:
            self.errors[body["error"].get("code", "error")] += 1
            return
        self.latencies_s.append(took)
        self.server_ms.append(body["timing_ms"]["total"])
        if "batch" in body:
            self.batches.append(body["batch"])

    def count_unanswered(self) -> None:
        if missing := self.scheduled - len(self.latencies_s) - sum(self.errors.values()):
            self.errors["unanswered"] += missing

    def summary(self) -> dict[str, Any]:
        answered = len(self.latencies_s)
        ms = np.asarray(self.latencies_s) * 1000.0
        pct = {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) if answered else None for q in (50, 90, 99)}
        return {
            "scheduled": self.scheduled,
            "answered": answered,
            "frames_per_s": round(answered / self.window_s, 1),
            **pct,
            "max_ms": round(float(ms.max()), 2) if answered else None,
            "errors": dict(sorted(self.errors.items())),
            "late": self.late,
            "batch": round(statistics.mean(self.batches), 2) if self.batches else None,
            "server_ms": round(statistics.mean(self.server_ms), 2) if self.server_ms else None,
            **(self.usage[1].since(self.usage[0], answered) if self.usage else {}),
        }


@dataclass(frozen=True)
class Target:
    """Where the load goes and what it sends."""

    server: ServerProcess
    http: httpx.AsyncClient  # for /metrics
    media: Media
    fps: float
    compression: str | None  # the WebSocket extension the client offers
    cap: int  # clips: most requests a camera has out

    @property
    def ws_url(self) -> str:
        return self.server.url.replace("http://", "ws://") + "/stream"


async def _sleep_until(t: float) -> None:
    if (delay := t - time.perf_counter()) > 0:
        await asyncio.sleep(delay)


async def _measured(when: Schedule, tally: Tally, target: Target, work: Awaitable[Any]) -> Tally:
    """Await ``work`` (a level's cameras), taking ``Usage`` at the start and end of its measured window."""

    async def watch() -> tuple[Usage, Usage]:
        await _sleep_until(when.measured)
        first = await Usage.take(target.http, target.server)
        await _sleep_until(when.end)
        return first, await Usage.take(target.http, target.server)

    watching = asyncio.create_task(watch())
    try:
        await work
        tally.usage = await watching
    finally:
        watching.cancel()
    return tally


async def _open_streams(target: Target, count: int) -> list[ClientConnection]:
    opening = (
        connect(target.ws_url, compression=target.compression, proxy=None, ping_interval=None, close_timeout=2)
        for _ in range(count)
    )
    return await asyncio.gather(*opening)


async def _close_all(conns: list[ClientConnection]) -> None:
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


async def ws_camera(
    ws: ClientConnection, media: Media, camera: int, slots: list[float], when: Schedule, tally: Tally
) -> None:
    """Send one camera's frames on their slots while reading their answers (in order, one each)."""

    async def send() -> None:
        for i, slot in enumerate(slots):
            await _sleep_until(slot)
            if slot >= when.measured and time.perf_counter() - slot > LATE_S:
                tally.late += 1
            await ws.send(media.frame(camera, i))

    async def read() -> None:
        for _ in slots:
            body = json.loads(await ws.recv())
            index = body.get("frame")  # answers come in order; the index says which
            if index is not None and slots[index] >= when.measured:
                tally.answer(slots[index], body)

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(when.end - time.perf_counter() + GRACE_S):
            await read()
    except (TimeoutError, WebSocketException, OSError) as exc:
        log.debug("camera %d: %r", camera, exc)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, WebSocketException, OSError):
            await sender


async def ws_level(target: Target, streams: int, warmup_s: float, duration_s: float) -> Tally:
    """``streams`` cameras on ``WS /stream``, their first frames spread evenly over one frame's period."""
    conns = await _open_streams(target, streams)
    when = Schedule.from_now(warmup_s, duration_s)
    tally = Tally(duration_s)
    slots = [when.slots(k / (streams * target.fps), target.fps) for k in range(streams)]
    tally.scheduled = sum(s >= when.measured for camera in slots for s in camera)
    cameras = (ws_camera(c, target.media, k, slots[k], when, tally) for k, c in enumerate(conns))
    try:
        await _measured(when, tally, target, asyncio.gather(*cameras))
    finally:
        await _close_all(conns)
    tally.count_unanswered()
    return tally


class Connections:
    """One camera's keep-alive HTTP/1.1 connections: an idle one if any, else a new one.

    Each request is written whole (prebuilt) and its answer read by ``Content-Length``: a few tens
    of microseconds of client CPU, where httpx takes milliseconds (bench/README.md).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened: list[asyncio.StreamWriter] = []

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of one request."""
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened.append(writer)
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            start = lower.index(b"content-length:") + len(b"content-length:")
            body = await reader.readexactly(int(lower[start : lower.index(b"\r\n", start)]))
        except BaseException:
            writer.close()
            raise
        if b"connection: close" in lower:
            writer.close()
        else:
            self.idle.append((reader, writer))
        return int(head[9:12]), body

    def close(self) -> None:
        for writer in self.opened:
            writer.close()


async def predict_camera(
    conns: Connections, media: Media, camera: int, slots: list[float], when: Schedule, tally: Tally, cap: int
) -> None:
    """One camera's frames as ``/predict`` requests on their slots; past ``cap`` in flight a frame is
    not sent (counted ``not_sent``): the camera has fallen too far behind for it to matter."""
    tasks: set[asyncio.Task[None]] = set()

    async def post(i: int, slot: float) -> None:
        try:
            status, body = await conns.exchange(media.request(camera, i))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            if slot >= when.measured:
                tally.errors[type(exc).__name__] += 1
            return
        if slot >= when.measured:
            if status == 200:
                tally.answer(slot, json.loads(body))
            else:
                tally.errors[str(status)] += 1

    for i, slot in enumerate(slots):
        await _sleep_until(slot)
        measured = slot >= when.measured
        if measured and time.perf_counter() - slot > LATE_S:
            tally.late += 1
        if len(tasks) >= cap:
            if measured:
                tally.errors["not_sent"] += 1
            continue
        task = asyncio.create_task(post(i, slot))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=when.end - time.perf_counter() + GRACE_S)
    for task in tasks:
        task.cancel()


async def predict_level(target: Target, streams: int, warmup_s: float, duration_s: float) -> Tally:
    """``streams`` cameras, each frame a ``/predict`` of the camera's last frames."""
    when = Schedule.from_now(warmup_s, duration_s)
    tally = Tally(duration_s)
    slots = [when.slots(k / (streams * target.fps), target.fps) for k in range(streams)]
    tally.scheduled = sum(s >= when.measured for camera in slots for s in camera)
    pools = [Connections("127.0.0.1", target.server.port) for _ in range(streams)]
    cameras = (predict_camera(p, target.media, k, slots[k], when, tally, target.cap) for k, p in enumerate(pools))
    try:
        await _measured(when, tally, target, asyncio.gather(*cameras))
    finally:
        for pool in pools:
            pool.close()
    tally.count_unanswered()
    return tally


async def ws_saturate(target: Target, streams: int, in_flight: int, warmup_s: float, duration_s: float) -> Tally:
    """``streams`` streams, each sending its next frame as soon as fewer than ``in_flight`` are
    unanswered: the frames/s the server gives when it never waits for a frame. Counts the answers
    received in the measured window; latency runs from the send."""
    conns = await _open_streams(target, streams)
    when = Schedule.from_now(warmup_s, duration_s)
    tally = Tally(duration_s)

    async def camera(ws: ClientConnection, k: int) -> None:
        room = asyncio.Semaphore(in_flight)
        sent: list[float] = []

        async def send() -> None:
            await _sleep_until(when.start)
            while time.perf_counter() < when.end:
                await room.acquire()
                sent.append(time.perf_counter())
                await ws.send(target.media.frame(k, len(sent) - 1))

        sender = asyncio.create_task(send())
        try:
            async with asyncio.timeout(when.end - time.perf_counter() + GRACE_S):
                while time.perf_counter() < when.end:
                    body = json.loads(await ws.recv())
                    room.release()
                    if when.measured <= time.perf_counter() < when.end:
                        tally.scheduled += 1
                        tally.answer(sent[body["frame"]], body)
        except (TimeoutError, WebSocketException, OSError) as exc:
            log.debug("saturating stream %d: %r", k, exc)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketException, OSError):
                await sender

    try:
        await _measured(when, tally, target, asyncio.gather(*(camera(c, k) for k, c in enumerate(conns))))
    finally:
        await _close_all(conns)
    return tally


def held(row: dict[str, Any], p99_ms: float) -> bool:
    """Every frame of the level answered, none with an error, and the p99 within ``p99_ms``."""
    every = row["answered"] == row["scheduled"] > 0 and not row["errors"]
    return every and row["p99_ms"] is not None and row["p99_ms"] <= p99_ms


async def sweep(server: ServerProcess, media: Media, args: argparse.Namespace) -> dict[str, Any]:
    """Both ways at each stream count in turn (which goes first alternates), each way until a level
    is not held in any of ``--attempts`` tries; then the saturation runs."""
    compression = None if args.compression == "none" else args.compression
    rows: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
    going = [way for way in WAYS if way in args.ways]
    async with httpx.AsyncClient(timeout=30) as http:
        target = Target(server, http, media, args.fps, compression, args.max_in_flight)
        loads: dict[str, Load] = {"streams": partial(ws_level, target), "clips": partial(predict_level, target)}
        await warm_up(loads, going, min(args.warmup, 1.0))
        for n, streams in enumerate(args.streams):
            for way in going if n % 2 == 0 else going[::-1]:
                head = {"way": way, "streams": streams, "fps": args.fps, "offered_frames_per_s": streams * args.fps}
                tries: list[dict[str, Any]] = []
                while len(tries) < args.attempts and not (tries and tries[-1]["held"]):
                    tries.append(await level(http, server, loads[way](streams, args.warmup, args.duration), head, args))
                rows[way].append({**tries[-1], "attempts": len(tries), "failed_attempts": tries[:-1]})
            going = [way for way in going if rows[way][-1]["held"]]
            if not going:
                break
        info = await models_info(http, server)
        saturation = []
        for streams in args.saturation_streams:
            load = ws_saturate(target, streams, args.saturation_window, args.warmup, args.duration)
            head = {"streams": streams, "in_flight_per_stream": args.saturation_window}
            row = await level(http, server, load, head, args)
            del row["held"]  # no schedule to keep: only its frames/s counts
            saturation.append(row)
    return {"server_info": info, "levels": rows, "saturation": saturation}


async def models_info(http: httpx.AsyncClient, server: ServerProcess) -> list[dict[str, Any]]:
    """What the server runs each model with (GET /models): device, precision, and its stream stepper
    (mode, batch cap, and whether autotune chose the cap)."""
    keys = ("name", "default", "device", "precision", "batchnorm_folded", "frames_per_pass", "streams")
    return [{k: m.get(k) for k in keys} for m in (await http.get(f"{server.url}/models")).json()["models"]]


async def level(
    http: httpx.AsyncClient, server: ServerProcess, load: Awaitable[Tally], head: dict[str, Any], args: Any
) -> dict[str, Any]:
    """One level's row, with the server's /metrics split around it: started once the machine is quiet
    (``--quiet-wait``), and followed by a wait for the server to go idle, so that no level starts on
    the previous one's leftovers."""
    waited = await machine_quiet(args.quiet_wait)
    before = await scrape(http, server.url)
    tally = await load
    row = {**head, **tally.summary(), "server": server_split(before, await scrape(http, server.url))}
    row["waited_for_quiet_s"] = round(waited, 1)
    row["held"] = held(row, args.p99_ms)
    log.info("%s", row)
    await settle(http, server, quiet_s=0.5)
    return row


async def machine_quiet(limit_s: float, cores: float = 0.15, window_s: float = 1.0) -> float:
    """Wait until every process of the machine together has used under ``cores`` over ``window_s``
    (another tenant's burst over, the server idle), for at most ``limit_s``; the seconds waited."""
    started = time.perf_counter()
    while (waited := time.perf_counter() - started) < limit_s:
        before = machine_busy_s()
        await asyncio.sleep(window_s)
        after = machine_busy_s()
        if before is None or after is None or (after - before) / window_s < cores:
            return waited
    log.warning("the machine stayed busy for %.0f s (other tenants); measuring anyway", limit_s)
    return waited


async def warm_up(loads: dict[str, Load], ways: list[str], seconds: float) -> None:
    """A short level of each way, thrown away: first connections and the server's lazy set-up."""
    for way in ways:
        tally = await loads[way](2, 0.0, seconds)
        if not tally.latencies_s:
            raise RuntimeError(f"warm-up of {way} got no answer: {dict(tally.errors)}")


def largest_held(rows: list[dict[str, Any]]) -> int:
    """The most streams of a level held, with every smaller level of the sweep held too (0: none)."""
    best = 0
    for row in rows:
        if not row["held"]:
            break
        best = row["streams"]
    return best


@dataclass
class Ceiling:
    """The model alone, in this process: the encoder and one batched head step per frame.

    Through the server's runtime (``app.runtime.ModelRuntime``: batch norms folded, the CPU
    encoder's pass size, autocast on CUDA) on this thread, with torch at ``threads``: the count the
    server's stepper uses (its passes run on the one thread kept for passes on every thread).
    Frames are uint8 (B, C, H, W) with the strides of the stepper's stacked (B, H, W, C) frames;
    each call steps the previous call's state, as continuing streams are.
    """

    checkpoint: Path
    threads: int
    seconds: float

    def measure(self, batches: list[int]) -> list[dict[str, Any]]:
        import torch

        from app.runtime import ModelRuntime, pick_precision
        from host.device import pick_device
        from models import load_checkpoint

        torch.set_num_threads(self.threads)
        device = pick_device("auto")
        ckpt = load_checkpoint(self.checkpoint, device=device)
        runtime = ModelRuntime(ckpt, device, precision=pick_precision("auto", device))
        spec = ckpt.input
        rows = []
        for B in batches:
            pixels = torch.randint(0, 256, (B, spec.height, spec.width, spec.channels), dtype=torch.uint8)
            pixels = pixels.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides as the stepper's
            state = [ckpt.model.head.init_state(B, device=device)]  # carried from call to call
            rows.append({"batch": B, **self._timed(partial(runtime.compute, _step, pixels, state, device), B)})
        return rows

    def _timed(self, fn: Callable[[], Any], batch: int) -> dict[str, float]:
        """Frames/s over all calls of ``seconds`` (after one warm call), and this process's CPU per frame."""
        fn()
        calls, wall, cpu = 0, time.perf_counter(), time.process_time()
        while (spent := time.perf_counter() - wall) < self.seconds or calls < 3:
            fn()
            calls += 1
        spent = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        return {
            "frames_per_s": round(calls * batch / spent, 1),
            "ms_per_batch": round(spent / calls * 1000, 3),
            "cpu_ms_per_frame": round(cpu / (calls * batch) * 1000, 4),
        }


def _step(model: Any, frames: Any, state: list[Any], device: Any) -> Any:
    """One batched step of the ceiling: (B, C, H, W) uint8 frames -> probabilities (B, K) on the host;
    ``state[0]`` is the heads' state, advanced in place."""
    feats = model.forward_features(frames.to(device, non_blocking=True))  # (B, D)
    logits, state[0] = model.head.step(feats, state[0])
    return logits.float().softmax(dim=-1).cpu()  # as the stepper reads them back


def summarise(result: dict[str, Any], p99_ms: float) -> dict[str, Any]:
    """The largest stream count held each way and their ratio; the streams' best frames/s against the ceiling."""
    levels, ceiling = result["levels"], result["ceiling"]
    held = {way: largest_held(levels[way]) for way in WAYS}
    out: dict[str, Any] = {
        "p99_ms_limit": p99_ms,
        "largest_held": held,
        "held_ratio": round(held["streams"] / held["clips"], 2) if held["clips"] else None,
    }
    answered = [(r["frames_per_s"], f"sweep, {r['streams']} streams", r) for r in levels["streams"]]
    answered += [(r["frames_per_s"], f"saturation, {r['streams']} streams", r) for r in result["saturation"]]
    if answered and ceiling:
        best, where, row = max(answered, key=lambda a: a[0])
        at = min(ceiling["rows"], key=lambda c: abs(c["batch"] - (row["batch"] or 1)))  # the ceiling at its batch
        out["saturation"] = {
            "frames_per_s": best,
            "from": where,
            "of_ceiling": round(best / ceiling["frames_per_s"], 3),
            "batch": row["batch"],
            # against the model alone at about the same batch (the stepper's batches reach STREAM_MAX_BATCH)
            "inprocess_batch": at["batch"],
            "of_ceiling_at_batch": round(best / at["frames_per_s"], 3),
            "client_cores": row["client_cores"],
            "server_cores": row["server_cores"],
            "other_cores": row["other_cores"],
            # the stepper thread's share of the time in step batches, and their frames/s meanwhile
            "stepper_busy": row["stepper_busy"],
            "step_frames_per_s_busy": row["step_frames_per_s_busy"],
            "server_cpu_ms_per_frame": row["server_cpu_ms_per_frame"],
            "inprocess_cpu_ms_per_frame_at_batch": at["cpu_ms_per_frame"],
            # what the server spends per frame beyond the model's own work at about the same batch size
            "server_overhead_cpu_ms_per_frame": (
                round(row["server_cpu_ms_per_frame"] - at["cpu_ms_per_frame"], 3)
                if row["server_cpu_ms_per_frame"] is not None
                else None
            ),
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from models import load_checkpoint

    load = [round(x, 2) for x in os.getloadavg()]  # 1, 5, 15 minutes: was the shared machine busy before?
    env = parse_env(args.env)
    if (most := max([*args.streams, *args.saturation_streams])) > 256:  # the server's MAX_STREAMS default
        env.setdefault("FUSIONSERVE_MAX_STREAMS", str(most))
    checkpoint = resolve_checkpoint(args.checkpoint)
    spec = load_checkpoint(checkpoint).input
    threads = int(env.get("FUSIONSERVE_TORCH_THREADS") or env.get("OMP_NUM_THREADS") or torch.get_num_threads())
    server = ServerProcess(checkpoint, env)
    ceiling_runs: list[list[dict[str, Any]]] = []
    probe = Ceiling(checkpoint, threads, args.ceiling_time)
    with running(server):
        media = Media.build(spec.height, args.window or spec.frames, spec.min_frames, server.port)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            # the ceiling on this thread, between the loop's runs: before the load and after it
            if args.ceiling_time > 0:
                runner.run(machine_quiet(args.quiet_wait))
                ceiling_runs.append(probe.measure(args.ceiling_batches))
            loaded = runner.run(sweep(server, media, args))
            if args.ceiling_time > 0:
                runner.run(machine_quiet(args.quiet_wait))
                ceiling_runs.append(probe.measure(args.ceiling_batches))
    ceiling: dict[str, Any] | None = None
    if ceiling_runs:
        rows = [max(pair, key=lambda r: r["frames_per_s"]) for pair in zip(*ceiling_runs, strict=True)]
        best = max(rows, key=lambda r: r["frames_per_s"])
        ceiling = {
            "frames_per_s": best["frames_per_s"],
            "batch": best["batch"],
            "torch_threads": threads,
            "before_after_frames_per_s": [max(r["frames_per_s"] for r in run) for run in ceiling_runs],
            "rows": rows,
        }
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func", "out")}
    result: dict[str, Any] = {
        "benchmark": "streams",
        "machine": {**machine(), "torch": torch.__version__, "torch_threads": threads, "loadavg_at_start": load},
        "settings": {**settings, "checkpoint": str(checkpoint), "frame_size": spec.height, "window": media.window},
        "server_env": env,
        "client": {
            "loop": "uvloop" if _loop_factory() is not None else "asyncio",
            "note": "one asyncio loop in the benchmark's process, on the same cores as the server",
            "frame_bytes_mean": round(statistics.mean(len(f) for f in media.frames)),
            "request_bytes_mean": round(statistics.mean(len(r) for r in media.requests.values())),
        },
        **loaded,
        "ceiling": ceiling,
        "server_exit_code": server.exit_code,
    }
    result["summary"] = summarise(result, args.p99_ms)
    return result


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (less client CPU per message), else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def markdown(result: dict[str, Any]) -> str:
    head = (
        "| way | streams | offered f/s | answered f/s | p50 ms | p99 ms | max ms | answered/scheduled | errors | late "
        "| batch | server ms | client cores | server cores | other cores | held (tries) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = [r for way in WAYS for r in result["levels"][way]]
    for r in sorted(rows, key=lambda r: (r["streams"], r["way"])):
        errors = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0"
        batch = r["batch"] if r["way"] == "streams" else r["server"]["batch_size"]
        cells = [r["way"], r["streams"], r["offered_frames_per_s"], r["frames_per_s"], r["p50_ms"], r["p99_ms"]]
        cells += [r["max_ms"], f"{r['answered']}/{r['scheduled']}", errors, r["late"], batch, r["server_ms"]]
        cells += [r["client_cores"], r["server_cores"], r["other_cores"]]
        cells.append(f"{'yes' if r['held'] else 'no'} ({r['attempts']})")
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    s = result["summary"]
    settings = result["settings"]
    lines.append(
        f"\nLargest number of {settings['fps']:g} fps streams held (p99 <= {s['p99_ms_limit']:g} ms, every frame "
        f"answered): WS /stream {s['largest_held']['streams']}, /predict of the last {settings['window']} frames "
        f"{s['largest_held']['clips']}; ratio {_fmt(s['held_ratio'])}"
    )
    for sat in result["saturation"]:
        lines.append(
            f"Saturation ({sat['streams']} streams, {sat['in_flight_per_stream']} frames in flight each): "
            f"{_fmt(sat['frames_per_s'])} frames/s, p50 {_fmt(sat['p50_ms'])} ms, batch {_fmt(sat['batch'])}, "
            f"cores: client {_fmt(sat['client_cores'])}, server {_fmt(sat['server_cores'])}, "
            f"other processes {_fmt(sat['other_cores'])}; the stepper busy {_fmt(sat['stepper_busy'])} of the time, "
            f"at {_fmt(sat['step_frames_per_s_busy'])} frames/s while stepping"
        )
    if c := result["ceiling"]:
        lines.append(
            f"In-process ceiling (encoder + one head step per frame, torch threads {c['torch_threads']}): "
            f"{c['frames_per_s']:g} frames/s at batch {c['batch']} (before/after the load: "
            f"{c['before_after_frames_per_s']}); by batch: "
            + ", ".join(f"{r['batch']}: {r['frames_per_s']:g}" for r in c["rows"])
        )
    if sat_sum := s.get("saturation"):
        lines.append(
            f"Streams at saturation: {sat_sum['frames_per_s']:g} frames/s ({sat_sum['from']}) = "
            f"{sat_sum['of_ceiling']:.0%} of the ceiling, {sat_sum['of_ceiling_at_batch']:.0%} of the in-process rate "
            f"at batch {sat_sum['inprocess_batch']}; server CPU {_fmt(sat_sum['server_cpu_ms_per_frame'])} ms per "
            f"frame against {_fmt(sat_sum['inprocess_cpu_ms_per_frame_at_batch'])} ms in-process at that batch "
            f"(overhead {_fmt(sat_sum['server_overhead_cpu_ms_per_frame'])} ms/frame)"
        )
    for m in result["server_info"]:
        steps = m["streams"] or {}
        lines.append(
            f"Server: {m['name']} on {m['device']} ({m['precision']}), stream steps in {steps.get('mode')} mode, "
            f"batches of at most {steps.get('max_batch')} frames (autotuned: {steps.get('autotuned', False)})"
        )
    lines.append(f"Client: {result['client']['loop']}, {result['client']['note']}.")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("streams", help="WS /stream against /predict per frame: streams held at a frame rate")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint the server loads, or 'seed' for the seed-shaped model (default: the bundled model)",
    )
    p.add_argument("--env", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="server settings")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256], help="levels")
    p.add_argument("--fps", type=float, default=15.0, help="frames per second of each stream")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of each level before it is measured")
    p.add_argument("--p99-ms", type=float, default=100.0, help="a level is held at this p99 or less")
    p.add_argument(
        "--attempts",
        type=int,
        default=2,
        help="tries of a level before it counts as not held (the machine is shared: one stall of another "
        "tenant can fail a level); every try is in the JSON",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each level and ceiling, wait up to this many seconds for the machine to go quiet "
        "(under 0.15 cores used by every process together); 0: never",
    )
    p.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="streams (WS), clips (/predict)")
    p.add_argument("--window", type=int, help="frames per /predict (default: the model's clip length)")
    p.add_argument("--max-in-flight", type=int, default=8, help="clips: requests a stream has out before it skips")
    p.add_argument(
        "--compression",
        choices=("none", "deflate"),
        default="none",
        help="WebSocket permessage-deflate offered by the client (JPEG frames do not compress)",
    )
    p.add_argument(
        "--saturation-streams",
        type=int,
        nargs="*",
        default=[32, 64],
        help="streams of each saturation run (none: skip); 32 and 64 give step batches of 32 and 64 frames",
    )
    p.add_argument("--saturation-window", type=int, default=4, help="frames each keeps unanswered")
    p.add_argument(
        "--ceiling-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128], help="in-process batches"
    )
    p.add_argument("--ceiling-time", type=float, default=1.0, help="seconds per batch size (0: skip the ceiling)")
    p.add_argument(
        "--out", type=Path, help="JSON result file, or a folder for streams-<time>.json (default: bench/results)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    quiet_client_logs()
    result = run(args)
    out = write_outputs(result, args.out, "streams")
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``python -m bench.streams ...``: the command on its own, with the same flags."""
    parser = argparse.ArgumentParser(prog="python -m bench.streams")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["streams", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(cli())
