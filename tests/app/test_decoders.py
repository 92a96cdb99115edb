"""DECODE_PROCESSES: /predict's decoding in spawned worker processes, and what happens when one dies."""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app.decode import InputLimits, image_frames
from app.decoders import ProcessDecoders
from app.errors import ApiError
from app.preprocess import decode_images, decode_video
from tests.app.conftest import encode, metric_value, multipart_frames, spawn_server, synth_clip, write_mp4
from tests.app.decode_jobs import crash_always, crash_once, raise_bad_input, slow_frames
from tests.app.test_predict import check_answer, reference  # noqa: F401 - the fixture

LIMITS = InputLimits(32, 32, 3, 8, 64, 4096 * 4096)


class Outcomes:
    """Collects ``done`` callbacks from the pool's thread."""

    def __init__(self, count: int) -> None:
        self.items: list[tuple[np.ndarray | None, BaseException | None]] = []
        self._lock, self._all = threading.Lock(), threading.Event()
        self.count = count

    def __call__(self, array: np.ndarray | None, exc: BaseException | None) -> None:
        with self._lock:
            self.items.append((array, exc))
            if len(self.items) == self.count:
                self._all.set()

    def wait(self) -> list[tuple[np.ndarray | None, BaseException | None]]:
        assert self._all.wait(60), f"only {len(self.items)} of {self.count} answered"
        return self.items


@pytest.fixture(scope="module")
def decoders():  # type: ignore[no-untyped-def]
    pool = ProcessDecoders(2)
    assert len(pool.start()) == 2
    yield pool
    pool.shutdown()


def test_a_process_that_dies_mid_job_is_replaced_and_the_jobs_it_held_decoded_again(
    decoders: ProcessDecoders, tmp_path: Path
) -> None:
    blobs = [encode(f) for f in synth_clip("left", frames=6, seed=5)]
    expected = decode_images(blobs, LIMITS)
    restarts = decoders.restarts
    done = Outcomes(3)
    decoders.submit(done, slow_frames, 1.0, blobs, LIMITS)  # running in the other process when one dies
    decoders.submit(done, crash_once, str(tmp_path / "crashed"), blobs, LIMITS)
    decoders.submit(done, image_frames, blobs, LIMITS)  # waiting in the pool
    for array, exc in done.wait():
        assert exc is None, exc
        assert array is not None and array.shape == (6, 32, 32, 3)
        assert torch.equal(torch.from_numpy(array).permute(0, 3, 1, 2), expected)
    assert decoders.restarts == restarts + 1
    assert (tmp_path / "crashed").exists()


def test_a_job_that_kills_every_process_gets_503_alone_and_the_pool_goes_on(decoders: ProcessDecoders) -> None:
    blobs = [encode(f) for f in synth_clip("up", frames=4, seed=6)]
    restarts = decoders.restarts
    done = Outcomes(2)
    decoders.submit(done, slow_frames, 1.0, blobs, LIMITS)  # caught in both breaks, then decoded alone
    decoders.submit(done, crash_always, blobs, LIMITS)
    results = done.wait()
    [(array, _)] = [r for r in results if r[1] is None]
    assert array is not None and array.shape == (4, 32, 32, 3)
    [exc] = [e for _, e in results if e is not None]
    assert isinstance(exc, ApiError)
    assert exc.status == 503 and exc.code == "decoder_failed" and exc.headers == {"Retry-After": "1"}
    assert decoders.restarts == restarts + 2  # the shared pool broke twice; the third try ran alone
    after = Outcomes(2)
    decoders.submit(after, image_frames, blobs, LIMITS)
    decoders.submit(after, raise_bad_input, blobs, LIMITS)  # a decode error crosses back as itself
    results = after.wait()
    assert any(a is not None and a.shape == (4, 32, 32, 3) for a, _ in results)
    [err] = [e for _, e in results if e is not None]
    assert isinstance(err, ApiError) and (err.status, err.code) == (400, "bad_input") and "planted" in err.message


def decode_process_pids(server_pid: int) -> list[int]:
    """The server's spawned pool processes (not its resource tracker), from /proc."""
    children: list[int] = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    return [p for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_server_decodes_in_processes_and_survives_a_killed_one(default_ckpt: Path, reference) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    ckpt, limits, probs_of = reference
    with spawn_server("--checkpoint", str(default_ckpt), "--decode-processes", "2") as (proc, url):
        pids = decode_process_pids(proc.pid)
        assert len(pids) == 2, pids
        # the decoders import no torch: a decode process stays small
        assert not any("libtorch" in Path(f"/proc/{p}/maps").read_text() for p in pids)
        assert "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        clip = synth_clip("left", frames=12, seed=1)
        blobs = [encode(f, "JPEG", quality=95) for f in clip]
        r = httpx.post(f"{url}/predict", files=multipart_frames(blobs), timeout=30)
        assert r.status_code == 200, r.text
        check_answer(r.json(), probs_of(decode_images(blobs, limits)), ckpt.labels, 12)
        video = write_mp4(synth_clip("clockwise", frames=24, seed=4, size=64))
        r = httpx.post(f"{url}/predict", files={"video": ("clip.mp4", video, "video/mp4")}, timeout=30)
        assert r.status_code == 200, r.text
        check_answer(r.json(), probs_of(decode_video(video, limits)), ckpt.labels, limits.frames)
        payload = {"frames": [base64.b64encode(b).decode() for b in blobs[:5]]}
        r = httpx.post(f"{url}/predict", json=payload, timeout=30)
        assert r.status_code == 200 and r.json()["frames"] == 5, r.text
        # a decode error raised in a process answers as it would on a thread
        r = httpx.post(f"{url}/predict", files=multipart_frames([blobs[0], b"not an image"]), timeout=30)
        assert r.status_code == 400 and "frame 1 is not a decodable image" in r.json()["error"]["message"], r.text

        killed = pids[0]
        os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)

        def post(i: int) -> httpx.Response:
            return httpx.post(f"{url}/predict", files=multipart_frames(blobs), timeout=60)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(16)))
        assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers if a.status_code != 200]
        metrics = httpx.get(f"{url}/metrics").text
        assert metric_value(metrics, "fusionserve_decoder_restarts") == 1
        deadline = time.monotonic() + 10  # the broken pool's other process is stopped, not left behind
        while len(pids := decode_process_pids(proc.pid)) != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pids) == 2 and killed not in pids, pids
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    deadline = time.monotonic() + 10  # the decode processes stop with the server
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)


def test_decode_processes_default_to_half_the_cores_on_cuda_only(
    default_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.metrics import Metrics
    from app.settings import Settings
    from app.state import Service

    def service(**settings: object) -> Service:
        return Service(Settings(checkpoint=default_ckpt, **settings), Metrics())

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device object: no GPU is touched
    for cores, on_cuda in ((16, 8), (64, 8), (6, 3), (2, 0), (1, 0)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        assert service().decode_processes(cuda) == on_cuda
        assert service().decode_processes(cpu) == 0
    assert service(decode_processes=0).decode_processes(cuda) == 0  # set explicitly: wins both ways
    assert service(decode_processes=3).decode_processes(cpu) == 3


def test_a_job_after_shutdown_is_refused_as_not_ready() -> None:
    pool = ProcessDecoders(1)
    pool.start()
    pool.shutdown()
    with pytest.raises(ApiError) as refused:
        pool.submit(Outcomes(1), image_frames, [b""], LIMITS)
    assert (refused.value.status, refused.value.code) == (503, "not_ready")


def test_ctrl_c_to_the_process_group_answers_accepted_requests_and_spares_the_decoders(
    default_ckpt: Path,
) -> None:
    # a terminal's Ctrl-C reaches the server and its decode processes at once
    flags = ("--checkpoint", str(default_ckpt), "--decode-processes", "2", "--max-batch-size", "1")
    blobs = [encode(f) for f in synth_clip("left", frames=16, seed=7)]
    with spawn_server(*flags, new_session=True) as (proc, url):
        first = threading.Event()

        def post(i: int) -> str:
            try:
                r = httpx.post(f"{url}/predict", files=multipart_frames(blobs), timeout=60)
            except httpx.TransportError as exc:  # not accepted: the listener had closed
                return type(exc).__name__
            first.set()
            return "200" if r.status_code == 200 else f"{r.status_code} {r.json()['error']['code']}"

        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(post, i) for i in range(64)]
            assert first.wait(60)
            os.killpg(proc.pid, signal.SIGINT)
            outcomes = [a.result() for a in answers]
        assert proc.wait(timeout=60) == 130
        log = proc.stdout.read() if proc.stdout else ""
    assert outcomes.count("200") >= 1
    # each request was answered, refused as new work while stopping (503 not_ready), or not let in: the
    # listener had closed (ConnectError), or uvicorn closed a connection whose request it had not read yet,
    # with a FIN (RemoteProtocolError) or, when the request's bytes were still unread in the socket, a
    # reset (ReadError; seen once in a full suite run, 2026-12-01)
    not_let_in = {"ConnectError", "RemoteProtocolError", "ReadError"}
    assert set(outcomes) <= {"200", "503 not_ready", *not_let_in}, outcomes
    assert "decode process died" not in log and "Traceback" not in log, log[-3000:]
