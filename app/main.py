"""Build the FastAPI app: lifespan (load, warm, serve, drain), middleware and routers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import ops, predict, v2
from app.errors import install_handlers
from app.metrics import Metrics
from app.middleware import BodyDecoding, BodyLimit, RequestMetrics
from app.settings import Settings
from app.state import Service
from models.system import tune_malloc

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    tune_malloc()  # before the first large allocation; see models.system
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("event loop: %s", type(asyncio.get_running_loop()).__module__.split(".")[0])  # uvloop or asyncio
        service = Service(settings, metrics)
        app.state.service = service
        await asyncio.to_thread(service.load)
        service.ready = True
        metrics.ready.set(1)
        log.info("ready: %s (default %s)", ", ".join(service.models), service.default_model)
        try:
            yield
        finally:
            log.info("shutting down: answering accepted requests")
            await service.close()

    app = FastAPI(
        title="fusionserve",
        version=__version__,
        lifespan=lifespan,
        description="Classify videos, image sequences and images with fused CNN + temporal models. "
        "Plain JSON under /predict and /models, the KServe v2 / Open Inference Protocol under /v2.",
    )
    install_handlers(app)
    app.add_middleware(BodyDecoding, limit=settings.max_upload_bytes)  # inside the limit on the wire's bytes
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    for router in (predict.router, v2.health, v2.router, ops.router):
        app.include_router(router)
    return app
