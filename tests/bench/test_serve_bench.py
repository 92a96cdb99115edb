"""``python -m bench serve`` and ``compare`` against real servers on tiny settings (numbers never asserted)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import wrk
from bench.serve import HISTOGRAMS, cpu_seconds, parse_env, process_tree, rss_mb, server_split
from host.malloc import heap_usage
from models import default_checkpoint

TINY = ["--duration", "1", "--warmup", "0.5", "--clips", "2"]
LEVEL_KEYS = {"requests", "ok", "clips_per_s", "p50_ms", "p99_ms", "errors", "late", "dropped", "server", "rss", "gpu"}
SPLIT_KEYS = {"queue_ms", "decode_ms", "inference_ms_per_batch", "batch_size", "request_ms", "batches", "dropped_clips"}


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bench", *args, "--checkpoint", str(default_checkpoint()), *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def assert_clean_level(row: dict[str, Any]) -> None:
    assert set(row) >= LEVEL_KEYS, f"missing {LEVEL_KEYS - set(row)}"
    assert row["errors"] == {}, row["errors"]
    assert row["ok"] == row["requests"] > 0
    assert row["late"] == row["dropped"] == 0
    assert set(row["server"]) == SPLIT_KEYS
    assert row["server"]["batches"] > 0
    assert row["rss"]["max_mb"] >= row["rss"]["start_mb"] > 0
    assert ("samples" in row["gpu"]) != ("unavailable" in row["gpu"])  # the GPU's use, or why it is absent


def test_serve_bench_reports_every_level_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    proc = run_bench(
        "serve",
        "--client",
        "python",
        "--concurrency",
        "1",
        "2",
        "--rates",
        "5",
        "--ceiling-time",
        "0.01",
        "--c1-pairs",
        "2",
        "--c1-pair-time",
        "0.4",
        "--c1-interleaved",
        "6",
        "--rss-soak",
        "2",
        "--soak-concurrency",
        "2",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["concurrency"] for r in result["closed_loop"]] == [1, 2]
    soak = result["rss_soak"]
    assert soak["ok"] == soak["requests"] > 0 and len(soak["rss_samples_mb"]) >= 2
    assert soak["rss_last_over_first"] == round(soak["rss_samples_mb"][-1] / soak["rss_samples_mb"][0], 3)
    assert soak["rss_at_10s_mb"] is None  # a 2 s soak has no sample 10 s in
    if heap_usage() is not None:  # glibc: the server reports its heap on /metrics
        assert soak["heap_samples_mb"] and all(used > 1 and free >= 0 for used, free in soak["heap_samples_mb"])
        assert soak["heap_in_use_max_mb"] == max(used for used, _ in soak["heap_samples_mb"])
    assert len(result["ceiling"]["before_after_clips_per_s"]) == 2 and result["ceiling"]["clips_per_s"] > 0
    levels = result["closed_loop"]
    for row in levels:
        assert row["of_ceiling"] == round(row["clips_per_s"] / result["ceiling"]["clips_per_s"], 3)
        before, after = row["ceiling_around"]  # at the first sweep's best batch, right around the level
        assert before > 0 and after > 0
        assert row["of_ceiling_around"] == round(row["clips_per_s"] / max(before, after), 3)
    assert levels[0]["ceiling_around"][1] == levels[1]["ceiling_around"][0]  # one measurement between levels
    # c=1 against one request's decode + forward in-process, in pairs of a short burst and the same work
    pairs = levels[0]["c1_pairs"]
    assert len(pairs) == 2
    for pair in pairs:
        assert pair["decode_ms"] > 0 and pair["forward_ms"] > 0 and pair["p50_ms"] > 0
        assert pair["total_ms"] == pytest.approx(pair["decode_ms"] + pair["forward_ms"], abs=0.02)
        assert pair["hot_total_ms"] > 0
    gaps = [pair["p50_ms"] - pair["total_ms"] for pair in pairs]
    assert levels[0]["p50_over_inprocess_ms"] == pytest.approx(statistics.median(gaps), abs=0.01)
    hot_gaps = [pair["p50_ms"] - pair["hot_total_ms"] for pair in pairs]
    assert levels[0]["p50_over_hot_ms"] == pytest.approx(statistics.median(hot_gaps), abs=0.01)
    assert levels[0]["inprocess"]["total_ms"] == pytest.approx(
        statistics.median(p["total_ms"] for p in pairs), abs=0.01
    )
    assert "c1_pairs" not in levels[1]
    # and request by request, each followed by the same clip decoded and run in-process
    inter = levels[0]["c1_interleaved"]
    assert inter["requests"] == 6 and inter["p50_ms"] > 0 and inter["inprocess_ms"] > 0
    assert "c1_interleaved" not in levels[1]
    for row in levels:  # the server's own time per request is part of what the client waited for
        assert 0 < row["server"]["request_ms"] <= row["mean_ms"]
    assert [r["rate"] for r in result["open_loop"]] == [5.0]
    for row in result["closed_loop"] + result["open_loop"]:
        assert_clean_level(row)
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| c=1 |" in proc.stdout and "| 5/s |" in proc.stdout and "c=1 in 2 pairs" in proc.stdout


def test_compare_bench_interleaves_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    sides = ["--a", "", "--b", "MAX_BATCH_DELAY_MS=2", "--c", "MAX_BATCH_SIZE=1", "--frame-size", "32"]
    proc = run_bench(
        "compare", *sides, "--b-frame-size", "96", "--concurrency", "1", "2", "--rounds", "1", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["server_env"] == {
        "A": {},
        "B": {"FUSIONSERVE_MAX_BATCH_DELAY_MS": "2"},
        "C": {"FUSIONSERVE_MAX_BATCH_SIZE": "1"},
    }
    # side B sent larger frames (the server resized them to the model's size)
    assert result["frame_size"] == {"A": 32, "B": 96, "C": 32}
    assert result["payload_mean_bytes"]["B"] > 2 * result["payload_mean_bytes"]["A"]
    assert "B: {'FUSIONSERVE_MAX_BATCH_DELAY_MS': '2'}, 96px frames" in proc.stdout
    assert result["server_info"]["C"][0]["batching"]["max_batch_size"] == 1
    assert set(result["summary"]) == set(result["runs"]) == {"1", "2"}
    for c, summary in result["summary"].items():
        assert [len(result["runs"][c][side]) for side in ("A", "B", "C")] == [1, 1, 1]
        for side in ("A", "B", "C"):
            assert summary[side]["errors"] == 0
            assert_clean_level(result["runs"][c][side][0])
        for ratio in ("ratio_b_over_a", "ratio_c_over_a"):
            assert set(summary[ratio]) == {"clips_per_s", "p50_ms", "p99_ms"}


def test_parse_env_prefixes_and_normalises_keys() -> None:
    env = parse_env(["max-batch-size=4", "FUSIONSERVE_DEVICE=cpu", "max_batch_delay_ms=2.5", "OMP_WAIT_POLICY=PASSIVE"])
    assert env == {
        "FUSIONSERVE_MAX_BATCH_SIZE": "4",
        "FUSIONSERVE_DEVICE": "cpu",
        "FUSIONSERVE_MAX_BATCH_DELAY_MS": "2.5",
        "OMP_WAIT_POLICY": "PASSIVE",  # the runtime's own variables keep their names
    }


def test_server_split_is_the_mean_of_the_histogram_deltas() -> None:
    before = {f"{h}_{s}": 0.0 for h in HISTOGRAMS.values() for s in ("sum", "count")}
    before["fusionserve_dropped_clips_total"] = 1.0
    after = dict(before)
    after |= {"fusionserve_queue_seconds_sum": 0.03, "fusionserve_queue_seconds_count": 6.0}
    after |= {"fusionserve_inference_seconds_sum": 0.12, "fusionserve_inference_seconds_count": 3.0}
    after |= {"fusionserve_batch_size_sum": 6.0, "fusionserve_batch_size_count": 3.0}
    after["fusionserve_dropped_clips_total"] = 3.0
    split = server_split(before, after)
    assert split == {
        "queue_ms": 5.0,
        "decode_ms": None,  # nothing decoded in between
        "inference_ms_per_batch": 40.0,
        "batch_size": 2.0,
        "request_ms": None,
        "batches": 3.0,
        "dropped_clips": 2.0,
    }


@pytest.mark.skipif(not wrk.available(), reason="wrk is not installed (Debian package wrk; .ci/run installs it)")
def test_serve_bench_drives_the_server_with_wrk(tmp_path: Path) -> None:
    out = tmp_path / "serve-wrk.json"
    proc = run_bench(
        "serve", "--client", "wrk", "--concurrency", "1", "3", "--rates", "--ceiling-time", "0", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for row in result["closed_loop"]:
        assert row["client"] == "wrk"
        assert_clean_level(row)
        # what wrk counted is what the server answered
        split = row["server"]  # the mean batch size is rounded to 3 decimals
        assert split["batch_size"] * split["batches"] >= row["ok"] - 0.0005 * split["batches"]


def test_wrk_report_becomes_a_level_result() -> None:
    raw = {
        "requests": 12, "ok": 9, "duration_us": 2_000_000, "bad": "503,503,400,", "connect": 0, "read": 1,
        "write": 0, "timeout": 0, "p50_us": 1500, "p90_us": 2500, "p99_us": 9000, "mean_us": 1800.0,
    }  # fmt: skip
    summary = wrk.WrkResult(raw).summary()
    assert summary["errors"] == {"400": 1, "503": 2, "wrk-read-error": 1}
    assert summary["requests"] == 13 and summary["ok"] == 9
    assert summary["clips_per_s"] == 4.5 and summary["p50_ms"] == 1.5 and summary["p99_ms"] == 9.0


def test_rss_and_cpu_count_the_servers_child_processes() -> None:
    # a parent holding 200 MB whose child holds 100 MB, as a server and its decode processes
    child = "import time; b = bytearray(100 << 20); print('up', flush=True); time.sleep(60)"
    parent = (
        "import subprocess, sys, time; b = bytearray(200 << 20); "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, text=True); "
        "p.stdout.readline(); print('up', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        tree = process_tree(proc.pid)
        assert len(tree) == 2 and tree[0] == proc.pid
        alone = int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
        total = rss_mb(proc.pid)
        assert total is not None and 200 <= alone < 280 and total >= alone + 100
        assert (cpu_seconds(proc.pid) or 0) > 0  # the two interpreters started and filled their memory
    finally:
        for pid in reversed(process_tree(proc.pid)):
            subprocess.run(["kill", str(pid)], check=False)
        proc.wait(timeout=10)
    assert rss_mb(proc.pid) is None and cpu_seconds(proc.pid) is None


@pytest.mark.skipif(not wrk.available(), reason="wrk is not installed (Debian package wrk; .ci/run installs it)")
@pytest.mark.skipif(heap_usage() is None, reason="needs glibc 2.33+ (mallinfo2); this C library has none")
def test_heap_bench_samples_the_heap_of_a_loaded_server(tmp_path: Path) -> None:
    out = tmp_path / "heap.json"
    cmd = [sys.executable, "-m", "bench", "heap", "--checkpoint", str(default_checkpoint()), "--env",
           "MAX_BATCH_SIZE=4", "MEMORY_TRIM_S=0", "--concurrency", "3", "--duration", "2", "--interval", "0.5",
           "--clips", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["load"]["ok"] > 0 and result["load"]["errors"] == {}
    assert result["settings"]["max_batch_size"] == "4"
    rows = result["rows"]
    assert len(rows) >= 2
    for row in rows:
        assert abs(row["heap_mb"] - row["in_use_mb"] - row["free_mb"]) <= 0.2  # the heap is what is in use or free
        assert row["rss_mb"] > row["in_use_mb"] > 1
    peaks = [row["peak_in_use_mb"] for row in rows]
    assert peaks == sorted(peaks) and peaks[-1] >= result["start"]["in_use_mb"]
    assert result["heap_over_peak_in_use"] == round(rows[-1]["heap_mb"] / peaks[-1], 3)
    assert "peak in use" in proc.stdout
