"""Serving throughput and latency: ``python -m app`` in a subprocess under closed- and open-loop load.

For each closed-loop concurrency, then each open-loop rate, the client (bench/loadgen.py)
reports clips/s and latency percentiles; /metrics before and after the level gives the
server's own split (mean queue wait, decode time, inference time per batch, batch size),
/proc/<pid>/status the server's RSS while it ran (its decode processes included), and
``nvidia-smi``, where there is one, the GPU's utilisation.
``--rss-soak`` adds one long closed-loop run that samples RSS every second, to spot growth.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen, wrk

log = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
HISTOGRAMS = {
    "queue": "fusionserve_queue_seconds",
    "inference": "fusionserve_inference_seconds",
    "decode": "fusionserve_decode_seconds",
    "batch_size": "fusionserve_batch_size",
    "request": "fusionserve_request_seconds",  # by route; only the loaded route's series are summed
}
PREDICT_ROUTE = "/predict"  # the default route the load goes to (not /metrics, which the bench scrapes)
GPU_QUERY = ("--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits")
DROPPED = "fusionserve_dropped_clips_total"


RUNTIME_ENV = ("OMP_", "GOMP_", "MKL_", "MALLOC_", "PYTHON", "LD_PRELOAD")  # passed on as they are


def parse_env(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs as ``FUSIONSERVE_KEY`` variables (``max-batch-size``, ``MAX_BATCH_SIZE`` alike).

    Variables of the runtime beneath (``OMP_*``, ``GOMP_*``, ``MKL_*``, ``MALLOC_*``, ``PYTHON*``,
    ``LD_PRELOAD``) keep their names.
    """
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        key = key.strip().upper().replace("-", "_")
        env[key if key.startswith(("FUSIONSERVE_", *RUNTIME_ENV)) else f"FUSIONSERVE_{key}"] = value
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """``python -m app`` on a free port with extra ``FUSIONSERVE_*`` env; output goes to a temp file."""

    checkpoint: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    _log: Any = None
    _terminated: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def start(self, ready_timeout_s: float = 180.0) -> None:
        # Open for the server's whole life (closed in stop()), so no context manager; a file, not a pipe, never fills.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        cmd = [sys.executable, "-m", "app", "--port", str(self.port), "--checkpoint", str(self.checkpoint)]
        log.info("starting %s with %s", " ".join(cmd), self.env)
        self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout_s
        # One client for the whole wait: a bare httpx.get builds an SSL context each time (~40 ms of
        # CPU), which at 10 polls a second took a third of a core from the server while it timed
        # its batch sizes, and skewed what its autotuner chose.
        with httpx.Client(timeout=2) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/v2/health/ready").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready after {ready_timeout_s} s:\n{self.output_tail()}")
                time.sleep(0.1)

    def terminate(self) -> None:
        """SIGTERM once (a second one would make uvicorn skip its graceful shutdown)."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code (uvicorn re-raises SIGTERM: -15)."""
        self.terminate()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("server %d ignored SIGTERM for %.0f s; killing it", self.proc.pid, timeout_s)
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.exit_code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.exit_code

    def output_tail(self, chars: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]


@contextlib.contextmanager
def running(*servers: ServerProcess) -> Iterator[None]:
    """Start every server in turn (so start-up autotuning runs alone), stop them all together on the way out."""
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.stop()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the server's decode processes), from /proc; [pid] without it."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            for task in Path(f"/proc/{pids[i]}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
        i += 1
    return pids


def rss_mb(pid: int) -> float | None:
    """VmRSS of ``pid`` and its child processes (decode processes) together in MiB, None when the
    server's own is unreadable (process gone, no /proc). Pages shared between them count in each."""
    total = None
    for one in process_tree(pid):
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total = (total or 0.0) + int(line.split()[1]) / 1024.0
        except (OSError, ValueError):
            if one == pid:
                return None
    return total


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` (all its threads) and its child processes in seconds, None when
    the server's own is unreadable."""
    total = 0.0
    for one in process_tree(pid):
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, ValueError, IndexError):
            if one == pid:
                return None
    return total


class RssSampler:
    """Samples a process's RSS every ``interval_s`` on the event loop while inside ``async with``."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval_s)

    def _sample(self) -> None:
        if (mb := rss_mb(self.pid)) is not None:
            self.samples.append(round(mb, 1))

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._sample()

    def summary(self) -> dict[str, float | None]:
        s = self.samples
        if not s:
            return dict.fromkeys(("start_mb", "max_mb", "end_mb"))
        return {"start_mb": s[0], "max_mb": max(s), "end_mb": s[-1]}


def visible_gpu() -> str:
    """The GPU the server runs on, as nvidia-smi's ``--id`` takes it: the first of
    ``CUDA_VISIBLE_DEVICES`` (an index or a UUID), else 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def parse_gpu_sample(line: str) -> tuple[float, float] | None:
    """One line of ``nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits``
    as (utilisation %, memory used MiB); None for anything else (``[N/A]``, a warning)."""
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != 2:
        return None
    try:
        return float(fields[0]), float(fields[1])
    except ValueError:
        return None


class GpuSampler:
    """The GPU's utilisation and memory from ``nvidia-smi -lms``, every ``interval_ms``, while inside
    ``async with``; without nvidia-smi, or when it fails, no samples and the reason why."""

    def __init__(self, interval_ms: int = 200, gpu: str | None = None) -> None:
        self.interval_ms, self.gpu = interval_ms, gpu or visible_gpu()
        self.samples: list[tuple[float, float]] = []
        self.reason: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            if (sample := parse_gpu_sample(line.decode(errors="replace"))) is not None:
                self.samples.append(sample)

    async def __aenter__(self) -> GpuSampler:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            self.reason = "nvidia-smi is not on PATH"
            return self
        args = (*GPU_QUERY, f"--id={self.gpu}", "-lms", str(self.interval_ms))
        self._proc = await asyncio.create_subprocess_exec(
            exe, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is None or self._reader is None:
            return
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own
            self._proc.terminate()
        await self._proc.wait()
        # what nvidia-smi wrote before it ended is read; a child of a wrapper script may hold the pipe open
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 0.5)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        if not self.samples:
            assert self._proc.stderr is not None
            raw = b""
            with contextlib.suppress(asyncio.TimeoutError):
                raw = await asyncio.wait_for(self._proc.stderr.read(), 0.5)
            err = raw.decode(errors="replace").strip()[-300:]
            self.reason = f"nvidia-smi exited with {self._proc.returncode} and no sample: {err}"

    def summary(self) -> dict[str, Any]:
        """Mean and max utilisation (%) and max memory used (MiB) over the samples, or the reason there are none."""
        if not self.samples:
            return {"unavailable": self.reason or "no sample"}
        util = [u for u, _ in self.samples]
        return {
            "gpu": self.gpu,
            "samples": len(self.samples),
            "utilization_mean_pct": round(statistics.fmean(util), 1),
            "utilization_max_pct": max(util),
            "memory_used_max_mib": max(m for _, m in self.samples),
        }


async def scrape(client: httpx.AsyncClient, url: str, route: str = PREDICT_ROUTE) -> dict[str, float]:
    """The ``_sum`` and ``_count`` of each histogram in HISTOGRAMS and the dropped-clips total, summed
    over labels; of the request histogram, only ``route``'s series (the route template)."""
    text = (await client.get(f"{url}/metrics")).text
    wanted = {f"{h}{suffix}" for h in HISTOGRAMS.values() for suffix in ("_sum", "_count")} | {DROPPED}
    totals = dict.fromkeys(wanted, 0.0)
    label = f'route="{route}"'
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        name = key.split("{", 1)[0]
        if name in totals and (not name.startswith(HISTOGRAMS["request"]) or label in key):
            totals[name] += float(value)
    return totals


def server_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Means over one level from the counter deltas: ms per queued clip, per decode, per batch, per request
    of the loaded route (from the ASGI app's first byte to its last: the server's side of a request's latency);
    clips per batch."""

    def mean(hist: str, scale: float) -> float | None:
        n = after[f"{hist}_count"] - before[f"{hist}_count"]
        return round((after[f"{hist}_sum"] - before[f"{hist}_sum"]) / n * scale, 3) if n else None

    return {
        "queue_ms": mean(HISTOGRAMS["queue"], 1000.0),
        "decode_ms": mean(HISTOGRAMS["decode"], 1000.0),
        "inference_ms_per_batch": mean(HISTOGRAMS["inference"], 1000.0),
        "batch_size": mean(HISTOGRAMS["batch_size"], 1.0),
        "request_ms": mean(HISTOGRAMS["request"], 1000.0),
        "batches": after[f"{HISTOGRAMS['inference']}_count"] - before[f"{HISTOGRAMS['inference']}_count"],
        "dropped_clips": after[DROPPED] - before[DROPPED],
    }


async def settle(client: httpx.AsyncClient, server: ServerProcess, quiet_s: float = 1.0, limit_s: float = 60.0) -> None:
    """Wait until the server has finished the work a level left behind (a closed-loop level ends
    with requests still queued): for ``quiet_s``, no batch finished, no clip dropped, and the
    server process used under 5% of a core."""
    deadline = time.monotonic() + limit_s
    last, cpu = await scrape(client, server.url), cpu_seconds(server.pid)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        now, cpu_now = await scrape(client, server.url), cpu_seconds(server.pid)
        busy = cpu is not None and cpu_now is not None and cpu_now - cpu > 0.05 * 0.25
        if now != last or busy:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        last, cpu = now, cpu_now
    log.warning("the server did not go idle within %.0f s; measuring the ceiling anyway", limit_s)


async def measure(
    client: httpx.AsyncClient,
    server: ServerProcess,
    load: Awaitable[loadgen.LevelResult | wrk.WrkResult],
    rss_interval_s: float,
    route: str = PREDICT_ROUTE,
) -> dict[str, Any]:
    """Await ``load`` (one level against ``server``, to ``route``) with RSS and GPU sampling and a
    /metrics delta around it."""
    before = await scrape(client, server.url, route)
    async with RssSampler(server.pid, rss_interval_s) as rss, GpuSampler() as gpu:
        result = await load
    after = await scrape(client, server.url, route)
    return {
        **result.summary(),
        "late": result.late,
        "dropped": result.dropped,
        "server": server_split(before, after),
        "rss": rss.summary(),
        "gpu": gpu.summary(),
    }


async def warm_up(client: httpx.AsyncClient, server: ServerProcess, payloads: list[loadgen.Payload], args: Any) -> None:
    """A short closed-loop run whose numbers are thrown away; fails loudly if nothing succeeds."""
    concurrency = max(args.concurrency or [4])
    result = await loadgen.closed_loop(client, server.url, payloads, concurrency, args.warmup)
    if not result.statuses.get("200"):
        raise RuntimeError(f"warm-up got no 200 from {server.url}: {dict(result.statuses)}")


async def server_info(client: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    """Device, runtime options and batch limits of each served model (from GET /models)."""
    models = (await client.get(f"{url}/models")).json()["models"]
    keys = ["name", "device", "precision", "cuda_graphs", "compiled", "batchnorm_folded", "frames_per_pass"]
    keys += ["batching", "input"]
    return [{k: m.get(k) for k in keys} for m in models]


async def model_input(client: httpx.AsyncClient, url: str) -> loadgen.ModelInput:
    """The default model's name and input size (from GET /models), for v2 tensors."""
    listing = (await client.get(f"{url}/models")).json()
    model = next(m for m in listing["models"] if m["name"] == listing["default"])
    spec = model["input"]
    return loadgen.ModelInput(model["name"], spec["height"], spec["width"], spec["channels"])


async def build_payloads(client: httpx.AsyncClient, url: str, args: Any, size: int) -> list[loadgen.Payload]:
    """``--clips`` bodies of ``--payload``, frames at ``size`` pixels (v2: at the served model's size)."""
    model = await model_input(client, url) if args.payload == "v2" else None
    return loadgen.build_payloads(args.payload, args.clips, args.frames, size, model)


async def heap_mb(client: httpx.AsyncClient, url: str) -> tuple[float, float] | None:
    """The server's glibc heap from ``fusionserve_heap_bytes``: (MiB in use, MiB free), None without it."""
    found: dict[str, float] = {}
    for line in (await client.get(f"{url}/metrics")).text.splitlines():
        if line.startswith("fusionserve_heap_bytes{"):
            key, _, value = line.rpartition(" ")
            found[key.split('state="', 1)[1].split('"', 1)[0]] = float(value) / 2**20
    return (round(found["in_use"], 1), round(found["free"], 1)) if {"in_use", "free"} <= found.keys() else None


async def sample_heap(client: httpx.AsyncClient, url: str, out: list[tuple[float, float]], interval_s: float) -> None:
    """Append ``heap_mb`` every ``interval_s`` until cancelled."""
    while True:
        if (heap := await heap_mb(client, url)) is not None:
            out.append(heap)
        await asyncio.sleep(interval_s)


async def soak(
    client: httpx.AsyncClient, server: ServerProcess, payloads: list[loadgen.Payload], args: Any
) -> dict[str, Any]:
    """One closed-loop run at ``--soak-concurrency`` for ``--rss-soak`` s, RSS and the heap (in use
    against free, from /metrics) sampled every second."""
    heap: list[tuple[float, float]] = []
    sampler = asyncio.create_task(sample_heap(client, server.url, heap, 1.0))
    try:
        async with RssSampler(server.pid, 1.0) as rss:
            result = await loadgen.closed_loop(client, server.url, payloads, args.soak_concurrency, args.rss_soak)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    s = rss.samples
    used = [u for u, _ in heap]
    return {
        "concurrency": args.soak_concurrency,
        "duration_s": args.rss_soak,
        **result.summary(),
        "rss_first_mb": s[0] if s else None,
        "rss_last_mb": s[-1] if s else None,
        "rss_max_mb": max(s) if s else None,
        "rss_last_over_first": round(s[-1] / s[0], 3) if s else None,
        # the first sample is the idle server; the working set of concurrent batches is mapped in the
        # first seconds of load, so growth after that is measured from the sample 10 s in
        "rss_at_10s_mb": s[10] if len(s) > 10 else None,
        "rss_last_over_10s": round(s[-1] / s[10], 3) if len(s) > 10 else None,
        "rss_samples_mb": s,
        # in use swings with the batches in flight; free is held heap that no block uses (fragmentation)
        "heap_in_use_max_mb": max(used) if used else None,
        "heap_free_last_mb": heap[-1][1] if heap else None,
        "heap_samples_mb": [list(h) for h in heap],
    }


async def paired_c1(
    client: httpx.AsyncClient,
    server: ServerProcess,
    payloads: list[loadgen.Payload],
    probe: InRunCeiling,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The p50 at concurrency 1 against one request's work done in-process, in pairs close in time.

    The machine's speed drifts by up to 1.5x within a minute, so a latency measured in one
    window and its in-process reference in another differ by the drift. Here each pair is a
    short c=1 burst against the server (``--c1-pair-time`` s) followed at once by the same
    time of in-process decoding + forward at batch 1 (``InRunCeiling.single``); the gap
    reported is the median over the pairs of (p50 - in-process), against one clip decoded and
    then run, as a request is (``p50_over_inprocess_ms``), and against each step timed hot in
    a loop of its own (``p50_over_hot_ms``).
    """
    burst_args = argparse.Namespace(**{**vars(args), "duration": args.c1_pair_time})
    pairs = []
    url, route = server.url, payloads[0].route
    for _ in range(args.c1_pairs):
        burst = await measure(client, server, closed_loop_load(client, url, payloads, 1, burst_args), 1.0, route)
        one = probe.single(payloads[0], args.c1_pair_time / 2)  # on this thread: see InRunCeiling
        if burst["p50_ms"] is not None:
            pairs.append({"p50_ms": burst["p50_ms"], "server_ms": burst["server"]["request_ms"], **one})
    out: dict[str, Any] = {}
    if args.c1_interleaved:
        out["c1_interleaved"] = probe.interleaved(url, payloads[0], args.c1_interleaved)
    if not pairs:
        return out

    def median(key: str) -> float:
        return round(statistics.median(p[key] for p in pairs), 2)

    return out | {
        "c1_pairs": pairs,
        "inprocess": {k: median(k) for k in ("decode_ms", "forward_ms", "total_ms", "hot_total_ms")},
        "p50_over_inprocess_ms": round(statistics.median(p["p50_ms"] - p["total_ms"] for p in pairs), 2),
        "p50_over_hot_ms": round(statistics.median(p["p50_ms"] - p["hot_total_ms"] for p in pairs), 2),
    }


async def run_levels(
    server: ServerProcess, args: argparse.Namespace, probe: InRunCeiling | None = None, batch: int = 1
) -> dict[str, Any]:
    """The closed-loop levels, then the open-loop rates, then the RSS soak. With ``probe``, the
    ceiling at ``batch`` clips is measured between closed-loop levels (the server idle), and
    each level gets the measurements right before and after it as ``ceiling_around``."""
    url = server.url
    conns = max([*args.concurrency, args.max_in_flight, args.soak_concurrency if args.rss_soak else 1])
    out: dict[str, Any] = {"closed_loop": [], "open_loop": []}
    async with loadgen.make_client(conns) as client:
        out["server_info"] = await server_info(client, server.url)
        payloads = await build_payloads(client, url, args, args.frame_size)
        route = payloads[0].route
        out["payload_mean_bytes"] = round(statistics.mean(len(p.body) for p in payloads))
        await warm_up(client, server, payloads, args)
        spot = probe.at(batch) if probe is not None and args.concurrency else None
        for c in args.concurrency:
            load = closed_loop_load(client, url, payloads, c, args)
            row = {"concurrency": c, **await measure(client, server, load, args.rss_interval, route)}
            if probe is not None and spot is not None:
                await settle(client, server)  # the ceiling is timed with the server idle
                after = probe.at(batch)
                row["ceiling_around"] = [spot[0], after[0]]
                spot = after
            if c == 1 and probe is not None and (args.c1_pairs or args.c1_interleaved):
                row |= await paired_c1(client, server, payloads, probe, args)
            out["closed_loop"].append(row)
            log.info("closed loop c=%d: %s", c, row)
        for rate in args.rates:
            load = loadgen.open_loop(
                client, url, payloads, rate, args.duration, args.max_in_flight, poisson=args.arrivals == "poisson"
            )
            out["open_loop"].append({"rate": rate, **await measure(client, server, load, args.rss_interval, route)})
            log.info("open loop rate=%g: %s", rate, out["open_loop"][-1])
        if args.rss_soak:
            out["rss_soak"] = await soak(client, server, payloads, args)
        if probe is not None:
            await settle(client, server)  # before the ceiling's second sweep
    return out


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def resolve_checkpoint(path: Path | None) -> Path:
    """A checkpoint file; ``seed`` writes the seed-shaped model to build/seed-shape-lstm.safetensors."""
    if path is not None and str(path) == "seed":
        from bench.ceiling import seed_shaped_checkpoint

        return seed_shaped_checkpoint(Path("build") / "seed-shape-lstm.safetensors")
    if path is not None:
        return path
    from models import default_checkpoint

    return default_checkpoint()


class InRunCeiling:
    """The model's in-process clips/s (``frames`` per clip), sustained over ``seconds`` per measurement.

    Measured in this process while the server idles, through the server's own runtime on
    the device the server picks (CUDA when present: bf16 where supported, CUDA graphs;
    else the CPU, with the allocator tuned as the server tunes it), from uint8 clips in
    host memory, so that the end-to-end numbers of the same run can be divided by it.
    ``sweep`` times batch sizes 1-64; ``at`` one size, between load levels, so that each
    level also has a ceiling measured right before and right after it.

    Every measurement runs on the thread that made it (the main thread, the event loop
    blocked meanwhile), never on a worker thread: a second thread that runs torch on two
    threads gets a second OpenMP team, and with more team threads than cores libgomp's
    workers sleep between parallel regions instead of spinning, and the ceiling reads low.
    """

    BATCHES = (1, 2, 4, 8, 16, 32, 64)

    def __init__(self, checkpoint: Path, frames: int, seconds: float, pass_pixels: int | None = None) -> None:
        from app.runtime import ModelRuntime, pick_precision
        from app.settings import PASS_PIXELS
        from host.device import pick_device
        from host.malloc import tune_malloc
        from models import load_checkpoint

        tune_malloc()
        self.device = pick_device("auto")
        self.spec = (ckpt := load_checkpoint(checkpoint, device=self.device)).input
        self.frames, self.seconds = frames, seconds
        self.runtime = ModelRuntime(
            ckpt,
            self.device,
            precision=pick_precision("auto", self.device),
            cuda_graphs=True,
            pass_pixels=PASS_PIXELS if pass_pixels is None else pass_pixels,  # the server's, unless set
        )
        self.runtime.warm_up(frames)
        self.runtime.prepare(max(self.BATCHES))  # graphs for the model's clip length, as the server does

    def at(self, batch: int) -> tuple[float, float]:
        """(sustained, peak) clips/s at ``batch`` clips."""
        from bench.ceiling import random_clips, timed_calls

        clips, lengths = random_clips(batch, self.frames, self.spec)
        sustained, fastest = timed_calls(lambda: self.runtime.run(clips, lengths).result(), self.seconds)
        return round(batch / sustained, 1), round(batch / fastest, 1)

    def decoder(self, payload: loadgen.Payload) -> Callable[[], Any]:
        """The server's decoding of ``payload`` (``app.uploads``; a JSON body parsed and its base64
        decoded, a v2 body parsed into its tensor, as ``app.api.kserve`` does), as a call."""
        from app.preprocess import array_to_clip, tensor_to_clips
        from app.uploads import Target, image_frames, parse_json, video_frames
        from media import FrameFormat, Limits

        target = Target(FrameFormat.of(self.spec), self.frames, Limits(max(payload.frames, self.frames), 1 << 31))
        if payload.kind == "mp4":
            return lambda: array_to_clip(video_frames(payload.media[0], target, payload.frames))
        if payload.kind == "json":
            return lambda: array_to_clip(image_frames(parse_json(payload.body, target, None).images or [], target))
        if payload.kind == "v2":
            from app.api.kserve import parse_infer

            header = payload.request_headers[loadgen.V2_HEADER]
            return lambda: tensor_to_clips(parse_infer(payload.body, header, target, 1).array, target.format)[0]
        return lambda: array_to_clip(image_frames(list(payload.media), target))

    def interleaved(self, url: str, payload: loadgen.Payload, requests: int, warmup: int = 5) -> dict[str, Any]:
        """``requests`` requests of ``payload`` to the server at ``url``, one at a time, each followed
        at once by the same clip decoded and run at batch 1 in-process: a pair takes tens of
        milliseconds, so the machine's drift, which moves both by up to 1.5x within a minute, cancels within each pair.

        The client is httpx (a request at a time, the prebuilt body; its own overhead, a few
        tenths of a millisecond, counts against the server). Reports the medians of both and
        the median over the pairs of their difference (``gap_ms``)."""
        import torch

        decode = self.decoder(payload)
        lengths = torch.tensor([payload.frames])
        latency, inprocess = [], []
        with httpx.Client(timeout=120) as http:
            for i in range(warmup + requests):
                started = time.perf_counter()
                http.post(url + payload.path, content=payload.body, headers=payload.request_headers).raise_for_status()
                answered = time.perf_counter()
                self.runtime.run(decode(), lengths).result()
                if i >= warmup:
                    latency.append(answered - started)
                    inprocess.append(time.perf_counter() - answered)
        ms = [(a * 1000, b * 1000) for a, b in zip(latency, inprocess, strict=True)]
        return {
            "requests": requests,
            "p50_ms": round(statistics.median(a for a, _ in ms), 2),
            "inprocess_ms": round(statistics.median(b for _, b in ms), 2),
            "gap_ms": round(statistics.median(a - b for a, b in ms), 2),
        }

    def single(self, payload: loadgen.Payload, seconds: float | None = None) -> dict[str, float]:
        """What one request of ``payload`` costs in-process: the server's decoding of its parts
        (``app.preprocess``, on this thread), then a forward pass at batch 1 of that clip.

        ``decode_ms``/``forward_ms``/``total_ms``: decode then forward, one clip after another,
        for ``seconds`` (default: the ceiling's), as a request does them. ``hot_total_ms``: each
        step in a loop of its own for ``seconds / 2`` each, the same clip over and over; its
        caches stay warm, so it reads about 1-2 ms lower on this machine.
        """
        import torch

        from bench.ceiling import timed_calls

        decode = self.decoder(payload)
        clip = decode()
        lengths = torch.tensor([clip.shape[0]])
        self.runtime.run(clip, lengths).result()
        seconds = self.seconds if seconds is None else seconds
        decoding = forwarding = 0.0
        calls = 0
        while decoding + forwarding < seconds or calls < 3:
            started = time.perf_counter()
            one = decode()
            decoded = time.perf_counter()
            self.runtime.run(one, lengths).result()
            decoding, forwarding = decoding + decoded - started, forwarding + time.perf_counter() - decoded
            calls += 1
        hot = (
            timed_calls(decode, seconds / 2)[0]
            + timed_calls(lambda: self.runtime.run(clip, lengths).result(), seconds / 2)[0]
        )
        ms = {"decode_ms": decoding / calls * 1000, "forward_ms": forwarding / calls * 1000}
        ms |= {"total_ms": ms["decode_ms"] + ms["forward_ms"], "hot_total_ms": hot * 1000}
        return {k: round(v, 2) for k, v in ms.items()}

    def sweep(self) -> dict[str, Any]:
        rows = []
        for batch in self.BATCHES:
            sustained, peak = self.at(batch)
            rows.append({"batch": batch, "clips_per_s": sustained, "peak_clips_per_s": peak})
        best = max(rows, key=lambda r: r["clips_per_s"])
        return {
            "device": str(self.device),
            "precision": self.runtime.precision,
            **{k: best[k] for k in ("clips_per_s", "batch")},
            "rows": rows,
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = parse_env(args.env)
    server = ServerProcess(resolve_checkpoint(args.checkpoint), env)
    ceilings = []
    with running(server):
        # before and after the load: the better of the two sweeps is the run's ceiling
        pass_pixels = env.get("FUSIONSERVE_ENCODER_PASS_PIXELS")
        probe = (
            InRunCeiling(server.checkpoint, args.frames, args.ceiling_time, int(pass_pixels) if pass_pixels else None)
            if args.ceiling_time > 0
            else None
        )
        if probe is not None:
            ceilings.append(probe.sweep())
        levels = asyncio.run(run_levels(server, args, probe, ceilings[0]["batch"] if ceilings else 1))
        if probe is not None:
            ceilings.append(probe.sweep())
    if ceilings:
        best = max(ceilings, key=lambda c: c["clips_per_s"])
        levels["ceiling"] = {**best, "before_after_clips_per_s": [c["clips_per_s"] for c in ceilings]}
        for row in levels["closed_loop"]:
            row["of_ceiling"] = round(row["clips_per_s"] / best["clips_per_s"], 3)
            around = max(row["ceiling_around"])  # the better of the two measured right around this level
            row["of_ceiling_around"] = round(row["clips_per_s"] / around, 3)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func", "out")}
    return {
        "benchmark": "serve",
        "machine": machine(),
        "settings": {**settings, "checkpoint": str(server.checkpoint)},
        "payload": args.payload,
        "server_env": env,
        **levels,
        "server_exit_code": server.exit_code,
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def markdown(result: dict[str, Any]) -> str:
    """One table row per level: client view, then the server's split, RSS and (with nvidia-smi) the GPU's use."""
    head = (
        "| load | clips/s | p50 ms | p90 ms | p99 ms | errors | late/dropped | server ms/request | queue ms "
        "| decode ms | infer ms/batch | batch | RSS MB start/max/end |"
    )
    rows = [(f"c={r['concurrency']}", r) for r in result["closed_loop"]]
    rows += [(f"{r['rate']:g}/s", r) for r in result["open_loop"]]
    gpu = any("samples" in r.get("gpu", {}) for _, r in rows)
    head += " GPU % mean/max |" if gpu else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows:
        s, m = r["server"], r["rss"]
        errors = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0"
        cells = [name, r["clips_per_s"], r["p50_ms"], r["p90_ms"], r["p99_ms"], errors, f"{r['late']}/{r['dropped']}"]
        cells += [s["request_ms"], s["queue_ms"], s["decode_ms"], s["inference_ms_per_batch"], s["batch_size"]]
        cells.append("/".join(_fmt(m[k]) for k in ("start_mb", "max_mb", "end_mb")))
        if gpu:
            g = r.get("gpu", {})
            cells.append(f"{_fmt(g.get('utilization_mean_pct'))}/{_fmt(g.get('utilization_max_pct'))}")
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    if not gpu and rows and (reason := rows[0][1].get("gpu", {}).get("unavailable")):
        lines.append(f"\nGPU utilisation: not sampled ({reason})")
    if (ceiling := result.get("ceiling")) and result["closed_loop"]:
        lines.append(
            f"\nIn-process ceiling of this run: {ceiling['clips_per_s']:g} clips/s at batch {ceiling['batch']} "
            f"(before/after the load: {ceiling['before_after_clips_per_s']}); end to end as a share of it: "
            + ", ".join(f"c={r['concurrency']} {r['of_ceiling']:.0%}" for r in result["closed_loop"])
            + f"; against the ceiling at batch {ceiling['batch']} measured right before and after each level: "
            + ", ".join(
                f"c={r['concurrency']} {r['of_ceiling_around']:.0%} (of {max(r['ceiling_around']):g})"
                for r in result["closed_loop"]
            )
        )
    for r in result["closed_loop"]:
        if "p50_over_inprocess_ms" in r:
            one, pairs = r["inprocess"], r["c1_pairs"]
            lines.append(
                f"\nc=1 in {len(pairs)} pairs (a {result['settings']['c1_pair_time']:g} s burst, then the same "
                f"work in-process): p50 {[p['p50_ms'] for p in pairs]} ms against in-process "
                f"{[p['total_ms'] for p in pairs]} ms (median decode {_fmt(one['decode_ms'])} + forward at batch 1 "
                f"{_fmt(one['forward_ms'])}, one clip after another); median gap {r['p50_over_inprocess_ms']:+g} ms "
                f"({r['p50_over_hot_ms']:+g} ms against each step timed hot in its own loop, "
                f"{_fmt(one['hot_total_ms'])} ms)"
            )
    for r in result["closed_loop"]:
        if inter := r.get("c1_interleaved"):
            lines.append(
                f"\nc=1 interleaved, {inter['requests']} requests one at a time, each followed by the same clip "
                f"decoded and run in-process: p50 {_fmt(inter['p50_ms'])} ms against {_fmt(inter['inprocess_ms'])} ms "
                f"in-process; median gap over the pairs {inter['gap_ms']:+g} ms"
            )
    if soak_result := result.get("rss_soak"):
        lines.append(
            f"\nRSS soak (c={soak_result['concurrency']}, {soak_result['duration_s']:g} s): "
            f"first {_fmt(soak_result['rss_first_mb'])} MB, last {_fmt(soak_result['rss_last_mb'])} MB, "
            f"max {_fmt(soak_result['rss_max_mb'])} MB, last/first {_fmt(soak_result['rss_last_over_first'])}, "
            f"at 10 s {_fmt(soak_result.get('rss_at_10s_mb'))} MB, "
            f"last/10 s {_fmt(soak_result.get('rss_last_over_10s'))}; heap in use at most "
            f"{_fmt(soak_result.get('heap_in_use_max_mb'))} MB, "
            f"free at the end {_fmt(soak_result.get('heap_free_last_mb'))} MB"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """clips/s and p99 latency against closed-loop concurrency, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["closed_loop"]
    xs = [r["concurrency"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, [r["clips_per_s"] for r in rows], "o-")
    ax1.set(xlabel="concurrency", ylabel="clips/s", title="throughput")
    ax2.plot(xs, [r["p99_ms"] if r["p99_ms"] is not None else float("nan") for r in rows], "o-", color="C1")
    ax2.set(xlabel="concurrency", ylabel="p99 latency (ms)", title="p99 latency")
    for ax in (ax1, ax2):
        if len(set(xs)) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"fusionserve {result['settings']['payload']} {result['settings']['frame_size']}px")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path | None, stem: str) -> Path:
    """Write the JSON (and PNG next to it when there are closed-loop rows); returns the JSON path.

    ``out`` is a file, or an existing folder to write ``<stem>-<time>.json`` in (default: bench/results).
    """
    if out is None or out.is_dir():
        out = (out or RESULTS) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def closed_loop_load(
    client: httpx.AsyncClient, url: str, payloads: list[loadgen.Payload], concurrency: int, args: Any
) -> Awaitable[loadgen.LevelResult | wrk.WrkResult]:
    """One closed-loop level against the server at ``url`` from ``wrk`` (``--client wrk``, or ``auto`` when it is
    installed) or the Python client."""
    if args.client == "wrk" or (args.client == "auto" and wrk.available()):
        return wrk.closed_loop(url, payloads, concurrency, args.duration)
    return loadgen.closed_loop(client, url, payloads, concurrency, args.duration)


def add_common(p: argparse.ArgumentParser) -> None:
    """Flags that serve and compare share: what the server loads and what the client sends."""
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint the server loads, or 'seed' for the seed-shaped model (default: the bundled model)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded closed-loop load first")
    p.add_argument("--frame-size", type=int, default=64, help="canvas size of the sent frames in pixels")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument(
        "--payload",
        choices=loadgen.KINDS,
        default="jpeg",
        help="POST /predict with multipart JPEG frames, one MP4, or JSON base64 JPEG frames; or v2: "
        "POST /v2/models/{model}/infer with a binary uint8 tensor at the model's input size",
    )
    p.add_argument("--clips", type=int, default=8, help="distinct prebuilt request bodies, sent round-robin")
    p.add_argument("--rss-interval", type=float, default=0.25, help="seconds between RSS samples in a level")
    p.add_argument(
        "--out", type=Path, help="JSON result file, or a folder for <command>-<time>.json (default: bench/results)"
    )
    p.add_argument(
        "--client",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="closed-loop load from wrk (auto: when installed; far less client CPU) or the Python client",
    )


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="server clips/s and latency under closed- and open-loop load")
    add_common(p)
    p.add_argument("--env", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="server settings")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16, 64], help="closed-loop levels")
    p.add_argument("--rates", type=float, nargs="*", default=[20.0, 50.0], help="open-loop arrivals per second")
    p.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson", help="open-loop arrival process")
    p.add_argument("--max-in-flight", type=int, default=256, help="open loop: arrivals over this many are dropped")
    p.add_argument(
        "--c1-pairs",
        type=int,
        default=5,
        help="after the c=1 level: short c=1 bursts, each followed by the same work in-process, for the p50 "
        "against in-process decode + forward (0: skip; needs the ceiling)",
    )
    p.add_argument("--c1-pair-time", type=float, default=2.0, help="seconds of each burst and of its in-process half")
    p.add_argument(
        "--c1-interleaved",
        type=int,
        default=200,
        metavar="REQUESTS",
        help="after the c=1 level: requests one at a time (httpx), each followed by the same clip decoded and run "
        "in-process; the median gap per pair (0: skip; needs the ceiling)",
    )
    p.add_argument("--rss-soak", type=float, default=0.0, metavar="SECONDS", help="add a long run sampling RSS")
    p.add_argument("--soak-concurrency", type=int, default=64)
    p.add_argument(
        "--ceiling-time",
        type=float,
        default=1.0,
        help="seconds per batch size of the in-process ceiling, measured before and after the load "
        "and at its best batch size between levels (0: skip)",
    )
    p.set_defaults(func=main)


def quiet_client_logs() -> None:
    """httpx logs every request at INFO; that would cost the client CPU under load when INFO is on."""
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(args: argparse.Namespace) -> int:
    quiet_client_logs()
    result = run(args)
    out = write_outputs(result, args.out, "serve")
    if result["closed_loop"]:
        plot(result, out.with_suffix(".png"))
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 0
