"""Operations: Prometheus metrics and a root page pointing at the docs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from app import __version__
from app.api.deps import ServiceDep

router = APIRouter(tags=["operations"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", summary="What this server is and where to look")
async def root(service: ServiceDep) -> dict[str, Any]:
    return {
        "name": "fusionserve",
        "version": __version__,
        "ready": service.accepting,
        "models": sorted(service.models),
        "default_model": service.default_model,
        "docs": "/docs",
    }
