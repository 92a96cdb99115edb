"""Where a request's CPU time goes with front ends: the engine's one interpreter against the front ends'.

``python -m bench frontends --checkpoint FILE|seed --frontends 1 2 4 --concurrency 16`` starts the
real server once per ``FRONTENDS`` value and sends it closed-loop load (``--concurrency`` clients,
each on its own connection) of 16-frame clips at the model's size: JPEG frames as multipart, or
``--payload v2`` binary tensors. Around each measured run it reads the CPU time (user + system,
``/proc/PID/task/*/stat``) of the engine's threads and of its front ends, and reports the CPU
milliseconds each answered request cost in the engine (by thread: its event loop, its decode
threads, and the model's threads) and in the front ends, with clips/s. Every request meets the
engine's interpreter; on a GPU, where the model costs the CPU little, what the engine spends outside
the model (its event loop and decoding) bounds the requests per second it can take, and that is
what front ends move out of its way. Each setting runs ``--rounds`` times, the settings taking turns.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.serve import ServerProcess, machine, parse_env, quiet_client_logs, resolve_checkpoint
from bench.serve import write_outputs as write_json

TICKS = os.sysconf("SC_CLK_TCK")
FRAMES = 16


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (its own threads; not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def by_thread(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid``'s threads by what they do: ``loop`` (the main thread: the event loop),
    ``decode`` (the decode threads) and ``model`` (every other: batchers, steppers, torch's threads)."""
    seconds = {"loop": 0.0, "decode": 0.0, "model": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                name, rest = f.read().split(" (", 1)[1].rsplit(")", 1)
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        fields = rest.split()
        kind = "loop" if tid == str(pid) else "decode" if name.startswith("decode") else "model"
        seconds[kind] += (int(fields[11]) + int(fields[12])) / TICKS
    return seconds


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def request_of(payload: str, model: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
    """(path, headers, body) of one clip at the model's input size."""
    spec = model["input"]
    height, width = spec["height"], spec["width"]
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (FRAMES, height, width, 3), dtype=np.uint8)
    if payload == "v2":
        head = {
            "inputs": [
                {
                    "name": "frames",
                    "datatype": "UINT8",
                    "shape": [1, FRAMES, height, width, 3],
                    "parameters": {"binary_data_size": clip.size},
                }
            ]
        }
        encoded = json.dumps(head).encode()
        headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(encoded))}
        return f"/v2/models/{model['name']}/infer", headers, encoded + clip.tobytes()
    files = []
    for i, frame in enumerate(clip):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "JPEG", quality=90)
        files.append(("frames", (f"{i}.jpg", buf.getvalue(), "image/jpeg")))
    request = httpx.Request("POST", "http://x/predict", files=files)
    return "/predict", {"content-type": request.headers["content-type"]}, request.read()


async def load(url: str, request: tuple[str, dict[str, str], bytes], clients: int, seconds: float) -> int:
    """Closed-loop load for ``seconds``; the count of 200 answers."""
    path, headers, body = request
    done = 0
    stop = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while time.monotonic() < stop:
                r = await http.post(path, headers=headers, content=body)
                done += r.status_code == 200

    await asyncio.gather(*(client() for _ in range(clients)))
    return done


def measure(server: ServerProcess, payload: str, clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    """One measured run against a started server: CPU ms per request in the engine and front ends, clips/s."""
    model = httpx.get(f"{server.url}/models", timeout=10).json()["models"][0]
    request = request_of(payload, model)
    asyncio.run(load(server.url, request, clients, warmup))
    fronts = children(server.pid)
    engine0, fronts0 = by_thread(server.pid), sum(cpu_seconds(p) for p in fronts)
    started = time.monotonic()
    answered = asyncio.run(load(server.url, request, clients, seconds))
    took = time.monotonic() - started
    engine1, fronts1 = by_thread(server.pid), sum(cpu_seconds(p) for p in fronts)
    per = 1000 / max(answered, 1)
    engine = {kind: (engine1[kind] - engine0[kind]) * per for kind in engine0}
    return {
        "answered": answered,
        "clips_per_s": answered / took,
        "engine_cpu_ms_per_request": sum(engine.values()),
        "engine_cpu_ms_per_request_by_thread": engine,
        "engine_outside_model_ms_per_request": engine["loop"] + engine["decode"],
        "frontends_cpu_ms_per_request": (fronts1 - fronts0) * per,
        "front_end_pids": fronts,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = resolve_checkpoint(args.checkpoint)
    rows: dict[str, list[dict[str, Any]]] = {str(n): [] for n in args.frontends}
    for _ in range(args.rounds):
        for n in args.frontends:
            server = ServerProcess(checkpoint, env={**parse_env(args.env), "FUSIONSERVE_FRONTENDS": str(n)})
            server.start()
            try:
                rows[str(n)].append(measure(server, args.payload, args.concurrency, args.duration, args.warmup))
            finally:
                server.stop()
    summary = {
        n: {
            key: float(np.median([r[key] for r in runs]))
            for key in (
                "clips_per_s",
                "engine_cpu_ms_per_request",
                "engine_outside_model_ms_per_request",
                "frontends_cpu_ms_per_request",
            )
        }
        for n, runs in rows.items()
    }
    return {
        "checkpoint": str(checkpoint),
        "payload": args.payload,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "env": args.env,
        "machine": machine(),
        "runs": rows,
        "median": summary,
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser("frontends", help="CPU per request in the engine and in front ends (FRONTENDS)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint, or 'seed' (default: the bundled)")
    p.add_argument("--frontends", type=int, nargs="+", default=[1, 2], help="FRONTENDS values, in turn")
    p.add_argument("--payload", choices=("jpeg", "v2"), default="jpeg")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load first, not measured")
    p.add_argument("--rounds", type=int, default=2, help="runs of every setting, taking turns")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="more settings of every server")
    p.add_argument("--out", type=Path, default=None, help="JSON result file (default: bench/results)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    quiet_client_logs()
    result = run(args)
    path = write_json(result, args.out, "frontends")
    for n, row in result["median"].items():
        print(
            f"FRONTENDS={n}: {row['clips_per_s']:.0f} clips/s, CPU per request: engine "
            f"{row['engine_cpu_ms_per_request']:.2f} ms ({row['engine_outside_model_ms_per_request']:.2f} outside "
            f"the model), front ends {row['frontends_cpu_ms_per_request']:.2f} ms"
        )
    print(f"wrote {path}")
    return 0
