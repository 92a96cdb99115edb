"""What the routes share: the service, the optional API key, and the wait for a client that leaves."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from app.errors import Unauthorized
from app.service import Service, Serving


async def get_service(request: Request) -> Service:
    """The app's service. ``async``: FastAPI runs a plain ``def`` dependency in its thread pool,
    a round trip between threads on every request."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_serving(request: Request) -> Serving:
    """What the classifying routes take: the service, or in a front end the link to the engine."""
    serving: Serving = request.app.state.service
    return serving


ServingDep = Annotated[Serving, Depends(get_serving)]


async def disconnected(request: Request) -> None:
    """Returns once the client has gone (its body is read by then, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def require_api_key(request: Request, service: ServingDep) -> None:
    """With ``FUSIONSERVE_API_KEY`` set, require it as ``Authorization: Bearer`` or ``X-API-Key``."""
    expected = service.settings.api_key
    if expected is None:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if given is None:
        raise Unauthorized("an API key is required (Authorization: Bearer <key> or X-API-Key)")
    if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("wrong API key")
