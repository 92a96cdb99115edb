"""FastAPI dependencies: the service state and the optional API key."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from app.errors import unauthorized
from app.state import Service


async def get_service(request: Request) -> Service:
    """The app's service. ``async``: FastAPI runs a plain ``def`` dependency in its thread pool,
    a round trip between threads for every request (about 0.5 ms each at concurrency 1)."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def require_api_key(request: Request, service: ServiceDep) -> None:
    """With ``FUSIONSERVE_API_KEY`` set, require it as ``Authorization: Bearer`` or ``X-API-Key``."""
    expected = service.settings.api_key
    if expected is None:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if given is None:
        raise unauthorized("an API key is required (Authorization: Bearer <key> or X-API-Key)")
    if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise unauthorized("wrong API key")
