"""Build the FastAPI app: lifespan (load, warm, serve, drain), middleware, routers, error handlers.

With ``app/__main__.py`` this is the composition root: the one module that wires the core
(``app.loading``, ``app.service``) to the HTTP layer (``app.api``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

from app import __version__
from app.api import ops, page, predict, streams, timeline, v2
from app.api.errors import install_handlers
from app.api.middleware import BodyDecoding, BodyLimit, BodyLimits, Inflight, RequestMetrics
from app.api.proxy import EngineProxy, FrontDoor
from app.budget import MemoryBudget, memory_limit
from app.decoding import Decoders
from app.frontends import arena
from app.frontends.link import EngineLink, RemoteModel, RemoteService
from app.frontends.relay import RelayedMetrics
from app.frontends.supervisor import Engine
from app.loading import load
from app.metrics import Metrics
from app.service import Service
from app.settings import Settings
from host.malloc import tune_malloc

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The whole service in this process; with ``engine``, the engine of ``FRONTENDS`` front ends, which
    it starts once the models are ready and stops before it closes."""
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
        if engine is not None:
            metrics.frontend_restarts.set_function(lambda: engine.restarts)
            await engine.start(service)
        try:
            yield
        finally:
            if engine is not None:
                await engine.close()  # the front ends first: they answer what they accepted through the engine
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
    add_middleware(app, settings, budget, metrics)
    routers = (page.router, predict.router, predict.models_router, streams.router, timeline.router)
    for router in (*routers, v2.health, v2.router, v2.infer_router, ops.router):
        app.include_router(router)
    page.mount_assets(app, settings.page)
    return app


def add_middleware(app: FastAPI, settings: Settings, budget: MemoryBudget, metrics: object) -> None:
    mb = 1024 * 1024
    limits = BodyLimits(
        upload=settings.max_upload_bytes, json=int(settings.max_json_mb * mb), video=int(settings.max_video_mb * mb)
    )
    app.add_middleware(Inflight, budget=budget)  # inside the inflating: it counts the bytes the app holds
    app.add_middleware(BodyDecoding, limits=limits)  # inside the limit on the wire's bytes
    app.add_middleware(BodyLimit, limits=limits)
    app.add_middleware(RequestMetrics, metrics=metrics)


def create_frontend_app(settings: Settings, index: int, arena_fd: int, run_dir: str) -> ASGIApp:
    """Front end ``index`` of the engine whose sockets lie in ``run_dir`` (``app.frontends``): the classifying
    routes served here, with ``arena_fd``'s shared memory for the clips; the rest passed to the engine."""
    tune_malloc()
    inflight_mb = settings.max_inflight_mb or memory_limit() / 4 / (1 << 20)
    budget = MemoryBudget(int(inflight_mb * (1 << 20) / settings.frontends))  # the server's budget, shared out
    memory = arena.mapping(arena_fd)
    proxy = EngineProxy(f"{run_dir}/engine.sock")
    metrics = RelayedMetrics(index)  # observations go to the engine once connected

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        link, hello = await EngineLink.connect(f"{run_dir}/clips.sock", index, memory)
        metrics.link = link
        decoders = Decoders(settings.decode_workers, 0, int(settings.decode_split_kb * 1024))
        models = {m["name"]: RemoteModel.of(m) for m in hello["models"]}
        app.state.service = RemoteService(settings, metrics, link, models, hello["default"], decoders)
        orphaned = asyncio.create_task(stop_when_gone(link, run_dir))
        try:
            yield
        finally:
            orphaned.cancel()
            metrics.flush()
            await link.close()
            await proxy.close()
            await asyncio.to_thread(decoders.shutdown)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    add_middleware(app, settings, budget, metrics)
    for router in (predict.router, v2.infer_router):
        app.include_router(router)

    return FrontDoor(app, proxy, metrics.sync)


async def stop_when_gone(link: EngineLink, run_dir: str) -> None:
    """A front end whose engine has gone (killed, crashed) stops as on SIGTERM: it cannot answer anything.
    The engine's sockets' folder goes with it (an engine that was killed could not remove it)."""
    await link.closed.wait()
    log.error("the engine has gone; this front end stops")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGTERM)
