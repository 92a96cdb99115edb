"""The serve and compare benchmarks' request kinds (JSON base64 frames, KServe v2 binary tensors) against
a real server, and their GPU sampling through a stand-in ``nvidia-smi`` (numbers never asserted)."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.api.kserve import parse_infer
from app.uploads import Target, parse_json
from bench import compare, loadgen, serve, wrk
from bench.media import synth_clips
from media import FrameFormat, Limits
from tests.support.servers import live_server

MODEL = loadgen.ModelInput("moving-digits-lstm", 32, 32, 3)  # the bundled model's input
SAMPLE_LINES = "[N/A], 100\n40, 1000\n60, 1500\n"  # an unparsable sample, then two


@dataclass
class InProcessServer:
    """The live server as the benchmarks see a server: its URL and the process it runs in (this one)."""

    url: str
    pid: int


@pytest.fixture(scope="module")
def server(default_ckpt: Path) -> Iterator[InProcessServer]:
    with live_server(checkpoint=default_ckpt, max_batch_size=4) as url:
        yield InProcessServer(url, os.getpid())


def fake_nvidia_smi(folder: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An executable ``nvidia-smi`` running ``script`` (bash), first on PATH; returns the file its arguments go to."""
    folder.mkdir(exist_ok=True)
    args = folder / "args"
    exe = folder / "nvidia-smi"
    exe.write_text(f'#!/bin/bash\necho "$@" > {args}\n{script}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return args


def level_args(payload: str, client: str, **extra: Any) -> argparse.Namespace:
    """The serve/compare settings of one tiny closed-loop level at concurrency 2."""
    settings = {
        "payload": payload, "client": client, "clips": 2, "frames": 8, "frame_size": 64, "concurrency": [2],
        "rates": [], "duration": 1.0, "warmup": 0.3, "rss_interval": 0.25, "max_in_flight": 4, "rss_soak": 0.0,
        "soak_concurrency": 2, "c1_pairs": 0, "c1_interleaved": 0, "rounds": 1,
    }  # fmt: skip
    return argparse.Namespace(**(settings | extra))


def test_json_payload_is_the_jpeg_frames_in_base64() -> None:
    clip = synth_clips(1, 4, 64)[0]
    payload = loadgen.json_payload(clip)
    target = Target(FrameFormat(32, 32, 3), 4, Limits(16, 1 << 31))
    jpegs = list(loadgen.jpeg_payload(clip).media)  # the same encoder, the same bytes
    assert parse_json(payload.body, target, None).images == list(payload.media) == jpegs
    assert (payload.path, payload.request_headers) == ("/predict", {"content-type": "application/json"})


def test_v2_payload_is_the_clip_as_a_binary_tensor() -> None:
    clip = synth_clips(1, 5, 32)[0]  # (5, 32, 32, 3)
    payload = loadgen.v2_payload(clip, MODEL)
    assert payload.path == "/v2/models/moving-digits-lstm/infer" and payload.route == "/v2/models/{name}/infer"
    head = payload.request_headers[loadgen.V2_HEADER]
    assert int(head) == len(payload.body) - clip.size
    request = parse_infer(payload.body, head, Target(FrameFormat(32, 32, 3), 5, Limits(16, 1 << 31)), 1)
    assert request.array.shape == (1, 5, 32, 32, 3) and request.binary_output
    np.testing.assert_array_equal(request.array[0], clip)


def test_v2_payloads_are_drawn_at_the_models_size() -> None:
    wide = loadgen.ModelInput("wide", 24, 40, 3)
    payloads = loadgen.build_payloads("v2", 2, 3, 64, wide)
    assert [len(p.media[0]) for p in payloads] == [3 * 24 * 40 * 3] * 2
    assert b'"shape": [1, 3, 24, 40, 3]' in payloads[0].body


def test_wrk_reads_each_payloads_method_path_and_headers() -> None:
    payload = loadgen.v2_payload(synth_clips(1, 2, 32)[0], MODEL)
    head = wrk.request_head(payload).splitlines()
    assert head[0] == "POST /v2/models/moving-digits-lstm/infer"
    assert head[1:] == ["content-type: application/octet-stream", f"{loadgen.V2_HEADER}: {len(payload.body) - 6144}"]
    assert [wrk.threads_for(c, cpus) for c, cpus in [(1, 2), (64, 2), (64, 16), (1, 16), (64, 64)]] == [1, 1, 2, 1, 8]


@pytest.mark.parametrize(
    "payload,client",
    [
        ("json", "python"),
        ("v2", "python"),
        pytest.param("json", "wrk", marks=pytest.mark.skipif(not wrk.available(), reason="wrk is not installed")),
        pytest.param("v2", "wrk", marks=pytest.mark.skipif(not wrk.available(), reason="wrk is not installed")),
    ],
)
def test_serve_levels_send_the_payload_and_sample_the_gpu(
    server: InProcessServer, payload: str, client: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path / "bin", 'while :; do echo "37, 2048"; sleep 0.1; done', monkeypatch)
    out = asyncio.run(serve.run_levels(server, level_args(payload, client)))  # type: ignore[arg-type]
    (row,) = out["closed_loop"]
    assert row["errors"] == {} and row["ok"] == row["requests"] > 0
    assert row.get("client", "python") == client
    assert row["server"]["request_ms"] > 0  # the route's own series: the load went where the payload said
    assert row["gpu"]["utilization_mean_pct"] == 37.0 and row["gpu"]["memory_used_max_mib"] == 2048.0
    assert out["server_info"][0]["name"] == MODEL.name
    assert "GPU % mean/max" in serve.markdown({"closed_loop": out["closed_loop"], "open_loop": []})


def test_compare_rounds_send_v2_tensors_to_every_side(server: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi (nor wrk): the Python client, no GPU samples
    servers = {"A": server, "B": server}
    result = asyncio.run(compare.run_rounds(servers, level_args("v2", "auto", b_frame_size=None)))  # type: ignore[arg-type]
    assert result["payload_mean_bytes"]["A"] == result["payload_mean_bytes"]["B"] > 8 * 32 * 32 * 3
    summary = result["summary"]["2"]
    for side in ("A", "B"):
        run = result["runs"]["2"][side][0]
        assert run["errors"] == {} and run["ok"] > 0 and run["server"]["request_ms"] > 0
        assert run["gpu"] == {"unavailable": "nvidia-smi is not on PATH"}
        assert summary[side]["gpu_utilization_pct"] is None
    assert set(summary["ratio_b_over_a"]) == set(compare.METRICS)


def test_in_process_decoder_reads_json_and_v2_as_the_server_does(default_ckpt: Path) -> None:
    probe = serve.InRunCeiling(default_ckpt, 4, 0.01)
    clip = synth_clips(1, 4, 32)[0]
    from_jpeg = probe.decoder(loadgen.jpeg_payload(clip))()
    assert probe.decoder(loadgen.json_payload(clip))().equal(from_jpeg)
    from_v2 = probe.decoder(loadgen.v2_payload(clip, MODEL))()  # (T, C, H, W), the pixels as sent
    np.testing.assert_array_equal(from_v2.permute(0, 2, 3, 1).numpy(), clip)


def run_sampler(**kwargs: Any) -> serve.GpuSampler:
    async def sample() -> serve.GpuSampler:
        async with serve.GpuSampler(**kwargs) as sampler:
            for _ in range(50):  # until the stand-in's samples are in, or it has ended
                proc = sampler._proc
                if len(sampler.samples) >= 2 or proc is None or proc.returncode is not None:
                    break
                await asyncio.sleep(0.02)
        return sampler

    return asyncio.run(sample())


def test_gpu_sampler_averages_nvidia_smi_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = fake_nvidia_smi(tmp_path, f"printf '{SAMPLE_LINES}'\nexec sleep 30", monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")  # the server's cuda:0 is the first visible GPU
    sampler = run_sampler(interval_ms=250)
    assert sampler.summary() == {
        "gpu": "3",
        "samples": 2,
        "utilization_mean_pct": 50.0,
        "utilization_max_pct": 60.0,
        "memory_used_max_mib": 1500.0,
    }
    query = "--query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits --id=3 -lms 250"
    assert args.read_text().strip() == query


def test_gpu_sampler_says_why_it_has_no_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    assert run_sampler().summary() == {"unavailable": "nvidia-smi is not on PATH"}
    fake_nvidia_smi(tmp_path, "echo 'NVIDIA-SMI has failed: no driver' >&2; exit 9", monkeypatch)
    reason = run_sampler().summary()["unavailable"]
    assert reason == "nvidia-smi exited with 9 and no sample: NVIDIA-SMI has failed: no driver"


@pytest.mark.parametrize(
    "line,sample",
    [("45, 1024", (45.0, 1024.0)), (" 7 ,  80 \n", (7.0, 80.0)), ("[N/A], 12", None), ("45", None), ("", None)],
)
def test_gpu_sample_lines_parse_or_are_skipped(line: str, sample: tuple[float, float] | None) -> None:
    assert serve.parse_gpu_sample(line) == sample
