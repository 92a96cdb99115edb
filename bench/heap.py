"""``python -m bench heap``: what the server's heap holds under sustained load, from inside its process.

The server runs in this process (uvicorn in a thread, as ``python -m app`` serves) so that the
allocator's own counts (glibc's ``mallinfo2``, or jemalloc's statistics when it is preloaded into
this process) can be read often enough to see the peak of the memory in use: a
thread samples the bytes in use every ``--peak-interval`` s (5 ms) and keeps the largest. Every
``--interval`` s a row records RSS, the heap's size, what of it is in use and free, and that peak.
The load is ``wrk`` (closed loop, its own process, so its memory is not counted here) posting
16-frame JPEG clips. When the heap keeps growing after the peak in use has stopped rising, what
grows is fragmentation: heap that is free, resident, and too split up to take the next large block
(or garbage the cyclic collector has not freed yet, which the in-use count includes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from bench import loadgen, wrk
from bench.serve import machine, resolve_checkpoint
from host.malloc import heap_stats


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return round(pages * 4096 / 2**20, 1)


def heap_row() -> dict[str, float]:
    heap, in_use, free = heap_stats() or (0, 0, 0)
    return {"heap_mb": round(heap / 2**20, 1), "in_use_mb": round(in_use / 2**20, 1), "free_mb": round(free / 2**20, 1)}


def serve_in_thread(settings: dict[str, Any]) -> tuple[uvicorn.Server, threading.Thread, str]:
    from app.main import create_app
    from app.settings import Settings

    server = uvicorn.Server(uvicorn.Config(create_app(Settings(port=0, **settings)), port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def run(args: argparse.Namespace) -> int:
    if heap_stats() is None:
        raise SystemExit("bench heap needs glibc 2.33+ (mallinfo2) or a preloaded jemalloc")
    if not wrk.available():
        raise SystemExit("bench heap needs wrk (Debian package wrk) as the load generator")
    settings: dict[str, Any] = {"checkpoint": resolve_checkpoint(args.checkpoint)}
    for item in args.env:
        key, _, value = item.partition("=")
        settings[key.strip().lower().replace("-", "_").removeprefix("fusionserve_")] = value
    server, thread, url = serve_in_thread(settings)
    rows: list[dict[str, float]] = []
    peak = [0]
    stop = threading.Event()

    def track_peak() -> None:
        while not stop.wait(args.peak_interval):
            peak[0] = max(peak[0], (heap_stats() or (0, 0, 0))[1])

    def record(t0: float) -> None:
        while not stop.wait(args.interval):
            rows.append(
                {
                    "t_s": round(time.monotonic() - t0, 1),
                    "rss_mb": rss_mb(),
                    **heap_row(),
                    "peak_in_use_mb": round(peak[0] / 2**20, 1),
                }
            )

    try:
        start = {"rss_mb": rss_mb(), **heap_row()}
        payloads = loadgen.build_payloads("jpeg", args.clips, args.frames, args.frame_size)
        for target, extra in ((track_peak, ()), (record, (time.monotonic(),))):
            threading.Thread(target=target, args=extra, daemon=True).start()
        result = asyncio.run(wrk.closed_loop(f"{url}/predict", payloads, args.concurrency, args.duration)).summary()
    finally:
        stop.set()
        server.should_exit = True
        thread.join(timeout=60)
    end = rows[-1] if rows else None
    out = {
        "benchmark": "heap",
        "machine": machine(),
        "settings": {k: str(v) for k, v in settings.items()},
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "load": result,
        "start": start,
        "rows": rows,
        "peak_in_use_mb": end["peak_in_use_mb"] if end else None,
        "heap_end_mb": end["heap_mb"] if end else None,
        # the part of the heap that the peak in use never needed: fragmentation
        "heap_over_peak_in_use": round(end["heap_mb"] / end["peak_in_use_mb"], 3) if end else None,
    }
    lines = ["| t s | RSS MB | heap MB | in use MB | free MB | peak in use MB |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['t_s']} | {r['rss_mb']} | {r['heap_mb']} | {r['in_use_mb']} | {r['free_mb']} | {r['peak_in_use_mb']} |"
        for r in rows
    ]
    lines.append(f"\nload: {result['clips_per_s']} clips/s, {result['ok']} answered, errors {result['errors']}")
    lines.append(f"heap at the end / peak in use: {out['heap_over_peak_in_use']}")
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nJSON: {args.out}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("heap", help="the server's heap under load, from inside its process (in use, free, peak)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint file, or seed (default: bundled)")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="server settings (MAX_BATCH_SIZE=16)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=45.0)
    p.add_argument("--interval", type=float, default=3.0, help="seconds between rows")
    p.add_argument("--peak-interval", type=float, default=0.005, help="seconds between samples of the bytes in use")
    p.add_argument("--clips", type=int, default=8, help="distinct clips the load cycles through")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--frame-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=run)
