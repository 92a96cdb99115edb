"""``python -m bench timeline``'s parts on tiny settings, against an in-process server (numbers never asserted)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.timeline import long_video, markdown, measure
from tests.support.servers import live_server


def test_timeline_bench_times_both_strides(tmp_path: Path, default_ckpt: Path) -> None:
    path = long_video(2.0, 32, 24, folder=tmp_path)  # 48 frames: 2 s at 24 fps
    assert long_video(2.0, 32, 24, folder=tmp_path) == path  # cached: written once
    args = argparse.Namespace(fps=8.0, window=4, rounds=2)
    with live_server(checkpoint=default_ckpt, max_batch_size=2) as url:
        result = measure(url, path.read_bytes(), args)
    assert (result["frames"], result["window"]) == (16, 4)
    assert result["segments"] == {"stride=window": 4, "stride=1": 13}
    assert all(len(s) == 2 for s in result["seconds"].values())
    assert result["ratio_stride1_over_window"] > 0
    text = markdown({**result, "settings": {"fps": 8.0}})
    assert "stride=1 / stride=window" in text
