"""Rollouts behind nginx: ``python -m bench rollout``.

Three replicas of ``python -m app`` (processes, each on a port of its own) behind nginx (Debian's
package, a child process on a config rendered from deploy/nginx/fusionserve.conf.template into a
temporary folder), under closed-loop load of real JPEG clips through nginx. Two phases:

- rolling restart: each replica in turn gets SIGTERM (it drains for ``DRAIN_S``, answering new
  requests 503 so that nginx sends them elsewhere, then closes its listener and answers what it
  accepted), exits, and a new one starts on the same port; the next waits until it is ready;
- kill: one replica gets SIGKILL mid-load, stays down a moment, and is started again.

Each phase reports the requests sent, answered 200 and failed (by status or error), latency
percentiles, and from nginx's access log the requests it retried on another replica (a line whose
``$upstream_addr`` lists more than one replica) with the status of each failed first try.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import loadgen
from bench.serve import ServerProcess, free_port, machine, parse_env, resolve_checkpoint, write_outputs
from bench.streams import Connections

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "fusionserve.conf.template"
NGINX_PLACES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
# Small timeouts keep a replica's shutdown short (it waits DECODE_TIMEOUT_S + REQUEST_TIMEOUT_S + 5 s at
# most); one torch thread and one decode thread each, since three replicas share the machine's cores.
REPLICA_ENV = {
    "DECODE_TIMEOUT_S": "10",
    "REQUEST_TIMEOUT_S": "10",
    "AUTOTUNE": "false",
    "MAX_BATCH_SIZE": "8",
    "INSTANCES": "1",
    "TORCH_THREADS": "1",
    "DECODE_WORKERS": "1",
}
CLIENT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)
UPSTREAMS = re.compile(r'upstream_addr="([^"]*)" upstream_status="([^"]*)"')


def find_nginx() -> str | None:
    """nginx on PATH, or where Debian and source builds put it (/usr/sbin is not on every user's PATH)."""
    return shutil.which("nginx") or next((p for p in NGINX_PLACES if os.access(p, os.X_OK)), None)


def render_nginx(servers: list[str], listen: str, access_log: str, template: str | None = None) -> str:
    """The template (deploy/nginx/fusionserve.conf.template) for ``servers`` (``host:port`` each): its
    ``{{server}}`` line once per server, ``{{listen}}`` and ``{{access_log}}`` filled in."""
    lines = []
    for line in (TEMPLATE.read_text() if template is None else template).splitlines(keepends=True):
        lines += [line.replace("{{server}}", s) for s in servers] if "{{server}}" in line else [line]
    text = "".join(lines).replace("{{listen}}", listen).replace("{{access_log}}", access_log)
    assert "{{" not in text, f"placeholder left in the nginx config: {text[text.index('{{') :][:40]!r}"
    return text


def main_config(folder: Path, include: Path) -> str:
    """A whole nginx.conf around the rendered ``include``: in the foreground, everything under ``folder``."""
    temps = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi"))
    temps += "\n" + "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in ("uwsgi", "scgi"))
    return (
        f"daemon off;\nmaster_process on;\nworker_processes 1;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} error;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n{temps}\n    include {include};\n}}\n"
    )


@dataclass
class Nginx:
    """nginx in the foreground (a child process) in front of ``servers``, its files in a temporary folder."""

    servers: list[str]
    binary: str
    template: Path = TEMPLATE
    port: int = field(default_factory=free_port)
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fusionserve-nginx-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def access_log(self) -> Path:
        return self.folder / "access.log"

    @property
    def error_log(self) -> Path:
        return self.folder / "error.log"

    def write_config(self) -> Path:
        site = self.folder / "fusionserve.conf"
        listen, template = f"127.0.0.1:{self.port}", self.template.read_text()
        site.write_text(render_nginx(self.servers, listen, str(self.access_log), template))
        conf = self.folder / "nginx.conf"
        conf.write_text(main_config(self.folder, site))
        if os.geteuid() == 0:  # nginx's workers run as nobody under a root master: let them into the folder
            self.folder.chmod(0o755)
        return conf

    def command(self) -> list[str]:
        return [self.binary, "-p", str(self.folder), "-c", str(self.folder / "nginx.conf"), "-e", str(self.error_log)]

    def start(self, timeout_s: float = 10.0) -> None:
        self.write_config()
        subprocess.run([*self.command(), "-t", "-q"], check=True, capture_output=True)
        # its errors go to error.log (-e and error_log), so nothing is read from its output
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self.errors()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx not listening after {timeout_s} s: {self.errors()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def errors(self) -> str:
        return self.error_log.read_text(errors="replace")[-2000:] if self.error_log.exists() else ""

    def offsets(self) -> tuple[int, int]:
        """Where the access and error logs end now (a phase reads what its run appended)."""
        sizes = [p.stat().st_size if p.exists() else 0 for p in (self.access_log, self.error_log)]
        return sizes[0], sizes[1]

    def read(self, since: tuple[int, int]) -> tuple[list[str], list[str]]:
        out = []
        for path, offset in zip((self.access_log, self.error_log), since, strict=True):
            with path.open("rb") as f:
                f.seek(offset)
                out.append(f.read().decode(errors="replace").splitlines())
        return out[0], out[1]


def nginx_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def retries(access: list[str]) -> dict[str, Any]:
    """Requests nginx sent to more than one replica, by the status of every failed try (502: the
    connection was refused or dropped; 503: the replica said it is draining or full; 504: a timeout)
    and by the replica that failed; ``no_live_upstreams``: requests that found every replica out."""
    retried, failed_tries, failed_on, no_live = 0, Counter[str](), Counter[str](), 0
    for line in access:
        if not (m := UPSTREAMS.search(line)):
            continue
        addrs = [a.strip() for a in m[1].replace(" : ", ", ").split(",")]
        statuses = [s.strip() for s in m[2].replace(" : ", ", ").split(",")]
        if any(":" not in a for a in addrs):  # the upstream group's name: no replica could be tried
            no_live += 1
        if len(addrs) > 1:
            retried += 1
            for addr, status in zip(addrs[:-1], statuses[:-1], strict=False):
                failed_tries[status] += 1
                failed_on[addr] += 1
    return {
        "logged": len(access),
        "retried": retried,
        "failed_tries_by_status": dict(sorted(failed_tries.items())),
        "failed_tries_by_replica": dict(sorted(failed_on.items())),
        "no_live_upstreams": no_live,
    }


def error_kinds(errors: list[str]) -> dict[str, int]:
    """nginx's error-log lines by what went wrong with a replica."""
    kinds = {
        "connection_refused": "Connection refused",
        "connection_reset": "Connection reset",
        "closed_prematurely": "prematurely closed",
        "no_live_upstreams": "no live upstreams",
        "timed_out": "timed out",
    }
    return {name: sum(needle in line for line in errors) for name, needle in kinds.items()}


@dataclass
class Record:
    started: float
    seconds: float
    status: str  # "200", "503", or the client error's name


async def closed_loop(port: int, requests: list[bytes], concurrency: int, stop: asyncio.Event) -> list[Record]:
    """``concurrency`` workers post back-to-back through nginx (raw keep-alive sockets, bench.streams'
    client: a few tens of microseconds of CPU a request) until ``stop`` is set; in-flight requests finish."""
    records: list[Record] = []

    async def worker(i: int) -> None:
        conns = Connections("127.0.0.1", port)
        k = i
        try:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    status = str((await conns.exchange(requests[k % len(requests)]))[0])
                except CLIENT_ERRORS as exc:
                    status = type(exc).__name__
                records.append(Record(started, time.perf_counter() - started, status))
                k += concurrency
        finally:
            conns.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return records


def summarise(records: list[Record]) -> dict[str, Any]:
    statuses = Counter(r.status for r in records)
    ok_ms = np.asarray([r.seconds for r in records if r.status == "200"]) * 1000.0
    pct = {f"p{q}_ms": round(float(np.percentile(ok_ms, q)), 1) if len(ok_ms) else None for q in (50, 99)}
    elapsed = max(r.started + r.seconds for r in records) - min(r.started for r in records) if records else 0.0
    return {
        "sent": len(records),
        "ok": statuses.get("200", 0),
        "failed": len(records) - statuses.get("200", 0),
        "failed_by": {k: v for k, v in sorted(statuses.items()) if k != "200"},
        **pct,
        "max_ms": round(float(ok_ms.max()), 1) if len(ok_ms) else None,
        "seconds": round(elapsed, 1),
        "ok_per_s": round(statuses.get("200", 0) / elapsed, 1) if elapsed else 0.0,
    }


def drain_bound_s(env: dict[str, str]) -> float:
    """How long a replica with ``env`` (``FUSIONSERVE_*`` variables) can take to stop after SIGTERM:
    ``DRAIN_S``, then its longest accepted request (``DECODE_TIMEOUT_S`` + ``REQUEST_TIMEOUT_S`` + 5 s)."""
    from app.settings import Settings

    prefix = "FUSIONSERVE_"
    given: dict[str, Any] = {k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)}
    settings = Settings(**given)
    return settings.drain_s + settings.longest_request_s


@dataclass
class Fleet:
    """The replicas, each a ``ServerProcess`` on a fixed port; a restarted one starts on the same port."""

    checkpoint: Path
    env: dict[str, str]
    ports: list[int]
    replicas: list[ServerProcess] = field(default_factory=list)

    @property
    def stop_timeout_s(self) -> float:
        """Past this, stop() kills a replica: its drain and its longest request, with room."""
        return drain_bound_s(self.env) + 10

    async def start(self) -> None:
        self.replicas = [ServerProcess(self.checkpoint, self.env, port=port) for port in self.ports]
        await asyncio.gather(*(asyncio.to_thread(r.start) for r in self.replicas))

    async def restart(self, i: int) -> dict[str, Any]:
        """SIGTERM replica ``i``, wait for it to exit, start a new one on its port and wait until it is ready."""
        began = time.perf_counter()
        code = await asyncio.to_thread(self.replicas[i].stop, self.stop_timeout_s)
        exited = time.perf_counter()
        await self._replace(i)
        return {
            "replica": i,
            "port": self.ports[i],
            "exit_code": code,
            "exit_s": round(exited - began, 2),
            "ready_s": round(time.perf_counter() - exited, 2),
        }

    async def kill(self, i: int, down_s: float) -> dict[str, Any]:
        """SIGKILL replica ``i``, leave it down ``down_s``, then start a new one on its port."""
        old = self.replicas[i]
        assert old.proc is not None, "replica not started"
        old.proc.kill()
        await asyncio.to_thread(old.proc.wait)
        code = old.stop()  # closes its log
        await asyncio.sleep(down_s)
        began = time.perf_counter()
        await self._replace(i)
        ready_s = round(time.perf_counter() - began, 2)
        return {"replica": i, "port": self.ports[i], "exit_code": code, "down_s": down_s, "ready_s": ready_s}

    async def _replace(self, i: int) -> None:
        self.replicas[i] = ServerProcess(self.checkpoint, self.env, port=self.ports[i])
        await asyncio.to_thread(self.replicas[i].start)

    def stop(self) -> None:
        for replica in self.replicas:
            replica.terminate()
        for replica in self.replicas:
            replica.stop(self.stop_timeout_s)


Steps = Callable[[], Awaitable[list[dict[str, Any]]]]


async def no_steps() -> list[dict[str, Any]]:
    return []


async def phase(nginx: Nginx, requests: list[bytes], args: argparse.Namespace, steps: Steps) -> dict[str, Any]:
    """Load through nginx for ``--lead-s``, then ``steps()`` (the restarts), then ``--tail-s``; what the
    client saw, and what nginx retried, over the whole phase."""
    since = nginx.offsets()
    stop = asyncio.Event()
    load = asyncio.create_task(closed_loop(nginx.port, requests, args.concurrency, stop))
    await asyncio.sleep(args.lead_s)
    events = await steps()
    await asyncio.sleep(args.tail_s)
    stop.set()
    records = await load
    await asyncio.sleep(0.2)  # nginx writes a request's log line after its answer
    access, errors = nginx.read(since)
    return {**summarise(records), "nginx": {**retries(access), "errors": error_kinds(errors)}, "events": events}


async def phases(fleet: Fleet, nginx: Nginx, requests: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """Start the replicas, warm up (not counted), then the rolling restart and the kill."""

    async def rolling() -> list[dict[str, Any]]:
        events = []
        for i in range(len(fleet.ports)):
            events.append(await fleet.restart(i))
            await asyncio.sleep(args.settle_s)  # nginx tries a replica it took out again after its fail_timeout
        return events

    async def kill() -> list[dict[str, Any]]:
        return [await fleet.kill(args.kill_replica, args.down_s)]

    await fleet.start()
    warm_args = argparse.Namespace(**{**vars(args), "lead_s": args.warmup_s, "tail_s": 0.0})
    warm = await phase(nginx, requests, warm_args, no_steps)
    if not warm["ok"]:
        raise RuntimeError(f"no request answered 200 through nginx in the warm-up: {warm['failed_by']}")
    return {
        "rolling_restart": await phase(nginx, requests, args, rolling),
        "kill": await phase(nginx, requests, args, kill),
    }


def request_bytes(payloads: list[loadgen.Payload], port: int) -> list[bytes]:
    """Each payload as a whole ``POST /predict`` request, written to the socket as it is."""
    return [
        f"POST /predict HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: {p.content_type}\r\n"
        f"content-length: {len(p.body)}\r\n\r\n".encode()
        + p.body
        for p in payloads
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    binary = find_nginx()
    if binary is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx)")
    env = parse_env([f"{k}={v}" for k, v in REPLICA_ENV.items()] + [f"DRAIN_S={args.drain_s:g}", *args.env])
    fleet = Fleet(resolve_checkpoint(args.checkpoint), env, [free_port() for _ in range(args.replicas)])
    nginx = Nginx([f"127.0.0.1:{p}" for p in fleet.ports], binary, args.template)
    payloads = loadgen.build_payloads("jpeg", args.clips, args.frames, args.frame_size)
    requests = request_bytes(payloads, nginx.port)
    try:
        nginx.start()
        config = (nginx.folder / "fusionserve.conf").read_text()
        result = asyncio.run(phases(fleet, nginx, requests, args))
    finally:
        nginx.stop()
        fleet.stop()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func", "out")}
    return {
        "benchmark": "rollout",
        "machine": {**machine(), "nginx": nginx_version(binary)},
        "settings": {**settings, "checkpoint": str(fleet.checkpoint)},
        "replica_env": env,
        "nginx_config": config,
        **result,
    }


def markdown(result: dict[str, Any]) -> str:
    """One row per phase: what the client saw, then what nginx retried."""
    head = "| phase | sent | 200 | failed | p50 ms | p99 ms | max ms | 200/s | nginx retried (failed tries) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in ("rolling_restart", "kill"):
        r = result[name]
        failed = f"{r['failed']}" + (
            f" ({', '.join(f'{k}: {v}' for k, v in r['failed_by'].items())})" if r["failed"] else ""
        )
        tries = ", ".join(f"{k}: {v}" for k, v in r["nginx"]["failed_tries_by_status"].items()) or "-"
        cells = [name.replace("_", " "), r["sent"], r["ok"], failed, r["p50_ms"], r["p99_ms"], r["max_ms"]]
        cells += [r["ok_per_s"], f"{r['nginx']['retried']} ({tries})"]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    for name in ("rolling_restart", "kill"):
        for e in result[name]["events"]:
            took = f"exited in {e['exit_s']} s" if "exit_s" in e else f"down {e['down_s']:g} s"
            lines.append(
                f"\n{name.replace('_', ' ')}: replica {e['replica']} (port {e['port']}, exit code {e['exit_code']}) "
                f"{took}, the new one ready in {e['ready_s']} s"
            )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("rollout", help="rolling restart and a killed replica behind nginx, under load")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint the replicas load, or 'seed' for the seed-shaped model (default: the bundled model)",
    )
    p.add_argument("--replicas", type=int, default=3, help="replicas behind nginx")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop requests in flight through nginx")
    p.add_argument("--drain-s", type=float, default=2.0, help="each replica's DRAIN_S")
    p.add_argument("--warmup-s", type=float, default=2.0, help="seconds of load before the phases, not counted")
    p.add_argument("--lead-s", type=float, default=3.0, help="seconds of load before a phase's first restart")
    p.add_argument("--tail-s", type=float, default=3.0, help="seconds of load after a phase's last restart")
    p.add_argument(
        "--settle-s",
        type=float,
        default=2.0,
        help="after a replica is ready, before the next restart (nginx's fail_timeout)",
    )
    p.add_argument("--kill-replica", type=int, default=1, help="the replica the kill phase sends SIGKILL")
    p.add_argument("--down-s", type=float, default=2.0, help="how long the killed replica stays down")
    p.add_argument("--frame-size", type=int, default=64, help="canvas size of the sent JPEG frames in pixels")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--clips", type=int, default=8, help="distinct prebuilt request bodies, sent round-robin")
    p.add_argument("--env", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="replica settings")
    p.add_argument(
        "--template",
        type=Path,
        default=TEMPLATE,
        help="nginx config template (default: deploy/nginx/fusionserve.conf.template), to measure another shape",
    )
    p.add_argument(
        "--out", type=Path, help="JSON result file, or a folder for rollout-<time>.json (default: bench/results)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    out = write_outputs(result, args.out, "rollout")
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 0
