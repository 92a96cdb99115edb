"""FRONTENDS=2: an engine process and two front ends behind one port, through real sockets.

Batches take clips from both front ends; SIGTERM answers every accepted request; a killed front end
is replaced and loses only its own requests; Ctrl-C stops the whole group cleanly. The other e2e
modules (predict, kserve, errors, streams, timeline, explain) run their tests against two front ends
too (``tests.support.servers.SERVER_KINDS``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np

from tests.support.clips import images_clip, reference
from tests.support.media import encode, multipart_frames, synth_clip
from tests.support.servers import children, frontends_server, metric_value, spawn_server

TAG = "fusionserve-frontend"
MODEL = "moving-digits-lstm"


def frames(n: int = 8, seed: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    return multipart_frames([encode(f) for f in synth_clip("left", frames=n, seed=seed)])


async def on_both(url: str, want: int = 8, tries: int = 40) -> list[tuple[httpx.AsyncClient, str]]:
    """``want`` clients, each on a connection of its own, at least one on each front end: (client, its pid)."""
    found: list[tuple[httpx.AsyncClient, str]] = []
    for _ in range(tries):
        client = httpx.AsyncClient(base_url=url, timeout=60)
        pid = (await client.get("/v2/health/live")).headers[TAG]
        found.append((client, pid))
        pids = {p for _, p in found}
        if len(found) >= want and len(pids) == 2:
            break
    assert len({p for _, p in found}) == 2, "every connection went to the same front end"
    return found


def test_one_batch_takes_clips_from_both_front_ends(default_ckpt: Path) -> None:
    settings = {"checkpoint": default_ckpt, "max_batch_size": 64, "max_batch_delay_ms": 1500}
    with frontends_server(2, **settings) as url:

        async def main() -> tuple[list[httpx.Response], set[str]]:
            clients = await on_both(url)
            try:
                replies = await asyncio.gather(
                    *(c.post("/predict", files=frames(seed=i)) for i, (c, _) in enumerate(clients))
                )
                return list(replies), {pid for _, pid in clients}
            finally:
                await asyncio.gather(*(c.aclose() for c, _ in clients))

        replies, pids = asyncio.run(main())
        assert [r.status_code for r in replies] == [200] * len(replies)
        assert {r.headers[TAG] for r in replies} == pids
        text = httpx.get(f"{url}/metrics").text
        # the delay holds the first batch open until every clip is in: one batch, from both processes
        assert metric_value(text, "fusionserve_batch_size_count", model=MODEL) == 1
        assert metric_value(text, "fusionserve_batch_size_sum", model=MODEL) == len(replies)
        served = [metric_value(text, "fusionserve_frontend_requests_total", frontend=str(i)) for i in (0, 1)]
        assert min(served) >= 1 and sum(served) >= len(replies)
        assert metric_value(text, "fusionserve_requests_total", route="/predict", status="200") == len(replies)


def test_answers_equal_one_process_and_a_full_arena_still_answers(default_ckpt: Path) -> None:
    ref = reference(default_ckpt)
    blobs = [encode(f, "JPEG", quality=95) for f in synth_clip("up", frames=12, seed=3)]
    expected = ref.probs(images_clip(blobs, ref.target))
    # 0.05 MB of shared memory holds no 12-frame clip: every clip travels in its message instead
    for shm_mb in (256, 0.05):
        with frontends_server(2, checkpoint=default_ckpt, frontend_shm_mb=shm_mb, max_batch_size=8) as url:
            r = httpx.post(f"{url}/predict", files=multipart_frames(blobs), timeout=30)
            assert r.status_code == 200, r.text
            got = np.array([r.json()["probabilities"][label] for label in ref.ckpt.labels])
            np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sigterm_answers_every_accepted_request(slow_checkpoint: Path) -> None:
    flags = ("--checkpoint", str(slow_checkpoint), "--max-batch-size", "1", "--drain-s", "0.5", "--frontends", "2")
    with spawn_server(*flags) as (proc, url):
        fronts = children(proc.pid)
        assert len(fronts) == 2

        async def main() -> list[httpx.Response]:
            clients = await on_both(url, want=12)
            try:
                tasks = [asyncio.ensure_future(c.post("/predict", files=frames())) for c, _ in clients]
                async with httpx.AsyncClient(timeout=10) as watch:
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:  # every clip queued or run: all accepted
                        text = (await watch.get(f"{url}/metrics")).text
                        taken = metric_value(text, "fusionserve_batch_size_sum") + metric_value(
                            text, "fusionserve_queue_depth"
                        )
                        if taken >= len(tasks):
                            break
                        await asyncio.sleep(0.02)
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.sleep(0.1)
                    assert (await watch.get(f"{url}/v2/health/ready")).status_code == 503
                    late = await watch.post(f"{url}/predict", files=frames())
                    assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
                return list(await asyncio.gather(*tasks))
            finally:
                await asyncio.gather(*(c.aclose() for c, _ in clients))

        responses = asyncio.run(main())
        assert [r.status_code for r in responses] == [200] * len(responses)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in log
        assert not any(os.path.exists(f"/proc/{pid}") for pid in fronts)


def test_a_killed_front_end_is_replaced_and_loses_only_its_requests(default_ckpt: Path) -> None:
    flags = ("--checkpoint", str(default_ckpt), "--max-batch-size", "64", "--max-batch-delay-ms", "1500")
    with spawn_server(*flags, "--frontends", "2") as (proc, url):

        async def main() -> tuple[list[object], list[str]]:
            clients = await on_both(url)
            try:
                tasks = [asyncio.ensure_future(c.post("/predict", files=frames())) for c, _ in clients]
                await asyncio.sleep(0.5)  # every request in the engine's queue, held open by the delay
                victim = clients[0][1]
                os.kill(int(victim), signal.SIGKILL)
                results = await asyncio.gather(*tasks, return_exceptions=True)
                return list(results), [pid for _, pid in clients]
            finally:
                await asyncio.gather(*(c.aclose() for c, _ in clients))

        results, pids = asyncio.run(main())
        victim = pids[0]
        for result, pid in zip(results, pids, strict=True):
            if pid == victim:
                assert isinstance(result, httpx.TransportError), result  # its connection died with it
            else:
                assert isinstance(result, httpx.Response) and result.status_code == 200, result
        deadline = time.monotonic() + 60
        while len(children(proc.pid)) < 2 or int(victim) in children(proc.pid):
            assert time.monotonic() < deadline, "no front end replaced the killed one"
            time.sleep(0.1)
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert metric_value(text, "fusionserve_frontend_restarts") == 1
        lost = pids.count(victim)
        assert (
            metric_value(text, "fusionserve_dropped_clips_total", reason="cancelled", model=MODEL) == lost
        )  # never computed
        assert metric_value(text, "fusionserve_batch_size_sum", model=MODEL) == len(pids) - lost
        deadline = time.monotonic() + 60
        while True:  # the new front end answers too (its first connections may still go to the old socket queue)
            replies = [httpx.post(f"{url}/predict", files=frames(), timeout=30) for _ in range(4)]
            assert all(r.status_code == 200 for r in replies)
            if any(r.headers[TAG] not in pids for r in replies) or time.monotonic() > deadline:
                break
        assert any(r.headers[TAG] not in pids for r in replies)


def test_ctrl_c_stops_the_engine_and_its_front_ends(default_ckpt: Path) -> None:
    flags = ("--checkpoint", str(default_ckpt), "--max-batch-size", "4", "--frontends", "2")
    with spawn_server(*flags, new_session=True) as (proc, url):
        fronts = children(proc.pid)
        assert httpx.post(f"{url}/predict", files=frames(), timeout=30).status_code == 200
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C reaches the whole group
        assert proc.wait(timeout=60) == 130
        log = proc.stdout.read() if proc.stdout else ""
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert not any(os.path.exists(f"/proc/{pid}") for pid in fronts)


def test_a_client_that_leaves_is_dropped_before_compute(default_ckpt: Path) -> None:
    with frontends_server(2, checkpoint=default_ckpt, max_batch_size=64, max_batch_delay_ms=1500) as url:

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as patient:
                kept = [asyncio.ensure_future(patient.post(f"{url}/predict", files=frames(seed=i))) for i in range(2)]
                async with httpx.AsyncClient(timeout=0.4) as impatient:  # gone while the delay holds the batch
                    gone = [impatient.post(f"{url}/predict", files=frames(seed=9)) for _ in range(6)]
                    outcomes = await asyncio.gather(*gone, return_exceptions=True)
                assert all(isinstance(o, httpx.TimeoutException) for o in outcomes), outcomes
                return list(await asyncio.gather(*kept))

        assert [r.status_code for r in asyncio.run(main())] == [200, 200]
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert metric_value(text, "fusionserve_dropped_clips_total", reason="cancelled", model=MODEL) == 6
        assert metric_value(text, "fusionserve_batch_size_sum", model=MODEL) == 2  # only the kept clips ran


def test_front_ends_stop_when_their_engine_is_killed(default_ckpt: Path) -> None:
    with spawn_server("--checkpoint", str(default_ckpt), "--max-batch-size", "4", "--frontends", "2") as (proc, url):
        fronts = children(proc.pid)
        assert httpx.get(f"{url}/v2/health/live", timeout=10).headers[TAG] in map(str, fronts)
        proc.kill()  # SIGKILL: the engine cannot stop them
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in fronts):
            assert time.monotonic() < deadline, "front ends outlived their engine"
            time.sleep(0.1)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
