"""The OpenAPI document matches the server's behaviour: schemathesis, with every one of its checks,
over the document a real server publishes (its settings: tests/e2e/schemathesis.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.servers import spawn_server

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_no_failure_of_any_check(default_ckpt: Path) -> None:
    st = Path(sys.executable).with_name("st")
    with spawn_server("--checkpoint", str(default_ckpt), "--max-batch-size", "4") as (_, url):
        options = ["--checks", "all", "--max-examples", "25", "--workers", "1", "--seed", "7", "--no-color"]
        run = subprocess.run(
            [str(st), "--config-file", str(CONFIG), "run", f"{url}/openapi.json", *options],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "generated" in run.stdout and " passed" in run.stdout, run.stdout[-2000:]
