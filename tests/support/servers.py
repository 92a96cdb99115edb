"""Real servers over real sockets: ``live_server`` runs uvicorn in a thread of the test process
(a real HTTP server on a free port); ``spawn_server`` runs ``python -m app`` as a subprocess
(for signals and process-level behaviour)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn

from app.api.connections import guard
from app.main import create_app
from app.settings import Settings


@contextlib.contextmanager
def live_server(**settings: Any) -> Iterator[str]:
    """Serve ``create_app(Settings(**settings))`` with uvicorn on a free port; yields the base URL."""
    chosen = Settings(port=0, **settings)
    app = create_app(chosen)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, http=chosen.http)
    config.load()
    guard(config, chosen)  # as python -m app runs it
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def spawn_server(
    *flags: str,
    env: dict[str, str] | None = None,
    sigint_ignored: bool = False,
    new_session: bool = False,
    cwd: str | None = None,
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -m app`` in a subprocess on a free port; yields (process, base URL) once ready.
    ``sigint_ignored``: started with SIGINT ignored, as a shell starts a background job;
    ``new_session``: in a process group of its own (with its children), to signal as a terminal does;
    ``cwd``: the folder it starts in."""
    port = free_port()
    cmd = [sys.executable, "-m", "app", "--port", str(port), *flags]
    if sigint_ignored:  # the shell execs python in its place: same pid, SIGINT still ignored
        cmd = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *cmd]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
        cwd=cwd,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        # one client for the whole wait: each bare httpx.get builds an SSL context (~40 ms of CPU),
        # which at 10 polls a second took a third of a core from the starting server
        with httpx.Client(timeout=1) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited early: {proc.stdout.read() if proc.stdout else ''}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/v2/health/ready").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("server not ready in time")
                time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in Prometheus text whose labels include ``labels`` (every sample
    of it when none are given), 0 when there are none."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if key == name or (key.startswith(name + "{") and all(p in key for p in want)):
                total += float(value)
    return total


def flags_of(**settings: Any) -> list[str]:
    """``python -m app`` flags for settings given as ``Settings`` keywords."""
    flags = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


@contextlib.contextmanager
def frontends_server(frontends: int = 2, **settings: Any) -> Iterator[str]:
    """``python -m app --frontends N`` (an engine and N front ends) with ``settings``; yields the base URL."""
    with spawn_server("--frontends", str(frontends), *flags_of(**settings)) as (_, url):
        yield url


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that still run (Linux)."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return sorted(found)


SERVER_KINDS = ("one process", "two front ends")  # the e2e modules that run against both take this as params


@contextlib.contextmanager
def server_of(kind: str, **settings: Any) -> Iterator[str]:
    """A server of ``kind`` (one of ``SERVER_KINDS``) with ``settings``: ``live_server`` or ``frontends_server``."""
    chosen = live_server(**settings) if kind == SERVER_KINDS[0] else frontends_server(2, **settings)
    with chosen as url:
        yield url
