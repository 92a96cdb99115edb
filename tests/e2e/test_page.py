"""The page at ``/`` in a real Chromium, against a real uvicorn server: an uploaded video and images
answer as ``/predict`` does on the same bytes, a long video's timeline has the API's segments, the
fake webcam streams live answers, the API key is asked for and kept, and the page stays on its own
origin, under its CSP, light, and phone-sized. Screenshots land in ``build/page-screenshots/``."""

from __future__ import annotations

import io
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    Response,
    ViewportSize,
    WebSocket,
    expect,
    sync_playwright,
)

from media import sample_indices
from models import default_checkpoint
from tests.support.browser import MISSING, chromium_path, launch, write_y4m
from tests.support.media import encode, multipart_frames, synth_clip, write_mp4
from tests.support.servers import live_server

MODELS = ("moving-digits-lstm", "moving-digits-attention")
MOTIONS = ("left", "up", "right", "down")  # the long video: 4 x 60 frames, 10 s at 24 fps
KEY = "page-test-key"
SHOTS = Path(__file__).resolve().parents[2] / "build" / "page-screenshots"
WAIT = 20_000  # ms, for anything the page waits on the server for
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
# a request that is refused (401) is logged by Chromium itself as a console error
REFUSED = re.compile(r"Failed to load resource: the server responded with a status of 401")
# CSP violations, as the page sees them (an init script is not bound by the page's CSP)
WATCH_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""


# ---- the browser, the servers, the media ----


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    executable = chromium_path()
    if executable is None:
        pytest.skip(MISSING)
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def camera(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the fake camera shows: a digit moving left, 64x64 at 10 fps, looped."""
    folder = tmp_path_factory.mktemp("camera")
    return write_y4m(folder / "left.y4m", synth_clip("left", frames=20, seed=5, size=64), fps=10)


@pytest.fixture(scope="module")
def browser(playwright: Playwright, camera: Path) -> Iterator[Browser]:
    executable = chromium_path()
    assert executable is not None
    browser = launch(playwright, executable, camera)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Both bundled models (the attention model is the default, as the server picks it)."""
    folder = tmp_path_factory.mktemp("page-models")
    for name in MODELS:
        shutil.copy(default_checkpoint().parent / f"{name}.safetensors", folder)
    with live_server(checkpoint=folder, max_batch_size=8, stream_max_batch=8) as url:
        yield url


@pytest.fixture(scope="module")
def guarded() -> Iterator[str]:
    """One model behind an API key."""
    with live_server(checkpoint=default_checkpoint(), api_key=KEY, max_batch_size=8, stream_max_batch=8) as url:
        yield url


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("page-media")


@pytest.fixture(scope="module")
def short_video(media_dir: Path) -> Path:
    """24 frames of a digit moving left, 64x64 at 10 fps (keyframes every 4 frames, for seeking)."""
    path = media_dir / "left.mp4"
    path.write_bytes(write_mp4(synth_clip("left", frames=24, seed=1, size=64), fps=10))
    return path


@pytest.fixture(scope="module")
def jpegs(media_dir: Path) -> list[Path]:
    """12 JPEG frames of a digit moving up, named in order (000.jpg ... 011.jpg)."""
    paths = []
    for i, frame in enumerate(synth_clip("up", frames=12, seed=3, size=64)):
        path = media_dir / f"{i:03d}.jpg"
        path.write_bytes(encode(frame, "JPEG", quality=92))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def long_video(media_dir: Path) -> Path:
    """10 s at 24 fps, 64x64: four motions of 60 frames each."""
    clip = np.concatenate([synth_clip(label, frames=60, seed=i, size=64) for i, label in enumerate(MOTIONS)])
    path = media_dir / "ten-seconds.mp4"
    path.write_bytes(write_mp4(clip, fps=24))
    return path


# ---- pages, with every request, socket and console error recorded ----


@dataclass
class Visit:
    page: Page
    origin: str
    allowed_errors: re.Pattern[str] | None = None
    requests: list[str] = field(default_factory=list)
    sockets: list[WebSocket] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if self.allowed_errors is None or not self.allowed_errors.search(e)]

    def csp_violations(self) -> list[str]:
        return list(self.page.evaluate("window.__csp || []"))


@pytest.fixture(scope="module")
def request_log() -> list[tuple[str, str]]:
    """(origin, URL) of every request any page of this module made."""
    return []


OpenPage = Callable[..., Visit]


@pytest.fixture
def open_page(browser: Browser, request_log: list[tuple[str, str]]) -> Iterator[OpenPage]:
    """Opens a page in a fresh context and records what it does; afterwards checks that it reached
    nothing but its server and logged no error (nor broke its CSP)."""
    opened: list[tuple[BrowserContext, Visit]] = []

    def open_(
        origin: str, path: str = "/", *, viewport: ViewportSize | None = None, allow: re.Pattern[str] | None = None
    ) -> Visit:
        phone = viewport == PHONE
        context = browser.new_context(
            viewport=viewport or DESKTOP,
            device_scale_factor=2 if phone else 1,
            is_mobile=phone,
            has_touch=phone,
            reduced_motion="reduce",  # bars drawn at once: screenshots show the answer, not a transition
        )
        context.grant_permissions(["camera"], origin=origin)
        context.add_init_script(WATCH_CSP)
        page = context.new_page()
        page.set_default_timeout(WAIT)
        visit = Visit(page, origin, allow)

        def record(url: str) -> None:
            visit.requests.append(url)
            request_log.append((origin, url))

        def socket(ws: WebSocket) -> None:
            record(ws.url)
            visit.sockets.append(ws)

        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                visit.errors.append(message.text)

        page.on("request", lambda r: record(r.url))
        page.on("websocket", socket)
        page.on("console", console)
        page.on("pageerror", lambda e: visit.errors.append(f"uncaught: {e}"))
        opened.append((context, visit))
        page.goto(origin + path)
        return visit

    yield open_
    for context, visit in opened:
        violations = visit.csp_violations() if not visit.page.is_closed() else []
        context.close()
        assert off_origin(visit.origin, visit.requests) == []
        assert visit.unexpected_errors() == []
        assert violations == []


def off_origin(origin: str, urls: list[str]) -> list[str]:
    """The URLs that are neither on ``origin`` (http or ws) nor the page's own blob: and data: URLs."""
    home = urlsplit(origin)
    outside = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in ("blob", "data"):
            if parts.scheme == "blob" and not parts.path.startswith(origin):
                outside.append(url)
            continue
        if parts.scheme not in ("http", "ws") or parts.netloc != home.netloc:
            outside.append(url)
    return outside


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def models_loaded(page: Page, count: int) -> str:
    """Waits for the model picker to list ``count`` models; the model it shows."""
    expect(page.locator("#model option")).to_have_count(count)
    expect(page.locator("#model")).to_be_enabled()
    return page.locator("#model").input_value()


# ---- the API's answers, to compare the page with ----


def api_predict(url: str, model: str, files: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/models/{model}/predict?explain=frames&top_k=8", files=files, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def assert_bars(page: Page, selector: str, probabilities: dict[str, float]) -> None:
    """A bar per label, sorted by probability, each showing its probability."""
    bars = page.locator(f"{selector} .bar[data-label]")
    expect(bars).to_have_count(len(probabilities))
    want = sorted(probabilities, key=lambda label: -probabilities[label])
    assert bars.evaluate_all("bars => bars.map(b => b.dataset.label)") == want
    shown = bars.evaluate_all("bars => bars.map(b => Number(b.dataset.probability))")
    np.testing.assert_allclose(shown, [probabilities[label] for label in want], atol=1e-6)
    expect(bars.first.locator(".bar-value")).to_have_text(f"{100 * probabilities[want[0]]:.1f}%")


def assert_explained(page: Page, answer: dict[str, Any]) -> None:
    """Each frame's importance (and attention weight) under its thumbnail when the API gives them, none when not."""
    frames = answer["frames"]
    for key, meter in (("frame_importance", "importance"), ("attention", "attention")):
        meters = page.locator(f"#thumbs .thumb .meter.{meter}")
        if key not in answer:
            expect(meters).to_have_count(0)
            continue
        expect(meters).to_have_count(frames)
        widths = meters.evaluate_all("ms => ms.map(m => m.getBoundingClientRect().width)")
        assert min(widths) > 20, widths  # each a bar as wide as its thumbnail
        shown = page.locator("#thumbs .thumb").evaluate_all(f"ts => ts.map(t => Number(t.dataset.{meter}))")
        np.testing.assert_allclose(shown, answer[key], atol=1e-3)


# ---- the tests ----


def test_page_shows_the_top_label_and_frames_of_an_uploaded_video(
    server: str, open_page: OpenPage, short_video: Path
) -> None:
    visit = open_page(server)
    page = visit.page
    model = models_loaded(page, 2)
    assert model == httpx.get(f"{server}/models").json()["default"]  # the picker starts on the server's default
    data = short_video.read_bytes()
    expected = api_predict(server, model, {"video": (short_video.name, data, "video/mp4")})

    page.set_input_files("#files", short_video)
    expect(page.locator("#top-label")).to_have_text(expected["label"])
    assert_bars(page, "#predict-bars", expected["probabilities"])
    thumbs = page.locator("#thumbs .thumb")
    expect(thumbs).to_have_count(expected["frames"])
    expect(page.locator("#thumbs")).to_have_attribute("data-drawn", "true")
    expect(page.locator("#thumbs canvas.pending")).to_have_count(0)
    assert_explained(page, expected)

    # each thumbnail is the frame the server sampled: nearer to it than to any other frame of the clip
    clip = synth_clip("left", frames=24, seed=1, size=64).astype(np.float32)
    picked = sample_indices(len(clip), expected["frames"])
    pixels = page.locator("#thumbs canvas").evaluate_all(
        "cs => cs.map(c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data))"
    )
    for i, flat in enumerate(pixels):
        thumb = np.array(flat, dtype=np.float32).reshape(64, 64, 4)[..., :3]
        distance = np.abs(clip - thumb).mean(axis=(1, 2, 3))
        assert abs(int(distance.argmin()) - int(picked[i])) <= 1, (i, distance.argmin(), picked[i])
    shot(page, "upload-video")


def test_page_classifies_images_in_name_order_with_the_chosen_model(
    server: str, open_page: OpenPage, jpegs: list[Path]
) -> None:
    page = open_page(server).page
    models_loaded(page, 2)
    page.select_option("#model", "moving-digits-lstm")
    expect(page.locator("#model-name")).to_have_text("moving-digits-lstm")
    info = httpx.get(f"{server}/models/moving-digits-lstm").json()
    expect(page.locator("#labels li")).to_have_text(info["labels"])
    expect(page.locator("#model-input")).to_contain_text("32 × 32 × 3, 16 frames")
    expect(page.locator("#model-metrics")).to_contain_text(f"accuracy {100 * info['metrics']['test']['accuracy']:.1f}%")
    blobs = [p.read_bytes() for p in jpegs]
    expected = api_predict(server, "moving-digits-lstm", multipart_frames(blobs))

    shuffled = jpegs[:]
    random.Random(0).shuffle(shuffled)  # as a drop may list them: the page sends them in name order
    page.set_input_files("#files", shuffled)
    expect(page.locator("#top-label")).to_have_text(expected["label"])
    assert_bars(page, "#predict-bars", expected["probabilities"])
    thumbs = page.locator("#thumbs .thumb img")
    expect(thumbs).to_have_count(expected["frames"])
    assert expected["frames"] == len(jpegs)
    sources = thumbs.evaluate_all("imgs => imgs.map(i => i.src)")
    assert all(s.startswith(f"blob:{server}/") for s in sources) and len(set(sources)) == len(jpegs)
    expect(page.locator("#thumbs")).to_have_attribute("data-drawn", "true")
    assert_explained(page, expected)
    # the thumbnails are the images, in the order they were sent
    shown = thumbs.evaluate_all(
        "imgs => imgs.map(i => { const c = document.createElement('canvas'); c.width = c.height = 64;"
        " const g = c.getContext('2d'); g.drawImage(i, 0, 0); return Array.from(g.getImageData(0, 0, 64, 64).data); })"
    )
    for flat, path in zip(shown, jpegs, strict=True):
        want = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        assert np.abs(np.array(flat, dtype=np.float32).reshape(64, 64, 4)[..., :3] - want).mean() < 2.0
    shot(page, "upload-images")


def test_page_draws_a_timeline_band_per_segment_and_shows_a_chosen_segment(
    server: str, open_page: OpenPage, long_video: Path
) -> None:
    page = open_page(server).page
    model = models_loaded(page, 2)
    r = httpx.post(
        f"{server}/models/{model}/timeline?fps=8",
        files={"video": (long_video.name, long_video.read_bytes(), "video/mp4")},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    segments = r.json()["segments"]

    expect(page.locator("#timeline-run")).to_be_disabled()  # no video yet
    page.set_input_files("#files", long_video)
    expected = api_predict(server, model, {"video": (long_video.name, long_video.read_bytes(), "video/mp4")})
    expect(page.locator("#top-label")).to_have_text(expected["label"])
    expect(page.locator("#thumbs .thumb")).to_have_count(expected["frames"])
    assert_explained(page, expected)
    page.fill("#timeline-fps", "8")
    page.click("#timeline-run")
    bands = page.locator("#timeline .segment")
    expect(bands).to_have_count(len(segments))
    assert bands.evaluate_all("bs => bs.map(b => b.dataset.label)") == [s["label"] for s in segments]
    assert bands.evaluate_all("bs => bs.map(b => b.tagName)") == ["BUTTON"] * len(segments)

    bands.nth(2).click()
    expect(bands.nth(2)).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#segment-info")).to_contain_text(segments[2]["label"])
    assert_bars(page, "#segment-bars", segments[2]["probabilities"])
    # the keyboard: an arrow moves to the next segment and shows it
    page.keyboard.press("ArrowRight")
    expect(bands.nth(3)).to_be_focused()
    expect(bands.nth(3)).to_have_attribute("aria-pressed", "true")
    assert_bars(page, "#segment-bars", segments[3]["probabilities"])
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("Enter")
    expect(bands.nth(2)).to_have_attribute("aria-pressed", "true")
    shot(page, "timeline")


def live_count(page: Page) -> int:
    return int(page.locator("#live-count").inner_text())


def test_page_streams_the_fake_webcam_and_shows_live_answers(server: str, open_page: OpenPage) -> None:
    visit = open_page(server)
    page = visit.page
    model = models_loaded(page, 2)
    sent: list[bytes] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda p: sent.append(p) if isinstance(p, bytes) else None))

    page.click("#webcam-start")
    page.wait_for_function("() => Number(document.querySelector('#live-count').textContent) >= 10", timeout=WAIT)
    (socket,) = visit.sockets
    assert socket.url == f"{server.replace('http://', 'ws://')}/models/{model}/stream"
    labels = httpx.get(f"{server}/models/{model}").json()["labels"]
    bars = page.locator("#live-bars .bar[data-label]")
    expect(bars).to_have_count(len(labels))
    assert sorted(bars.evaluate_all("bs => bs.map(b => b.dataset.label)")) == sorted(labels)
    expect(page.locator("#live-label")).to_have_text(bars.first.get_attribute("data-label") or "")
    expect(page.locator("#live-fps")).to_have_text(re.compile(r"^\d+\.\d /s$"))
    expect(page.locator("#live-latency")).to_have_text(re.compile(r"^\d+ ms$"))
    expect(page.locator("#live-server")).to_have_text(re.compile(r"^\d+\.\d ms · batch \d+$"))
    # frames go as binary JPEGs scaled in the browser to the model's input
    assert len(sent) >= 10
    with Image.open(io.BytesIO(sent[0])) as first:
        assert (first.format, first.size) == ("JPEG", (32, 32))
    shot(page, "webcam-live")

    page.click("#webcam-reset")
    page.wait_for_function("() => Number(document.querySelector('#live-count').textContent) >= 3", timeout=WAIT)
    page.click("#webcam-stop")
    expect(page.locator("#webcam-start")).to_be_enabled()
    expect(page.locator("#webcam-stop")).to_be_disabled()
    if not socket.is_closed():
        socket.wait_for_event("close", timeout=WAIT)
    expect(page.locator("#error")).to_be_hidden()


def test_page_asks_for_the_api_key_and_shows_the_servers_words(guarded: str, open_page: OpenPage) -> None:
    without = httpx.get(f"{guarded}/models").json()["error"]["message"]
    wrong = httpx.get(f"{guarded}/models", headers={"Authorization": "Bearer nope"}).json()["error"]["message"]
    visit = open_page(guarded, allow=REFUSED)
    page = visit.page
    error = page.locator("#error")
    expect(error).to_have_text(without)
    expect(page.locator("#api-key")).to_be_focused()

    page.fill("#api-key", "nope")
    page.keyboard.press("Enter")
    expect(error).to_have_text(wrong)
    shot(page, "key-error")

    page.fill("#api-key", KEY)
    page.click("#api-key-save")
    models_loaded(page, 1)
    expect(error).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('fusionserve.apiKey')") == KEY
    # kept for the tab: a reload loads the models at once
    page.reload()
    models_loaded(page, 1)
    expect(page.locator("#api-key")).to_have_value(KEY)
    # the stream offers the key as a subprotocol, never in its URL
    page.click("#webcam-start")
    page.wait_for_function("() => Number(document.querySelector('#live-count').textContent) >= 1", timeout=WAIT)
    page.click("#webcam-stop")
    assert all(KEY not in url for url in visit.requests)
    expect(error).to_be_hidden()


def test_every_request_stays_on_the_origin_and_the_docs_render_offline(
    server: str, open_page: OpenPage, request_log: list[tuple[str, str]]
) -> None:
    docs = open_page(server, "/docs").page
    expect(docs.locator(".swagger-ui .info .title")).to_contain_text("fusionserve")
    expect(docs.locator(".swagger-ui .opblock").first).to_be_visible()
    page = open_page(server).page
    models_loaded(page, 2)
    # with the tests before it, the log holds uploads, timelines and streams as well
    paths = {urlsplit(url).path for _, url in request_log}
    assert {"/", "/page/page.css", "/page/page.js", "/models", "/docs", "/openapi.json"} <= paths
    assert any(p.startswith("/docs-assets/") for p in paths)
    assert [url for origin, url in request_log if off_origin(origin, [url])] == []


def test_redoc_renders_without_leaving_the_origin(server: str, browser: Browser) -> None:
    context = browser.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(f"{server}/redoc")
        expect(page.locator("h1").first).to_contain_text("fusionserve", timeout=WAIT)
        expect(page.locator("[role=menu]").first).to_be_visible(timeout=WAIT)  # the sidebar, where the logo is
        assert any(urlsplit(url).path.startswith("/docs-assets/") for url in requests)
        assert off_origin(server, requests) == []
    finally:
        context.close()


def test_page_is_light_and_loads_without_errors(server: str, open_page: OpenPage) -> None:
    responses: list[Response] = []
    page = open_page(server).page
    page.on("response", lambda r: responses.append(r))
    page.reload()  # every response of the page, its document included
    models_loaded(page, 2)
    sizes = {urlsplit(r.url).path: len(r.body()) for r in responses if r.request.resource_type != "fetch"}
    r = httpx.get(server, headers={"Accept": "text/html"})
    assert r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert {path for path in sizes if not path.startswith("data:")} == {"/", "/page/page.css", "/page/page.js"}
    weight = sizes["/"] + sizes["/page/page.css"] + sizes["/page/page.js"]
    assert weight == len(r.content) + sum(
        len(httpx.get(f"{server}/page/{name}").content) for name in ("page.css", "page.js")
    )
    assert weight < 100_000, weight
    assert page.evaluate("window.__csp") == []
    # a JSON client still gets the summary at /
    assert httpx.get(server).json()["name"] == "fusionserve"
    shot(page, "models-loaded")


def test_page_is_usable_with_the_keyboard(server: str, open_page: OpenPage, jpegs: list[Path]) -> None:
    page = open_page(server).page
    # a listener turns on the interception of file pickers now, not as the key is pressed
    page.on("filechooser", lambda chooser: None)
    models_loaded(page, 2)
    page.locator("body").focus()
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id"))
    # disabled controls (no video yet, no stream) are skipped
    assert order == ["model", "api-key", "api-key-save", "files", "webcam-start", "timeline-fps"]
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    expect(page.locator("#files")).to_be_focused()
    assert page.evaluate("() => getComputedStyle(document.querySelector('#drop')).outlineStyle") == "solid"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")  # the drop zone's file input opens the file picker
    chooser.value.set_files(jpegs)
    expect(page.locator("#thumbs .thumb")).to_have_count(len(jpegs))
    expect(page.locator("#top-label")).not_to_be_empty()


def test_page_fits_a_phone_without_horizontal_scroll(
    server: str, open_page: OpenPage, jpegs: list[Path], short_video: Path
) -> None:
    page = open_page(server, viewport=PHONE).page
    models_loaded(page, 2)
    width = "document.documentElement.scrollWidth"
    assert page.evaluate(width) <= PHONE["width"]
    page.set_input_files("#files", jpegs)
    expect(page.locator("#thumbs .thumb")).to_have_count(len(jpegs))
    assert page.evaluate(width) <= PHONE["width"]
    page.set_input_files("#files", short_video)
    expect(page.locator("#thumbs")).to_have_attribute("data-drawn", "true")
    page.click("#timeline-run")
    expect(page.locator("#timeline .segment").first).to_be_visible()
    page.locator("#timeline .segment").first.click()
    expect(page.locator("#segment-bars .bar")).to_have_count(8)
    assert page.evaluate(width) <= PHONE["width"]
    shot(page, "phone")
