"""Closed-loop load from ``wrk`` (C, from Debian's ``wrk`` package) when it is installed.

On a 2-core machine the load generator shares the cores with the server; the Python
client spends about 3 to 5 ms of CPU per request, ``wrk`` a small fraction of that, so
the server keeps more of the machine. ``wrk`` keeps ``concurrency`` connections with one
request outstanding on each (the same closed loop as ``loadgen.closed_loop``) and sends
the prebuilt multipart bodies round-robin through a Lua script. Its latency percentiles
are over all responses; non-200 answers are counted as errors by status.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.loadgen import Payload

SCRIPT = """
local dir, n, path = "%(dir)s", %(count)d, "%(path)s"
local bodies, types = {}, {}
for i = 1, n do
  local f = assert(io.open(dir .. "/body-" .. i, "rb")); bodies[i] = f:read("*a"); f:close()
  local g = assert(io.open(dir .. "/type-" .. i, "rb")); types[i] = g:read("*a"); g:close()
end
local next_body = 0
ok, statuses = 0, ""
function init(args) next_body = tonumber(args[1] or "0") %% n end
function request()
  next_body = next_body %% n + 1
  return wrk.format("POST", path, {["Content-Type"] = types[next_body]}, bodies[next_body])
end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 else statuses = statuses .. status .. "," end
end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function done(summary, latency, requests)
  local good, bad = 0, ""
  for _, t in ipairs(threads) do good = good + t:get("ok"); bad = bad .. t:get("statuses") end
  local e = summary.errors
  io.write("WRK-RESULT ", string.format(
    '{"requests": %%d, "ok": %%d, "duration_us": %%d, "bad": "%%s", "connect": %%d, "read": %%d, ' ..
    '"write": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "mean_us": %%.1f}',
    summary.requests, good, summary.duration, bad, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean), "\\n")
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


class WrkResult:
    """What ``wrk`` reported for one level, shaped like ``loadgen.LevelResult``."""

    late = 0
    dropped = 0

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.statuses: Counter[str] = Counter({"200": raw["ok"]})
        for status in filter(None, raw["bad"].split(",")):
            self.statuses[status] += 1
        for kind in ("connect", "read", "write", "timeout"):
            if raw[kind]:
                self.statuses[f"wrk-{kind}-error"] += raw[kind]

    def summary(self) -> dict[str, Any]:
        r = self.raw
        elapsed = r["duration_us"] / 1e6
        return {
            "requests": sum(self.statuses.values()),
            "ok": r["ok"],
            "clips_per_s": round(r["ok"] / elapsed, 2) if elapsed > 0 else 0.0,
            **{f"p{q}_ms": round(r[f"p{q}_us"] / 1000, 2) if r["ok"] else None for q in (50, 90, 99)},
            "mean_ms": round(r["mean_us"] / 1000, 2) if r["ok"] else None,
            "errors": {k: v for k, v in sorted(self.statuses.items()) if k != "200"},
            "elapsed_s": round(elapsed, 3),
            "client": "wrk",
        }


async def closed_loop(url: str, payloads: list[Payload], concurrency: int, duration_s: float) -> WrkResult:
    """``concurrency`` connections posting back-to-back for ``duration_s`` (whole seconds, at least 1)."""
    parts = urlsplit(url)
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        for i, payload in enumerate(payloads, start=1):
            Path(tmp, f"body-{i}").write_bytes(payload.body)
            Path(tmp, f"type-{i}").write_text(payload.content_type)
        script = Path(tmp, "post.lua")
        script.write_text(SCRIPT % {"dir": tmp, "count": len(payloads), "path": parts.path or "/"})
        proc = await asyncio.create_subprocess_exec(
            "wrk",
            "--threads",
            "1",
            "--connections",
            str(concurrency),
            "--duration",
            f"{max(1, round(duration_s))}s",
            "--timeout",
            "120s",
            "--script",
            str(script),
            f"{parts.scheme}://{parts.netloc}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("WRK-RESULT "):
            return WrkResult(json.loads(line.removeprefix("WRK-RESULT ")))
    raise RuntimeError(f"wrk exited with {proc.returncode} and no result:\n{text[-2000:]}")
