"""Closed-loop load from ``wrk`` (C, from Debian's ``wrk`` package) when it is installed.

On a 2-core machine the load generator shares the cores with the server; the Python
client spends about 3 to 5 ms of CPU per request, ``wrk`` a small fraction of that, so
the server keeps more of the machine. ``wrk`` keeps ``concurrency`` connections with one
request outstanding on each (the same closed loop as ``loadgen.closed_loop``) and sends
the prebuilt requests (each payload's path, headers and body) round-robin through a Lua
script. Its latency percentiles are over all responses; non-200 answers are counted as
errors by status.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.loadgen import Payload

# Each request is read from two files: ``head-<i>`` (the request line's method and path, then one
# header a line) and ``body-<i>``; it is formatted once per thread, in init, once wrk has set Host.
SCRIPT = """
local dir, n = "%(dir)s", %(count)d
local requests = {}
local next_body = 0
ok, statuses = 0, ""
function init(args)
  for i = 1, n do
    local f = assert(io.open(dir .. "/body-" .. i, "rb")); local body = f:read("*a"); f:close()
    local g = assert(io.open(dir .. "/head-" .. i, "rb")); local head = g:read("*a"); g:close()
    local method, path, headers = nil, nil, {}
    for line in head:gmatch("[^\\n]+") do
      if method == nil then
        method, path = line:match("^(%%S+) (%%S+)$")
      else
        local key, value = line:match("^([^:]+): (.*)$")
        headers[key] = value
      end
    end
    requests[i] = wrk.format(method, path, headers, body)
  end
  next_body = tonumber(args[1] or "0") %% n
end
function request()
  next_body = next_body %% n + 1
  return requests[next_body]
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


def request_head(payload: Payload) -> str:
    """``payload``'s method and path, then its headers, one a line, as the Lua script reads them."""
    lines = [f"POST {payload.path}", *(f"{k}: {v}" for k, v in payload.request_headers.items())]
    return "\n".join(lines) + "\n"


def threads_for(concurrency: int, cpus: int | None = None) -> int:
    """wrk's threads: one on a small machine, where the client shares the server's cores; one per 8
    cores on a larger one, so that one client thread never caps the rate (never more than connections)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(concurrency, cpus // 8))


def available() -> bool:
    return shutil.which("wrk") is not None


class WrkResult:
    """What ``wrk`` reported for one level, shaped like ``loadgen.LevelResult``."""

    late = 0
    dropped = 0

    def __init__(self, raw: dict[str, Any], threads: int = 1) -> None:
        self.raw, self.threads = raw, threads
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
            "wrk_threads": self.threads,
        }


async def closed_loop(url: str, payloads: list[Payload], concurrency: int, duration_s: float) -> WrkResult:
    """``concurrency`` connections to the server at ``url`` (its scheme, host and port; each payload
    names its path) posting back-to-back for ``duration_s`` (whole seconds, at least 1)."""
    parts = urlsplit(url)
    threads = threads_for(concurrency)
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        for i, payload in enumerate(payloads, start=1):
            Path(tmp, f"body-{i}").write_bytes(payload.body)
            Path(tmp, f"head-{i}").write_text(request_head(payload))
        script = Path(tmp, "post.lua")
        script.write_text(SCRIPT % {"dir": tmp, "count": len(payloads)})
        proc = await asyncio.create_subprocess_exec(
            "wrk",
            "--threads",
            str(threads),
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
            return WrkResult(json.loads(line.removeprefix("WRK-RESULT ")), threads)
    raise RuntimeError(f"wrk exited with {proc.returncode} and no result:\n{text[-2000:]}")
