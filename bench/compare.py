"""A/B (or A/B/C) of server configurations: all up at once, closed-loop runs interleaved A, B, B, A, ...

Interleaving over ``--rounds`` spreads drift on a shared machine (other tenants, thermal,
page cache) over every side alike; the report gives each side's median per concurrency
and the ratios B/A (and C/A) for clips/s, p50 and p99. ``--b-frame-size`` sends side B
frames of another size (the same settings on both sides then compare inputs, not
configurations: 224x224 frames that the server resizes against frames already at the
model's size). ``--payload`` picks what every side is sent (multipart JPEG frames, an MP4,
base64 JSON frames, or ``v2`` binary tensors at the model's size), and with ``nvidia-smi``
each run records the GPU's utilisation. A side's ``PYTHON*`` variables keep their names, so
``--a PYTHONSAFEPATH=1,PYTHONPATH=/path/to/old/checkout`` runs side A on another commit.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.serve import (
    ServerProcess,
    build_payloads,
    closed_loop_load,
    machine,
    measure,
    parse_env,
    quiet_client_logs,
    resolve_checkpoint,
    running,
    server_info,
    warm_up,
    write_outputs,
)

METRICS = ("clips_per_s", "p50_ms", "p99_ms")


def parse_side(spec: str) -> dict[str, str]:
    """``KEY=VALUE,KEY=VALUE`` (empty: the defaults) as FUSIONSERVE_* variables."""
    return parse_env([item for item in spec.split(",") if item.strip()])


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def ratio(b: float | None, a: float | None) -> float | None:
    return round(b / a, 3) if a and b is not None else None


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per side (with the GPU's mean utilisation, None where it was not sampled), each other
    side's ratios over A, and the errors of all runs of one concurrency."""
    out: dict[str, Any] = {}
    for side in runs:
        out[side] = {m: median([r[m] for r in runs[side]]) for m in METRICS}
        out[side]["batch_size"] = median([r["server"]["batch_size"] for r in runs[side]])
        out[side]["errors"] = sum(sum(r["errors"].values()) for r in runs[side])
        out[side]["gpu_utilization_pct"] = median([r.get("gpu", {}).get("utilization_mean_pct") for r in runs[side]])
    for side in runs:
        if side != "A":
            out[f"ratio_{side.lower()}_over_a"] = {m: ratio(out[side][m], out["A"][m]) for m in METRICS}
    return out


async def run_rounds(servers: dict[str, ServerProcess], args: argparse.Namespace) -> dict[str, Any]:
    sizes = {side: args.frame_size for side in servers} | {"B": args.b_frame_size or args.frame_size}
    result: dict[str, Any] = {"runs": {}, "summary": {}, "frame_size": sizes}
    # Connections to both servers stay open between turns, so neither side pays for reconnecting.
    async with loadgen.make_client(2 * max(args.concurrency)) as client:
        result["server_info"] = {side: await server_info(client, s.url) for side, s in servers.items()}
        payloads = {side: await build_payloads(client, s.url, args, sizes[side]) for side, s in servers.items()}
        mean_bytes = {side: round(statistics.mean(len(p.body) for p in ps)) for side, ps in payloads.items()}
        result["payload_mean_bytes"] = mean_bytes
        for side, server in servers.items():
            await warm_up(client, server, payloads[side], args)
        for c in args.concurrency:
            runs: dict[str, list[dict[str, Any]]] = {side: [] for side in servers}
            for turn in range(args.rounds):
                # A B, then B A, ...: a side's position in a round (the first run after a level
                # change runs colder) does not favour either side
                order = list(servers.items()) if turn % 2 == 0 else list(servers.items())[::-1]
                for side, server in order:
                    load = closed_loop_load(client, server.url, payloads[side], c, args)
                    route = payloads[side][0].route
                    runs[side].append(await measure(client, server, load, args.rss_interval, route))
            result["runs"][str(c)] = runs
            result["summary"][str(c)] = summarise(runs)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = resolve_checkpoint(args.checkpoint)
    envs = {"A": parse_side(args.a), "B": parse_side(args.b)}
    if args.c is not None:
        envs["C"] = parse_side(args.c)
    servers = {side: ServerProcess(checkpoint, env) for side, env in envs.items()}
    with running(*servers.values()):
        rounds = asyncio.run(run_rounds(servers, args))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func", "out")}
    return {
        "benchmark": "compare",
        "machine": machine(),
        "settings": {**settings, "checkpoint": str(checkpoint)},
        "payload": args.payload,
        "server_env": envs,
        **rounds,
        "server_exit_codes": {side: s.exit_code for side, s in servers.items()},
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


def markdown(result: dict[str, Any]) -> str:
    sides = list(result["server_env"])
    others = sides[1:]
    head = "| concurrency | " + " | ".join(
        " | ".join([*(f"{side} {m}" for side in sides), *(f"{o}/A" for o in others)]) for m in METRICS
    )
    head += f" | batch {'/'.join(sides)} | errors {'/'.join(sides)} |"
    gpu = any(s[side]["gpu_utilization_pct"] is not None for s in result["summary"].values() for side in sides)
    head += f" GPU % {'/'.join(sides)} |" if gpu else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c, s in result["summary"].items():
        cells = [c]
        for m in METRICS:
            cells += [_fmt(s[side][m]) for side in sides]
            cells += [_fmt(s[f"ratio_{o.lower()}_over_a"][m]) for o in others]
        cells.append("/".join(_fmt(s[side]["batch_size"]) for side in sides))
        cells.append("/".join(str(s[side]["errors"]) for side in sides))
        if gpu:
            cells.append("/".join(_fmt(s[side]["gpu_utilization_pct"]) for side in sides))
        lines.append("| " + " | ".join(cells) + " |")
    env, sizes = result["server_env"], result["frame_size"]
    payload = result.get("payload", result["settings"]["payload"])
    sent = {side: f"{sizes[side]}px frames" for side in sides}
    if payload == "v2":  # tensors are drawn at the model's input size, whatever the frame size
        sent = dict.fromkeys(sides, "tensors at the model's input size")
    lines.append("")
    lines += [f"{side}: {env[side] or 'defaults'}, {sent[side]}" for side in sides]
    lines.append(f"payload: {payload}")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    from bench.serve import add_common

    p = sub.add_parser("compare", help="A/B two server configurations, interleaved, medians and ratio B/A")
    add_common(p)
    p.add_argument("--a", required=True, metavar="KEY=VALUE[,...]", help="settings of server A ('' for defaults)")
    p.add_argument("--b", required=True, metavar="KEY=VALUE[,...]", help="settings of server B")
    p.add_argument("--c", metavar="KEY=VALUE[,...]", help="settings of a third server C, also compared with A")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="closed-loop levels")
    p.add_argument("--rounds", type=int, default=2, help="turns per concurrency (A B, then B A, ...)")
    p.add_argument(
        "--b-frame-size", type=int, help="frame size of side B's requests (default: --frame-size, as side A)"
    )
    p.set_defaults(func=main, duration=5.0)


def main(args: argparse.Namespace) -> int:
    quiet_client_logs()
    result = run(args)
    out = write_outputs(result, args.out, "compare")
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 0
