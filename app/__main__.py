"""``python -m app``: serve checkpoints over HTTP.

Every flag mirrors a ``FUSIONSERVE_*`` variable (``--max-batch-size`` and
``FUSIONSERVE_MAX_BATCH_SIZE``); a flag wins over the variable. On SIGTERM or
SIGINT readiness turns false at once, new work gets 503 for ``--drain-s`` seconds,
then the listener closes, every accepted request is answered, and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from app.api.connections import GracefulWebSockets, guard
from app.frontends.supervisor import Engine
from app.main import create_app, create_frontend_app
from app.settings import GROUPS, Settings

log = logging.getLogger("app")


def build_parser() -> argparse.ArgumentParser:
    """One flag per setting, in the settings' groups (docs/configuration.md)."""
    parser = argparse.ArgumentParser(prog="python -m app", description="Serve fusionserve checkpoints over HTTP.")
    for title, group in GROUPS.items():
        section = parser.add_argument_group(title)
        for name, field in group.model_fields.items():
            flag = "--" + name.replace("_", "-")
            help_text = f"{field.description or ''} (env FUSIONSERVE_{name.upper()})".strip()
            if field.annotation is bool:
                section.add_argument(
                    flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
                )
            else:
                section.add_argument(flag, dest=name, default=None, help=help_text)
    return parser


class DrainingServer(uvicorn.Server):
    """On a stop signal: mark the service draining (ready -> 503), wait ``drain_s``, then stop as uvicorn does.
    With an ``engine`` (``FRONTENDS`` > 1), its front ends are told at once and stopped before the engine:
    its streams are ended first (each answers what it received, then closes 1001), then the front ends
    answer what they accepted."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float, engine: Engine | None = None) -> None:
        super().__init__(config)
        self.app, self.drain_s, self.engine = app, drain_s, engine
        self.signals: list[int] = []  # the stop signals received, in order
        self._stopping: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)
        service = getattr(self.app.state, "service", None)
        if service is not None and not service.draining:
            service.draining = True
            if self.engine is not None:
                self.engine.drain()
            log.info("signal %s: draining for %.1f s, then closing", sig, self.drain_s)
            if self.drain_s > 0:
                asyncio.get_running_loop().call_later(self.drain_s, self._close, sig, frame)
                return
        self._close(sig, frame)

    def _close(self, sig: int, frame: FrameType | None) -> None:
        if self.engine is None or self._stopping is not None:  # a second signal: uvicorn's own way
            super().handle_exit(sig, frame)
            return
        for connection in list(self.server_state.connections):
            if isinstance(connection, GracefulWebSockets):
                connection.shutdown()  # the streams the front ends pass through end once answered
        timeout = self.config.timeout_graceful_shutdown or 60
        self._stopping = asyncio.get_running_loop().create_task(asyncio.to_thread(self.engine.stop_frontends, timeout))
        self._stopping.add_done_callback(lambda _: super(DrainingServer, self).handle_exit(sig, frame))


def uvicorn_config(app: Any, settings: Settings, **where: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``settings``; ``where``: the address (none: sockets handed to ``run``)."""
    return uvicorn.Config(
        app,
        **where,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.longest_request_s,
        timeout_keep_alive=settings.keep_alive_s,
        access_log=False,
        loop=settings.loop,
        http=settings.http,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["frontend"]:
        return frontend(*argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        parser.error(f"invalid settings:\n{exc}")  # usage and the problem on stderr, exit status 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(settings) if settings.frontends > 1 else None
    app = create_app(settings, engine)
    where: dict[str, Any] = {"uds": engine.http_path} if engine else {"host": settings.host, "port": settings.port}
    config = uvicorn_config(app, settings, **where)
    config.load()  # resolves "auto" to the parser uvicorn will use (the lifespan logs the event loop)
    log.info("HTTP parser: %s", config.http_protocol_class.__name__)
    guard(config, settings)  # connection, header and body limits (app.api.connections)
    server = DrainingServer(config, app, settings.drain_s, engine)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises SIGINT once it has shut down cleanly: no traceback
        return 130  # the shell's status for an interrupted command
    if signal.SIGINT in server.signals:  # stopped by SIGINT, whose re-raise did not come back as
        return 130  # KeyboardInterrupt (ignored when inherited so, or taken by asyncio's own handler)
    return 0 if server.started else 1


class FrontendServer(uvicorn.Server):
    """A front end's server: SIGINT is the engine's to act on (a terminal's Ctrl-C reaches the whole group);
    SIGTERM, from the engine, stops it: it accepts no more and answers what it accepted."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGINT:
            super().handle_exit(sig, frame)


def frontend(index: str, listen_fd: str, arena_fd: str, run_dir: str) -> int:
    """``python -m app frontend``: one front end, started by the engine (``app.frontends.supervisor``)."""
    settings = Settings(**json.loads(sys.stdin.read()))
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s frontend-{index} %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request passed to the engine otherwise
    config = uvicorn_config(create_frontend_app(settings, int(index), int(arena_fd), run_dir), settings)
    config.load()
    share = -(-settings.max_connections // settings.frontends)  # MAX_CONNECTIONS is the server's, shared out
    guard(config, settings.model_copy(update={"max_connections": share}))
    server = FrontendServer(config)
    server.run(sockets=[socket.socket(fileno=int(listen_fd))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
