"""app.multipart.parse_form on bodies encoded by httpx, as clients send them."""

from __future__ import annotations

import httpx
import pytest

from app.multipart import parse_form
from media import BadInput, WrongShape


def encoded(files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str] | None = None) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/predict", files=files, data=data)
    return request.read(), request.headers["content-type"]


def test_parts_come_back_in_order_with_their_bytes() -> None:
    blobs = [bytes([i]) * (1000 + 37 * i) + b"\r\n--not-the-boundary\r\n" for i in range(5)]
    body, ctype = encoded([("frames", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)], {"note": "hi"})
    parts = parse_form(body, ctype, max_files=5)
    assert [(p.name, p.filename) for p in parts] == [("note", None)] + [("frames", f"{i}.jpg") for i in range(5)]
    assert parts[0].data == b"hi"
    assert [p.data for p in parts[1:]] == blobs


def test_data_that_looks_like_a_boundary_is_kept_whole() -> None:
    payload = b"frame\r\n--almost a boundary" * 3000
    body, ctype = encoded([("video", ("v.mp4", payload, "video/mp4"))])
    [part] = parse_form(body, ctype, max_files=1)
    assert part.data == payload


@pytest.mark.parametrize(
    ("count", "fields", "error"),
    [(4, 16, None), (5, 0, WrongShape), (1, 17, BadInput)],
)
def test_limits_on_files_and_fields(count: int, fields: int, error: type[Exception] | None) -> None:
    files = [("frames", (f"{i}.png", b"x", "image/png")) for i in range(count)]
    body, ctype = encoded(files, {f"f{i}": "v" for i in range(fields)})
    if error is None:
        assert len(parse_form(body, ctype, max_files=4, max_fields=16)) == count + fields
        return
    with pytest.raises(error):
        parse_form(body, ctype, max_files=4, max_fields=16)


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("multipart/form-data", b"--abc\r\n\r\n--abc--\r\n"),
        ("multipart/form-data; boundary=abc", b"no boundary anywhere in here"),
        ("multipart/form-data; boundary=abc", b"--abc\r\nContent-Type: text/plain\r\n\r\nx\r\n--abc--\r\n"),
        ("multipart/form-data; boundary=abc", b"--abc\r\nContent-Disposition: attachment\r\n\r\nx\r\n--abc--\r\n"),
    ],
    ids=["no-boundary-parameter", "not-multipart", "no-disposition", "not-form-data"],
)
def test_malformed_bodies_are_bad_input(ctype: str, body: bytes) -> None:
    with pytest.raises(BadInput, match="multipart"):
        parse_form(body, ctype, max_files=4)
