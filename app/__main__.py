"""``python -m app``: serve checkpoints over HTTP.

Every flag mirrors a ``FUSIONSERVE_*`` variable (``--max-batch-size`` and
``FUSIONSERVE_MAX_BATCH_SIZE``); a flag wins over the variable. On SIGTERM or
SIGINT readiness turns false at once, new work gets 503 for ``--drain-s`` seconds,
then the listener closes, every accepted request is answered, and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from app.api.connections import guard
from app.main import create_app
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
    """On a stop signal: mark the service draining (ready -> 503), wait ``drain_s``, then stop as uvicorn does."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.app, self.drain_s = app, drain_s
        self.signals: list[int] = []  # the stop signals received, in order

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)
        service = getattr(self.app.state, "service", None)
        if service is not None and not service.draining:
            service.draining = True
            log.info("signal %s: draining for %.1f s, then closing", sig, self.drain_s)
            if self.drain_s > 0:
                asyncio.get_running_loop().call_later(self.drain_s, super().handle_exit, sig, frame)
                return
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        parser.error(f"invalid settings:\n{exc}")  # usage and the problem on stderr, exit status 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.longest_request_s,
        timeout_keep_alive=settings.keep_alive_s,
        access_log=False,
        loop=settings.loop,
        http=settings.http,
    )
    config.load()  # resolves "auto" to the parser uvicorn will use (the lifespan logs the event loop)
    log.info("HTTP parser: %s", config.http_protocol_class.__name__)
    guard(config, settings)  # connection, header and body limits (app.api.connections)
    server = DrainingServer(config, app, settings.drain_s)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises SIGINT once it has shut down cleanly: no traceback
        return 130  # the shell's status for an interrupted command
    if signal.SIGINT in server.signals:  # stopped by SIGINT, whose re-raise did not come back as
        return 130  # KeyboardInterrupt (ignored when inherited so, or taken by asyncio's own handler)
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
