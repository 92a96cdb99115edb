"""``GET /``: the page for browsers (``app/page/``), the service summary for everyone else; and
``/docs``, ``/redoc`` from assets installed with the server, so they work offline.

A request whose ``Accept`` prefers ``text/html`` to ``application/json`` (a browser's) gets the
page; any other (``*/*``, JSON, none) gets the summary, as every client did before the page. With
``PAGE=false`` everyone gets the summary. The page loads only its own files, under ``/page/``;
its Content-Security-Policy lets it reach nothing but this server.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from app import __version__
from app.api.deps import ServiceDep
from app.service import Service

PAGE_DIR = Path(str(files("app") / "page"))
DOCS_ASSETS = Path(str(files(fastapi_offline) / "static"))  # Swagger UI and ReDoc, as the package ships them
# ReDoc's sidebar shows its maker's logo from their CDN, whatever the options; an empty source makes no
# request, and the image's own error handler then hides it
REDOC_LOGO = b'"https://cdn.redoc.ly/redoc/logo-mini.svg"'
# the page's own policy: its scripts, styles and requests stay on this origin (WebSockets included);
# images and video it shows come from the user's files (blob:) or its own canvases (data:)
PAGE_POLICY = (
    "default-src 'self'; connect-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(tags=["operations"])


def quality(accept: str, kind: str) -> float:
    """The q an ``Accept`` header gives the media type ``kind`` (its most specific match; 0 if none)."""
    best, specificity = 0.0, -1
    major = kind.split("/")[0]
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        rank = {kind: 2, f"{major}/*": 1, "*/*": 0}.get(media.lower())
        if rank is None or rank < specificity:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        best, specificity = q, rank
    return best


def wants_page(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return quality(accept, "text/html") > quality(accept, "application/json")


def summary(service: Service) -> dict[str, Any]:
    return {
        "name": "fusionserve",
        "version": __version__,
        "ready": service.accepting,
        "models": sorted(service.models),
        "default_model": service.default_model,
        "docs": "/docs",
    }


@cache
def page_html() -> bytes:
    """The page, read once: it ships with the server and does not change while it runs."""
    return (PAGE_DIR / "index.html").read_bytes()


@router.get(
    "/",
    summary="What this server is and where to look (browsers get the page)",
    responses={200: {"content": {"text/html": {}}, "description": "the summary as JSON, or the page"}},
)
async def root(request: Request, service: ServiceDep) -> Response:
    headers = {"Vary": "Accept"}
    if service.settings.page and wants_page(request):
        html = page_html()
        headers |= {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"}
        return HTMLResponse(html, headers=headers)
    return JSONResponse(summary(service), headers=headers)


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title="fusionserve: Swagger UI",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/docs-assets/favicon.png",
        oauth2_redirect_url="/docs/oauth2-redirect",
        swagger_ui_parameters={"validatorUrl": None},  # its default asks a public validator for a badge
    )


@router.get("/docs/oauth2-redirect", include_in_schema=False)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=request.app.openapi_url,
        title="fusionserve: ReDoc",
        redoc_js_url="/docs-assets/redoc.standalone.js",
        redoc_favicon_url="/docs-assets/favicon.png",
        with_google_fonts=False,
    )


@cache
def redoc_bundle() -> bytes:
    """ReDoc's script as installed, with its one request off the server (the logo) taken out."""
    script = (DOCS_ASSETS / "redoc.standalone.js").read_bytes()
    assert REDOC_LOGO in script, "ReDoc's bundle no longer loads its logo from the CDN: drop REDOC_LOGO"
    return script.replace(REDOC_LOGO, b'""')


@router.get("/docs-assets/redoc.standalone.js", include_in_schema=False)
async def redoc_script() -> Response:
    return Response(redoc_bundle(), media_type="text/javascript")


def mount_assets(app: FastAPI, page: bool) -> None:
    """The docs' assets at ``/docs-assets`` (ReDoc's script is ``redoc_script``, a route, matched first);
    with ``page``, the page's files at ``/page``."""
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    if page:
        app.mount("/page", StaticFiles(directory=PAGE_DIR), name="page")
