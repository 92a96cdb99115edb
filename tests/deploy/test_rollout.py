"""Rollouts behind nginx (``python -m bench rollout``): a rolling restart of three replicas under
16-way load loses no request, and a replica killed mid-load costs at most what it had in flight."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.rollout import error_kinds, find_nginx, render_nginx, retries

ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY = 16


def nginx_or_skip() -> str:
    """nginx's path; installed with apt as .ci/run does when missing and this is root. Skips only where
    it is missing and cannot be installed."""
    if (found := find_nginx()) is not None:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("nginx is not installed and cannot be here (no apt-get, or not root): apt-get install nginx")
    done = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "nginx"], capture_output=True, text=True, timeout=300, check=False
    )
    if (found := find_nginx()) is None:
        pytest.skip(f"nginx is not installed and apt-get could not install it: {done.stderr[-500:]}")
    return found


def test_retries_are_counted_from_upstream_lists() -> None:
    access = [
        '1.2.3.4 [t] "POST /predict HTTP/1.1" 200 0.1 upstream_addr="10.0.0.1:8000" upstream_status="200" x',
        '1.2.3.4 [t] "POST /predict HTTP/1.1" 200 0.1 upstream_addr="10.0.0.1:8000, 10.0.0.2:8000" '
        'upstream_status="503, 200" x',
        '1.2.3.4 [t] "POST /predict HTTP/1.1" 200 0.1 upstream_addr="10.0.0.2:8000, 10.0.0.1:8000, 10.0.0.3:8000" '
        'upstream_status="502, 502, 200" x',
        '1.2.3.4 [t] "POST /predict HTTP/1.1" 502 0.0 upstream_addr="fusionserve" upstream_status="502" x',
    ]
    assert retries(access) == {
        "logged": 4,
        "retried": 2,
        "failed_tries_by_status": {"502": 2, "503": 1},
        "failed_tries_by_replica": {"10.0.0.1:8000": 2, "10.0.0.2:8000": 1},
        "no_live_upstreams": 1,
    }


def test_nginx_errors_are_sorted_by_kind() -> None:
    errors = [
        "connect() failed (111: Connection refused) while connecting to upstream",
        "upstream prematurely closed connection while reading response header from upstream",
        "recv() failed (104: Connection reset by peer) while reading response header from upstream",
        "connect() failed (111: Connection refused) while connecting to upstream",
    ]
    assert error_kinds(errors) == {
        "connection_refused": 2,
        "connection_reset": 1,
        "closed_prematurely": 1,
        "no_live_upstreams": 0,
        "timed_out": 0,
    }


def test_the_template_repeats_the_server_line_per_replica() -> None:
    text = render_nginx(["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3", "/tmp/a.log")
    servers = [
        line.split()[1] for line in text.splitlines() if line.strip().startswith("server ") and line.endswith(";")
    ]
    assert servers == ["127.0.0.1:1", "127.0.0.1:2"]
    assert "listen 127.0.0.1:3;" in text
    assert "access_log /tmp/a.log fusionserve_upstreams;" in text
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in text


@pytest.mark.slow
def test_rolling_restart_behind_nginx_loses_no_request(tmp_path: Path) -> None:
    nginx_or_skip()
    out = tmp_path / "rollout.json"
    short = [
        "--drain-s",
        "1",
        "--warmup-s",
        "1",
        "--lead-s",
        "1",
        "--tail-s",
        "1",
        "--settle-s",
        "1",
        "--down-s",
        "1",
        "--clips",
        "4",
    ]
    cmd = [sys.executable, "-m", "bench", "rollout", "--concurrency", str(CONCURRENCY), *short, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())

    rolling = result["rolling_restart"]
    assert rolling["failed"] == 0, (rolling["failed_by"], rolling["nginx"])
    assert rolling["ok"] == rolling["sent"] > 0
    assert [e["replica"] for e in rolling["events"]] == [0, 1, 2]
    # each replica drained and exited on its own (uvicorn re-raises SIGTERM), none was killed for taking too long
    assert [e["exit_code"] for e in rolling["events"]] == [-signal.SIGTERM] * 3
    assert rolling["nginx"]["logged"] == rolling["sent"]  # every request reached nginx and was logged

    kill = result["kill"]
    assert [e["exit_code"] for e in kill["events"]] == [-signal.SIGKILL]
    assert kill["ok"] + kill["failed"] == kill["sent"] > 0
    # a request can be lost only if it was in flight on the killed replica: at most all of them
    assert kill["failed"] <= CONCURRENCY, kill["failed_by"]
    assert set(kill["nginx"]) >= {"retried", "failed_tries_by_status", "failed_tries_by_replica", "errors"}
    assert kill["nginx"]["retried"] >= 1  # the killed replica's in-flight requests and refused connects went elsewhere
