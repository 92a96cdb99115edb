"""Build the FastAPI app: lifespan (load, warm, serve, drain), middleware, routers, error handlers.

With ``app/__main__.py`` this is the composition root: the one module that wires the core
(``app.loading``, ``app.service``) to the HTTP layer (``app.api``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import ops, page, predict, streams, timeline, v2
from app.api.errors import install_handlers
from app.api.middleware import BodyDecoding, BodyLimit, BodyLimits, Inflight, RequestMetrics
from app.budget import MemoryBudget, memory_limit
from app.loading import load
from app.metrics import Metrics
from app.service import Service
from app.settings import Settings
from host.malloc import tune_malloc

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    tune_malloc()  # before the first large allocation (host.malloc)
    metrics = Metrics()
    inflight_mb = settings.max_inflight_mb or memory_limit() / 4 / (1 << 20)
    budget = MemoryBudget(int(inflight_mb * (1 << 20)))
    metrics.inflight_bytes.set_function(lambda: budget.used)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("event loop: %s", type(asyncio.get_running_loop()).__module__.split(".")[0])  # uvloop or asyncio
        loaded = await asyncio.to_thread(load, settings, metrics)
        service = Service(settings, metrics, loaded, budget)
        app.state.service = service
        service.start()
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
        docs_url=None,  # app.api.page serves both from installed assets, not from a CDN
        redoc_url=None,
        description="Classify videos, image sequences and images with fused CNN + temporal models. "
        "Plain JSON under /predict and /models, the KServe v2 / Open Inference Protocol under /v2.",
    )
    install_handlers(app)
    mb = 1024 * 1024
    limits = BodyLimits(
        upload=settings.max_upload_bytes, json=int(settings.max_json_mb * mb), video=int(settings.max_video_mb * mb)
    )
    app.add_middleware(Inflight, budget=budget)  # inside the inflating: it counts the bytes the app holds
    app.add_middleware(BodyDecoding, limits=limits)  # inside the limit on the wire's bytes
    app.add_middleware(BodyLimit, limits=limits)
    app.add_middleware(RequestMetrics, metrics=metrics)
    for router in (page.router, predict.router, streams.router, timeline.router, v2.health, v2.router, ops.router):
        app.include_router(router)
    page.mount_assets(app, settings.page)
    return app
