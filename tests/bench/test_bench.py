"""Each bench command runs on tiny settings (numbers are measured in bench/, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from training.synth import LABELS


def test_data_pipeline_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "data",
            "--clips",
            "4",
            "--length",
            "6",
            "--size",
            "16",
            "--frames",
            "4",
            "--image-size",
            "16",
            "--workers",
            "0",
            "1",
            "--rounds",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["clips_per_s"]) == {"jpeg/0", "jpeg/1", "mp4/0", "mp4/1"}
    assert result["ratio_to_jpeg_baseline"]["jpeg/0"] == 1.0


def test_ceiling_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "ceiling.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "ceiling",
            "--batches",
            "1",
            "2",
            "--lengths",
            "4",
            "--min-time",
            "0.01",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(r["batch"], r["frames"]) for r in result["forward"]] == [(1, 4), (2, 4)]
    assert result["best"]["cpu/model/4"]["clips_per_s"] > 0
    assert {r["input"] for r in result["preprocessing"]} == {
        "16 JPEG frames 64x64",
        "16 JPEG frames 224x224",
        "MP4 16 frames 64x64",
        f"prediction over {len(LABELS)} labels",  # the seed-shaped model's synthetic classes
    }
    steps = {r["step"]: r["ms_per_clip"] for r in result["preprocessing"]}
    assert steps["split the multipart body into 16 frame parts (server)"] > 0
    assert steps["read the multipart body through Starlette's form"] > 0
    assert steps["answer JSON: pydantic-core (server, FastAPI's path)"] > 0
    assert result["batchnorm_folded"] == 3  # the seed shape's three conv blocks
