"""Bad input through a real server: each gets its 4xx and the error body, and the server stays up."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.media import claim_size, encode, multipart_frames, synth_clip
from tests.support.servers import SERVER_KINDS, live_server, metric_value, server_of

KEY = "s3cret-test-key"


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(default_ckpt: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    limits = {"max_frames": 20, "max_upload_mb": 1, "max_pixels": 1024 * 1024}
    with server_of(request.param, checkpoint=default_ckpt, **limits) as url:
        yield url


def frames(n: int = 4) -> list[bytes]:
    return [encode(f) for f in synth_clip("left", frames=n)]


def expect_error(r: httpx.Response, status: int, code: str, server: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200  # still up and ready


def test_corrupt_jpeg(server: str) -> None:
    good = frames()
    corrupt = good[1][:20] + b"\x00" * 50 + good[1][70:100]
    r = httpx.post(f"{server}/predict", files=multipart_frames([good[0], corrupt, good[2]]))
    expect_error(r, 400, "bad_input", server)
    assert "frame 1" in r.json()["error"]["message"]


def test_text_file_as_an_image(server: str) -> None:
    files = [("frames", ("notes.txt", b"this is not an image at all\n" * 10, "text/plain"))]
    expect_error(httpx.post(f"{server}/predict", files=files), 400, "bad_input", server)


def test_zero_frames(server: str) -> None:
    form = {"content-type": "multipart/form-data; boundary=abc"}
    expect_error(httpx.post(f"{server}/predict", content=b"--abc--\r\n", headers=form), 422, "wrong_shape", server)
    expect_error(httpx.post(f"{server}/predict", json={"frames": []}), 422, "wrong_shape", server)


def test_a_part_of_another_name_is_refused_not_ignored(server: str) -> None:
    files = [*multipart_frames(frames(2)), ("other", ("x.bin", b"123", "application/octet-stream"))]
    r = httpx.post(f"{server}/predict", files=files)
    expect_error(r, 400, "bad_input", server)
    assert "unknown parts ['other']" in r.json()["error"]["message"]


def test_too_many_frames(server: str) -> None:
    one = frames(1)[0]
    for count in (21, 22, 60):  # just over the limit, and past the multipart parser's own file cap
        r = httpx.post(f"{server}/predict", files=multipart_frames([one] * count))
        expect_error(r, 422, "wrong_shape", server)
        assert "limit of 20" in r.json()["error"]["message"]


def test_mixed_frame_sizes_are_resized_not_rejected(server: str) -> None:
    clip = synth_clip("up", frames=4, size=64)
    blobs = [
        encode(clip[0]),
        encode(np.ascontiguousarray(clip[1][:20, :50])),
        encode(clip[2], "PNG"),
        encode(np.ascontiguousarray(clip[3][:7, :9])),
    ]
    r = httpx.post(f"{server}/predict", files=multipart_frames(blobs))
    assert r.status_code == 200, r.text
    assert r.json()["frames"] == 4


def test_oversized_upload(server: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    big = encode(noise, "PNG")  # about 1.4 MB, over the 1 MB limit
    assert len(big) > 1024 * 1024
    expect_error(httpx.post(f"{server}/predict", files=multipart_frames([big], "png")), 413, "too_large", server)


def test_decompression_bomb(server: str) -> None:
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, format="PNG")  # 144 Mpixel behind a small file
    assert len(buf.getvalue()) < 1024 * 1024
    r = httpx.post(f"{server}/predict", files=multipart_frames([buf.getvalue()], "png"))
    expect_error(r, 413, "too_large", server)


def test_jpeg_bomb_is_refused_from_its_header(server: str) -> None:
    data = claim_size(frames(1)[0], 20000, 20000)  # a 64x64 JPEG whose header claims 400 Mpixel
    r = httpx.post(f"{server}/predict", files=multipart_frames([data]))
    expect_error(r, 413, "too_large", server)
    assert "20000x20000" in r.json()["error"]["message"]


def test_wrong_content_type(server: str) -> None:
    r = httpx.post(f"{server}/predict", content=b"hello", headers={"content-type": "text/plain"})
    expect_error(r, 415, "unsupported_media_type", server)


def test_invalid_json_and_base64(server: str) -> None:
    r = httpx.post(f"{server}/predict", content=b"{not json", headers={"content-type": "application/json"})
    expect_error(r, 400, "bad_input", server)
    expect_error(httpx.post(f"{server}/predict", json={"frames": ["%%%"]}), 400, "bad_input", server)
    expect_error(httpx.post(f"{server}/predict", json={"pictures": []}), 400, "bad_input", server)
    expect_error(httpx.post(f"{server}/predict", json={"frames": None, "video": None}), 400, "bad_input", server)
    r = httpx.post(f"{server}/predict", json={"frames": ["AAAA"], "video": "AAAA"})
    expect_error(r, 400, "bad_input", server)
    assert "not both" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/predict", json={"video": 12})
    expect_error(r, 400, "bad_input", server)
    assert '"video" must be a base64 string' in r.json()["error"]["message"]


def test_corrupt_video(server: str) -> None:
    r = httpx.post(
        f"{server}/predict", files={"video": ("v.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 300, "video/mp4")}
    )
    expect_error(r, 400, "bad_input", server)


def test_unknown_model(server: str) -> None:
    expect_error(
        httpx.post(f"{server}/models/nope/predict", files=multipart_frames(frames())), 404, "not_found", server
    )


def test_bad_query_parameter(server: str) -> None:
    expect_error(
        httpx.post(f"{server}/predict?top_k=0", files=multipart_frames(frames())), 422, "invalid_request", server
    )


def test_malformed_multipart_bodies(server: str) -> None:
    jpeg = frames(1)[0]
    r = httpx.post(f"{server}/predict", data={"frames": "not a file"})  # form-urlencoded: not multipart
    expect_error(r, 415, "unsupported_media_type", server)
    r = httpx.post(f"{server}/predict", files=[("frames", ("0.jpg", jpeg, "image/jpeg"))], data={"frames": "x"})
    expect_error(r, 400, "bad_input", server)
    assert "must be a file part" in r.json()["error"]["message"]  # httpx sends fields first
    both = [("frames", ("0.jpg", jpeg, "image/jpeg")), ("video", ("v.mp4", b"\0" * 64, "video/mp4"))]
    expect_error(httpx.post(f"{server}/predict", files=both), 400, "bad_input", server)
    two = [("video", ("a.mp4", b"\0" * 64, "video/mp4")), ("video", ("b.mp4", b"\0" * 64, "video/mp4"))]
    expect_error(httpx.post(f"{server}/predict", files=two), 422, "wrong_shape", server)
    fields = {f"f{i}": "x" for i in range(17)}
    r = httpx.post(f"{server}/predict", files=[("frames", ("0.jpg", jpeg, "image/jpeg"))], data=fields)
    expect_error(r, 400, "bad_input", server)
    for ctype, body in (
        ("multipart/form-data", b"--x\r\n"),  # no boundary in the header
        ("multipart/form-data; boundary=abc", b"this is not a multipart body at all"),
        ("multipart/form-data; boundary=abc", b"--abc\r\nContent-Type: image/jpeg\r\n\r\nxyz\r\n--abc--\r\n"),
    ):
        r = httpx.post(f"{server}/predict", content=body, headers={"content-type": ctype})
        expect_error(r, 400, "bad_input", server)
        assert "multipart" in r.json()["error"]["message"]


def test_api_key(default_ckpt: Path) -> None:
    with live_server(checkpoint=default_ckpt, api_key=KEY) as url:
        files = multipart_frames(frames())
        r = httpx.post(f"{url}/predict", files=files)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = httpx.post(f"{url}/predict", files=files, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["message"] == "wrong API key"
        assert httpx.post(f"{url}/predict", files=files, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.post(f"{url}/predict", files=files, headers={"X-API-Key": KEY}).status_code == 200
        assert httpx.get(f"{url}/models").status_code == 401
        r = httpx.post(f"{url}/v2/models/moving-digits-lstm/infer", json={})
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
        # Health and metrics stay open.
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        assert httpx.get(f"{url}/v2/health/live").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_an_upload_that_decodes_too_long_gets_504_and_the_server_goes_on(default_ckpt: Path) -> None:
    # 16 PNG frames of 2000x2000 (16 KB each, smooth): about 0.28 s of decoding here in two halves on
    # both decode threads (DECODE_SPLIT_KB), 0.55 s on one; the limit is a fifth of the faster
    y, x = np.mgrid[0:2000, 0:2000]
    big = encode(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8), "PNG")
    with live_server(checkpoint=default_ckpt, decode_timeout_s=0.05) as url:
        r = httpx.post(f"{url}/predict", files=multipart_frames([big] * 16, "png"), timeout=60)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout" and "not decoded within 0.05 s" in r.json()["error"]["message"]
        # The abandoned clip still finishes decoding on both threads; a clip sent meanwhile waits
        # behind it and may time out too, and once it is done the server answers again.
        small = [encode(f) for f in synth_clip("up", frames=2, seed=9)]
        until = time.monotonic() + 30
        while (r := httpx.post(f"{url}/predict", files=multipart_frames(small), timeout=60)).status_code != 200:
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
            assert time.monotonic() < until, "still timing out 30 s after the slow upload"
            time.sleep(0.05)
        assert r.json()["frames"] == 2


def large_uploads_at_once(url: str, count: int) -> list[httpx.Response]:
    """``count`` uploads of 8 PNG frames of 3000x3000 (small files: about 0.35 s of decoding each
    here) to ``/predict``, all at once."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((3000, 3000, 3), np.uint8)).save(buf, "PNG")
    files = multipart_frames([buf.getvalue()] * 8, "png")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as client:
            return await asyncio.gather(*(client.post(f"{url}/predict", files=files) for _ in range(count)))

    return asyncio.run(burst())


@pytest.mark.parametrize("processes", [0, 1], ids=["decode-thread", "decode-process"])
def test_uploads_that_timed_out_waiting_for_a_decoder_are_not_decoded(default_ckpt: Path, processes: int) -> None:
    # 12 uploads of 8 PNG frames of 3000x3000 (about 0.35 s of decoding each here) on one decode
    # thread or process, with a 1.5 s limit: those still waiting at 1.5 s get 504, and they are skipped
    # (dropped, reason "undecoded") instead of decoded for seconds more, and the server goes on.
    settings = {"decode_workers": 1, "decode_processes": processes, "decode_split_kb": 0}
    with live_server(checkpoint=default_ckpt, decode_timeout_s=1.5, **settings) as url:
        statuses = [r.status_code for r in large_uploads_at_once(url, 12)]
        assert set(statuses) <= {200, 504} and statuses.count(504) >= 2, statuses
        # the uploads a decoder had already taken still finish; a small clip then gets through
        small = [encode(f) for f in synth_clip("up", frames=2, seed=9)]
        until = time.monotonic() + 30
        while (r := httpx.post(f"{url}/predict", files=multipart_frames(small), timeout=60)).status_code != 200:
            assert r.status_code == 504 and time.monotonic() < until, r.text
        text = httpx.get(f"{url}/metrics").text
        skipped = metric_value(text, "fusionserve_dropped_clips_total", reason="undecoded")
        assert 1 <= skipped <= statuses.count(504), (skipped, statuses)


def test_uploads_waiting_to_be_decoded_count_against_the_queue_limit(default_ckpt: Path) -> None:
    # MAX_QUEUE=2 with one decode thread: of 8 large uploads at once, those past 2 waiting to be
    # decoded get 503 with Retry-After at once, instead of holding their bodies for seconds
    with live_server(checkpoint=default_ckpt, max_queue=2, decode_workers=1, decode_split_kb=0) as url:
        answers = large_uploads_at_once(url, 8)
        statuses = [r.status_code for r in answers]
        assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
        for r in answers:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
                assert "waiting to be decoded (limit 2)" in r.json()["error"]["message"]
        # every slot comes back, after a clip that fails to decode as after one that is answered
        small = multipart_frames([encode(f) for f in synth_clip("up", frames=2, seed=9)])
        for _ in range(3):
            r = httpx.post(f"{url}/predict", files=multipart_frames([b"\xff\xd8 not a jpeg"]))
            assert r.status_code == 400, r.text
            assert httpx.post(f"{url}/predict", files=small, timeout=60).status_code == 200
