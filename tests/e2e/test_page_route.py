"""``GET /`` over a real socket: browsers get the page, every other client the JSON summary; PAGE=false
turns the page off; /docs and /redoc load only assets the server itself serves."""

from __future__ import annotations

import re

import httpx
import pytest
from starlette.routing import Mount

from app.api.page import PAGE_DIR, quality
from app.main import create_app
from app.settings import Settings
from tests.support.servers import live_server

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
SUMMARY_KEYS = {"name", "version", "ready", "models", "default_model", "docs"}


@pytest.mark.parametrize(
    ("accept", "html", "json"),
    [
        (BROWSER, 1.0, 0.8),
        ("*/*", 1.0, 1.0),
        ("", 0.0, 0.0),
        ("application/json", 0.0, 1.0),
        ("text/*;q=0.5, application/json;q=0.4", 0.5, 0.4),
        ("text/html;q=0, */*", 0.0, 1.0),  # the specific entry wins over the wildcard
        ("text/html;q=oops", 0.0, 0.0),
    ],
)
def test_accept_qualities(accept: str, html: float, json: float) -> None:
    assert (quality(accept, "text/html"), quality(accept, "application/json")) == (html, json)


@pytest.fixture(scope="module")
def server(default_ckpt):  # type: ignore[no-untyped-def]
    with live_server(checkpoint=default_ckpt, max_batch_size=2, api_key="page-key") as url:
        yield url


def test_browsers_get_the_page_and_other_clients_the_summary(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        page = client.get("/", headers={"Accept": BROWSER})
        plain = client.get("/")  # httpx sends */*
        asked = client.get("/", headers={"Accept": "application/json"})
        files = {name: client.get(f"/page/{name}") for name in ("index.html", "page.css", "page.js")}
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.content == (PAGE_DIR / "index.html").read_bytes()
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    for r in (page, plain, asked):
        assert r.headers["vary"] == "Accept"
    for r in (plain, asked):  # no key needed: the summary says where to look, nothing more
        assert r.status_code == 200 and set(r.json()) == SUMMARY_KEYS
        assert r.json()["models"] == ["moving-digits-lstm"] and r.json()["docs"] == "/docs"
    assert all(r.status_code == 200 for r in files.values())
    assert files["page.js"].headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
    assert sum(len(r.content) for r in files.values()) < 100_000  # the page's whole weight


def test_docs_and_redoc_load_only_the_servers_own_assets(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        pages = [client.get("/docs"), client.get("/redoc"), client.get("/docs/oauth2-redirect")]
        assert all(r.status_code == 200 for r in pages)
        urls = {u for r in pages[:2] for u in re.findall(r'(?:src|href)="([^"]+)"', r.text)}
        assert urls == {
            "/docs-assets/swagger-ui-bundle.js",
            "/docs-assets/swagger-ui.css",
            "/docs-assets/favicon.png",
            "/docs-assets/redoc.standalone.js",
        }
        assert "http" not in "".join(urls)
        for url in urls:
            r = client.get(url)
            assert r.status_code == 200 and len(r.content) > 1000, url
        assert client.get("/openapi.json").json()["info"]["title"] == "fusionserve"


def test_page_false_serves_the_summary_to_browsers_too(default_ckpt) -> None:  # type: ignore[no-untyped-def]
    with live_server(checkpoint=default_ckpt, max_batch_size=2, page=False) as url, httpx.Client(base_url=url) as c:
        root = c.get("/", headers={"Accept": BROWSER})
        assert root.status_code == 200 and set(root.json()) == SUMMARY_KEYS
        assert c.get("/page/index.html").status_code == 404
        assert c.get("/docs").status_code == 200  # the docs stay


def test_the_page_and_its_assets_shadow_no_api_route() -> None:
    app = create_app(Settings())
    mounts = sorted(r.path for r in app.routes if isinstance(r, Mount))
    assert mounts == ["/docs-assets", "/page"]
    api = [*app.openapi()["paths"], "/stream", "/models/{name}/stream", "/docs", "/redoc"]
    assert not [p for p in api if p.startswith(tuple(mounts))]
    assert "/" in app.openapi()["paths"]  # one route at the root: the negotiated one
