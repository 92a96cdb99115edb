"""The engine's front ends: started once the models are ready, replaced when one dies, stopped first.

The engine binds the port itself and hands the listening socket to every front end it starts
(``python -m app frontend``, with the socket and the front end's arena as inherited descriptors and
the settings on its standard input), so the kernel spreads new connections over the front ends.
A front end that exits while the engine serves (killed, out of memory) is started again with a new
arena; only the requests it held are lost, and the engine withdraws their clips. On shutdown the
front ends are stopped before the engine: each stops accepting and answers what it accepted, with
the engine still serving them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from app.frontends import arena
from app.frontends.port import ClipPort
from app.service import Service
from app.settings import Settings

log = logging.getLogger(__name__)
YOUNG_S = 10.0  # a front end that exits sooner after its start is started again after a growing wait
MAX_BACKOFF_S = 30.0


def settings_document(settings: Settings) -> str:
    """The settings, whole (the API key too), for a front end's standard input: never in its argv or env."""
    data = settings.model_dump(mode="json")
    data["api_key"] = settings.api_key.get_secret_value() if settings.api_key else None
    return json.dumps(data)


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The server's listening socket, inheritable by the front ends."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class Engine:
    """The engine's front ends and its clip port, for ``FRONTENDS`` > 1 (``app.main.create_app`` runs it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.count = settings, settings.frontends
        self.run_dir = Path(tempfile.mkdtemp(prefix="fusionserve-"))
        self.http_path = str(self.run_dir / "engine.sock")  # the engine's own HTTP server: every other route
        self.clip_path = str(self.run_dir / "clips.sock")
        self.restarts = 0
        self.port: ClipPort | None = None
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._started: dict[int, float] = {}  # when each front end was last started (time.monotonic())
        self._failures: dict[int, int] = {}  # each front end's exits in a row within YOUNG_S of its start
        self._arenas: dict[int, mmap.mmap] = {}
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def arena_bytes(self) -> int:
        return int(self.settings.frontend_shm_mb * (1 << 20))

    async def start(self, service: Service) -> None:
        """Open the clip port, bind the port, and start the front ends."""
        self.port = ClipPort(service, self.clip_path, self._arenas.__getitem__)
        await self.port.start()
        self._listener = listen(self.settings.host, self.settings.port)
        host, port = self._listener.getsockname()[:2]
        for index in range(self.count):
            self._spawn(index)
        self._watch = threading.Thread(target=self._watch_frontends, name="frontends", daemon=True)
        self._watch.start()
        log.info("serving on http://%s:%d: %d front ends, this engine (pid %d)", host, port, self.count, os.getpid())

    def drain(self) -> None:
        if self.port is not None:
            self.port.drain()

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs.values()]

    def _spawn(self, index: int) -> None:
        assert self._listener is not None
        fd = arena.create(self.arena_bytes)
        try:
            self._arenas[index] = arena.mapping(fd)
            listen_fd = self._listener.fileno()
            cmd = [sys.executable, "-m", "app", "frontend", str(index), str(listen_fd), str(fd), str(self.run_dir)]
            proc = subprocess.Popen(cmd, pass_fds=(listen_fd, fd), stdin=subprocess.PIPE)
        finally:
            os.close(fd)  # mapped here, inherited there
        assert proc.stdin is not None
        proc.stdin.write(settings_document(self.settings).encode())
        proc.stdin.close()
        with self._lock:
            self._procs[index] = proc
        self._started[index] = time.monotonic()
        log.info("front end %d started (pid %d)", index, proc.pid)

    def _watch_frontends(self) -> None:
        """Start a front end again when one exits; one that keeps dying young waits longer each time (up to
        ``MAX_BACKOFF_S``), so a front end that cannot start does not spin."""
        while not self._stopping.wait(0.2):
            with self._lock:
                exited = [(i, p) for i, p in self._procs.items() if p.poll() is not None]
            for index, proc in exited:
                lived = time.monotonic() - self._started[index]
                self._failures[index] = self._failures.get(index, 0) + 1 if lived < YOUNG_S else 0
                wait = min(MAX_BACKOFF_S, 2.0 ** self._failures[index] - 1)
                code = proc.returncode
                log.warning("front end %d (pid %d) exited (%s); another in %.0f s", index, proc.pid, code, wait)
                if self._stopping.wait(wait):
                    return
                self.restarts += 1
                self._spawn(index)

    def stop_frontends(self, timeout_s: float) -> None:
        """Stop every front end (SIGTERM: it stops accepting and answers what it accepted), within ``timeout_s``."""
        self._stopping.set()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("front end pid %d did not stop in %.0f s; killed", proc.pid, timeout_s)
                proc.kill()
                proc.wait()
        if self._listener is not None:
            self._listener.close()

    async def close(self) -> None:
        """After the front ends: close the clip port and remove the sockets' folder."""
        if not self._stopping.is_set():
            await asyncio.to_thread(self.stop_frontends, self.settings.longest_request_s + 5)
        if self.port is not None:
            await self.port.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
