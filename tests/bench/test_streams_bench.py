"""``python -m bench.streams`` against a real server on tiny settings (numbers never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.streams import Media, Schedule, largest_held
from models import default_checkpoint

ROW_KEYS = {"scheduled", "answered", "frames_per_s", "p50_ms", "p99_ms", "errors", "late", "held", "attempts"}
ROW_KEYS |= {"client_cores", "server_cores", "other_cores", "client_cpu_ms_per_frame", "server_cpu_ms_per_frame"}
ROW_KEYS |= {"stepper_busy", "step_ms_per_batch", "step_frames_per_s_busy"}


def test_streams_bench_answers_every_frame_both_ways(tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    cmd = [sys.executable, "-m", "bench.streams", "--checkpoint", str(default_checkpoint())]
    cmd += ["--streams", "1", "2", "--fps", "10", "--duration", "1", "--warmup", "0.3", "--p99-ms", "10000"]
    cmd += ["--saturation-streams", "2", "--saturation-window", "2", "--attempts", "1", "--quiet-wait", "0"]
    cmd += ["--ceiling-batches", "1", "2", "--ceiling-time", "0.05", "--env", "AUTOTUNE=false", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for way in ("streams", "clips"):
        rows = result["levels"][way]
        assert [r["streams"] for r in rows] == [1, 2], way  # a 10 s p99 limit: both levels held
        for row in rows:
            assert set(row) >= ROW_KEYS, f"missing {ROW_KEYS - set(row)}"
            assert row["errors"] == {} and row["held"], row
            assert row["answered"] == row["scheduled"] == row["streams"] * 10  # 1 s at 10 fps each
    for row in result["levels"]["streams"]:  # every answer names its step batch, and the stepper reports them
        assert row["batch"] >= 1 and row["stepper_busy"] > 0 and row["step_ms_per_batch"] > 0
    for row in result["levels"]["clips"]:  # /predict goes through the clip batcher, not the stepper
        assert row["server"]["batches"] > 0 and row["stepper_busy"] == 0
    (saturation,) = result["saturation"]
    assert saturation["answered"] > 0 and saturation["errors"] == {}
    assert [r["batch"] for r in result["ceiling"]["rows"]] == [1, 2] and result["ceiling"]["frames_per_s"] > 0
    summary = result["summary"]
    assert summary["largest_held"] == {"streams": 2, "clips": 2} and summary["held_ratio"] == 1.0
    assert summary["saturation"]["of_ceiling"] == round(
        summary["saturation"]["frames_per_s"] / result["ceiling"]["frames_per_s"], 3
    )
    assert result["machine"]["cpus"] and result["server_exit_code"] is not None
    (model,) = result["server_info"]
    assert model["name"] == "moving-digits-lstm" and model["streams"]["mode"] == "step"
    assert "| streams | 2 |" in proc.stdout and "Largest number of 10 fps streams held" in proc.stdout


def test_a_camera_sends_on_an_even_schedule_within_its_window() -> None:
    when = Schedule(start=100.0, measured=101.0, end=103.0)
    slots = when.slots(0.05, fps=10)
    assert len(slots) == 30 and abs(slots[0] - 100.05) < 1e-9 and abs(slots[-1] - 102.95) < 1e-9
    assert sum(s >= when.measured for s in slots) == 20  # the measured two seconds


def test_a_clip_request_holds_the_cameras_last_frames_and_at_least_min_frames() -> None:
    media = Media.build(size=32, window=4, min_frames=2, port=1, cycle=8)
    assert len(media.frames) == 8 and len(media.requests) == 8 * 3  # lengths 2..4 ending at each frame
    first = media.request(camera=0, i=0)  # the first frame still sends min_frames
    assert first.count(b'name="frames"') == 2 and first.startswith(b"POST /predict HTTP/1.1\r\n")
    assert media.request(0, 10).count(b'name="frames"') == 4
    assert media.frame(1, 0) == media.frames[Media.STRIDE % 8]  # cameras start at different frames


def test_largest_held_is_the_last_level_of_an_unbroken_run() -> None:
    rows = [{"streams": 1, "held": True}, {"streams": 2, "held": True}, {"streams": 4, "held": False}]
    assert largest_held(rows) == 2
    assert largest_held([{"streams": 1, "held": False}]) == 0
