"""``python -m bench frontends`` on tiny settings against real servers (numbers never asserted)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.frontends import main


def test_frontends_bench_measures_the_engine_and_its_front_ends(tmp_path: Path, default_ckpt: Path) -> None:
    out = tmp_path / "frontends.json"
    args = argparse.Namespace(
        checkpoint=default_ckpt,
        frontends=[1, 2],
        payload="v2",
        concurrency=2,
        duration=0.5,
        warmup=0.2,
        rounds=1,
        out=out,
        env=["AUTOTUNE=false", "MAX_BATCH_SIZE=4"],
    )
    assert main(args) == 0
    result = json.loads(out.read_text())
    one, two = result["runs"]["1"][0], result["runs"]["2"][0]
    assert one["answered"] > 0 and two["answered"] > 0
    assert one["front_end_pids"] == [] and len(two["front_end_pids"]) == 2
    assert one["frontends_cpu_ms_per_request"] == 0 and two["frontends_cpu_ms_per_request"] > 0
    assert two["engine_cpu_ms_per_request"] > 0
    assert set(one["engine_cpu_ms_per_request_by_thread"]) == {"loop", "decode", "model"}
