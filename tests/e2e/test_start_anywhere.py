"""``python -m app`` starts and serves from any folder, whatever folders it holds: a folder named like one
of the project's packages (``models/``, ``app/``) in the working directory must not shadow it."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.media import encode, multipart_frames, synth_clip
from tests.support.servers import spawn_server


def test_the_server_starts_from_a_folder_holding_empty_package_named_folders(tmp_path: Path) -> None:
    for name in ("models", "app", "training", "media", "host"):
        (tmp_path / name).mkdir()
    with spawn_server("--max-batch-size", "2", cwd=str(tmp_path)) as (_, url):
        files = multipart_frames([encode(f) for f in synth_clip("left", frames=6)])
        r = httpx.post(f"{url}/predict", files=files, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "moving-digits-lstm"
