"""Batch limits as a server measures them at start, and settings that win over them."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.servers import live_server


def test_server_reports_its_tuning_and_explicit_limits_win(default_ckpt: Path) -> None:
    with live_server(checkpoint=default_ckpt) as url:
        batching = httpx.get(f"{url}/models/moving-digits-lstm").json()["batching"]
        assert batching["autotuned"] is True
        tuning = batching["tuning"]
        assert batching["max_batch_size"] == tuning["max_batch_size"]
        assert batching["max_batch_frames"] == tuning["max_batch_frames"] == tuning["max_batch_size"] * 16
        assert "1" in tuning["measured"] and tuning["measured"]["1"]["clips_per_s"] > 0
        # the second instance's start follows the measured gain from batching
        expected = max(1, tuning["max_batch_size"] // 4) if tuning["batching_gain"] > 1.2 else 1
        assert batching["share_from"] == tuning["share_from"] == expected
        streams = httpx.get(f"{url}/models/moving-digits-lstm").json()["streams"]  # step batches: measured too
        assert streams["autotuned"] is True and streams["max_batch"] == streams["tuning"]["max_batch_size"]
        assert streams["tuning"]["clip_frames"] == 1 and "1" in streams["tuning"]["measured"]
    with live_server(checkpoint=default_ckpt, max_batch_size=5, max_batch_frames=40) as url:
        batching = httpx.get(f"{url}/models/moving-digits-lstm").json()["batching"]
        assert (batching["max_batch_size"], batching["max_batch_frames"], batching["autotuned"]) == (5, 40, False)
    with live_server(checkpoint=default_ckpt, max_batch_size=3) as url:  # the frame limit follows the clip limit
        batching = httpx.get(f"{url}/models/moving-digits-lstm").json()["batching"]
        assert (batching["max_batch_size"], batching["max_batch_frames"], batching["autotuned"]) == (3, 48, False)
    with live_server(checkpoint=default_ckpt, share_from=2, stream_max_batch=24) as url:  # explicit values win
        info = httpx.get(f"{url}/models/moving-digits-lstm").json()
        assert info["batching"]["share_from"] == 2
        assert (info["streams"]["max_batch"], info["streams"]["autotuned"]) == (24, False)
