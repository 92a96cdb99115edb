"""An asyncio + httpx load generator for ``POST /predict`` and KServe v2 ``infer``.

Bodies are built once and reused as bytes, so the client spends its CPU on sockets, not on
encoding. Four kinds: ``jpeg`` (multipart JPEG frames), ``mp4`` (one multipart ``video``
part), ``json`` (``{"frames": [base64 JPEG, ...]}``), all to ``/predict``; and ``v2`` (the
binary tensor extension: a JSON header, then the clip's raw uint8 pixels at the model's input
size) to ``/v2/models/{name}/infer``. Each payload names its own path and headers. Two modes:

- closed loop: ``concurrency`` workers, each posting back-to-back for ``duration`` s;
- open loop: arrivals at a fixed ``rate`` (Poisson or evenly spaced), at most
  ``max_in_flight`` outstanding; an arrival that finds the cap reached is dropped (not
  sent), one sent more than ``late_ms`` after its slot is counted late. Open-loop
  latency runs from the scheduled arrival, so a lagging client cannot hide queueing.

Latency percentiles are over successful (200) requests; clips/s counts only those.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import httpx
import numpy as np

from bench.media import encode_jpeg, encode_mp4, resize_clip, synth_clips

log = logging.getLogger(__name__)

KINDS = ("jpeg", "mp4", "json", "v2")
V2_HEADER = "Inference-Header-Content-Length"  # the JSON header's length; the binary tensor follows it


@dataclass(frozen=True)
class ModelInput:
    """What a v2 tensor is shaped for: the served model's name and input size (from ``GET /models``)."""

    name: str
    height: int
    width: int
    channels: int


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_type: str
    frames: int
    kind: str = "jpeg"  # one of KINDS
    media: tuple[bytes, ...] = ()  # the encoded parts (each JPEG frame, or the MP4), to decode in-process
    path: str = "/predict"  # where it is posted
    route: str = "/predict"  # the server's route template, as its request metrics label it
    headers: tuple[tuple[str, str], ...] = ()  # beside Content-Type

    @cached_property
    def request_headers(self) -> dict[str, str]:
        """Every header the request sends (Content-Length aside)."""
        return {"content-type": self.content_type, **dict(self.headers)}


@dataclass
class LevelResult:
    latencies_s: list[float] = field(default_factory=list)  # successful requests only
    statuses: Counter[str] = field(default_factory=Counter)  # "200", "503", "ConnectError", ...
    elapsed_s: float = 0.0
    late: int = 0
    dropped: int = 0

    def summary(self) -> dict[str, Any]:
        ok = self.statuses.get("200", 0)
        lat_ms = np.asarray(self.latencies_s) * 1000.0
        pct = {f"p{q}_ms": round(float(np.percentile(lat_ms, q)), 2) if ok else None for q in (50, 90, 99)}
        return {
            "requests": sum(self.statuses.values()),
            "ok": ok,
            "clips_per_s": round(ok / self.elapsed_s, 2) if self.elapsed_s > 0 else 0.0,
            **pct,
            "mean_ms": round(float(lat_ms.mean()), 2) if ok else None,
            "errors": {k: v for k, v in sorted(self.statuses.items()) if k != "200"},
            "elapsed_s": round(self.elapsed_s, 3),
        }


def multipart(parts: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body from (field, filename, data, content type) parts; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, filename, data, ctype in parts:
        out.write(f"--{boundary}\r\n".encode())
        out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode())
        out.write(f"Content-Type: {ctype}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def jpeg_payload(clip: np.ndarray, quality: int = 90) -> Payload:
    """Each frame of ``clip`` (T, H, W, 3) as one ``frames`` JPEG part, in order."""
    parts = [("frames", f"{t:03d}.jpg", encode_jpeg(frame, quality), "image/jpeg") for t, frame in enumerate(clip)]
    body, ctype = multipart(parts)
    return Payload(body, ctype, len(clip), "jpeg", tuple(p[2] for p in parts))


def mp4_payload(clip: np.ndarray, fps: int = 25) -> Payload:
    """``clip`` (T, H, W, 3) encoded with libx264 as one ``video`` part."""
    video = encode_mp4(clip, fps)
    body, ctype = multipart([("video", "clip.mp4", video, "video/mp4")])
    return Payload(body, ctype, len(clip), "mp4", (video,))


def json_payload(clip: np.ndarray, quality: int = 90) -> Payload:
    """Each frame of ``clip`` (T, H, W, 3) as a base64 JPEG in ``{"frames": [...]}``, in order."""
    jpegs = tuple(encode_jpeg(frame, quality) for frame in clip)
    body = json.dumps({"frames": [base64.b64encode(j).decode() for j in jpegs]}).encode()
    return Payload(body, "application/json", len(clip), "json", jpegs)


def v2_payload(clip: np.ndarray, model: ModelInput) -> Payload:
    """``clip`` (T, H, W, C) uint8 at ``model``'s input size as one KServe v2 binary tensor
    ``[1, T, H, W, C]``, the ``probabilities`` output asked for as binary too."""
    T, H, W, C = clip.shape
    assert (model.height, model.width, model.channels) == (H, W, C), f"clip {clip.shape} is not at {model}"
    tensor = np.ascontiguousarray(clip, dtype=np.uint8).tobytes()
    header = {
        "inputs": [
            {
                "name": "frames",
                "datatype": "UINT8",
                "shape": [1, T, H, W, C],
                "parameters": {"binary_data_size": len(tensor)},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    return Payload(
        head + tensor,
        "application/octet-stream",
        T,
        "v2",
        (tensor,),
        path=f"/v2/models/{model.name}/infer",
        route="/v2/models/{name}/infer",
        headers=((V2_HEADER, str(len(head))),),
    )


def build_payloads(kind: str, count: int, frames: int, size: int, model: ModelInput | None = None) -> list[Payload]:
    """``count`` distinct request bodies of ``kind`` (one of KINDS), frames drawn at ``size`` pixels;
    ``v2`` tensors are drawn at ``model``'s input size instead (the pixels the server takes as they
    are), which it needs."""
    if kind == "v2":
        assert model is not None, "v2 tensors are shaped for a model: pass its ModelInput"
        clips = synth_clips(count, frames, model.height)
        return [v2_payload(resize_clip(clip, model.height, model.width), model) for clip in clips]
    encode = {"jpeg": jpeg_payload, "mp4": mp4_payload, "json": json_payload}[kind]
    return [encode(clip) for clip in synth_clips(count, frames, size)]


def make_client(connections: int, timeout_s: float = 120.0) -> httpx.AsyncClient:
    """One client for the whole run, with a pool large enough that no request waits for a connection."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s))


async def _post(client: httpx.AsyncClient, url: str, payload: Payload, result: LevelResult, t0: float) -> None:
    """POST ``payload`` to its path on the server at ``url``; record its status and, if 200, its
    latency measured from ``t0``."""
    try:
        response = await client.post(url + payload.path, content=payload.body, headers=payload.request_headers)
        status = str(response.status_code)
    except httpx.HTTPError as exc:
        status = type(exc).__name__
        log.debug("request failed: %r", exc)
    result.statuses[status] += 1
    if status == "200":
        result.latencies_s.append(time.perf_counter() - t0)


async def closed_loop(
    client: httpx.AsyncClient, url: str, payloads: list[Payload], concurrency: int, duration_s: float
) -> LevelResult:
    """``concurrency`` workers post back-to-back to the server at ``url`` until ``duration_s`` has passed;
    in-flight requests finish."""
    result = LevelResult()
    start = time.perf_counter()
    stop_at = start + duration_s

    async def worker(i: int) -> None:
        k = i
        while (t0 := time.perf_counter()) < stop_at:
            await _post(client, url, payloads[k % len(payloads)], result, t0)
            k += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result.elapsed_s = time.perf_counter() - start
    return result


async def open_loop(
    client: httpx.AsyncClient,
    url: str,
    payloads: list[Payload],
    rate: float,
    duration_s: float,
    max_in_flight: int,
    poisson: bool = True,
    late_ms: float = 5.0,
    seed: int = 0,
) -> LevelResult:
    """Arrivals at ``rate``/s for ``duration_s`` at the server at ``url``; over ``max_in_flight``
    outstanding an arrival is dropped."""
    assert rate > 0, f"rate must be positive, got {rate}"
    result = LevelResult()
    rng = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    slot, k = start, 0
    while slot - start < duration_s:
        delay = slot - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if (time.perf_counter() - slot) * 1000.0 > late_ms:
            result.late += 1
        if len(tasks) >= max_in_flight:
            result.dropped += 1
        else:
            task = asyncio.create_task(_post(client, url, payloads[k % len(payloads)], result, slot))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        slot += rng.expovariate(rate) if poisson else 1.0 / rate
    await asyncio.gather(*tasks)
    result.elapsed_s = time.perf_counter() - start
    return result
