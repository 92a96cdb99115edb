"""Decoding through a real server: in decode processes (one killed, Ctrl-C to the process group),
and a large clip split over two decode threads."""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.clips import check_answer, images_clip, reference, video_clip
from tests.support.media import encode, multipart_frames, picture, synth_clip, write_mp4
from tests.support.servers import live_server, metric_value, spawn_server


@pytest.fixture(scope="module")
def ref(default_ckpt: Path):  # type: ignore[no-untyped-def]
    return reference(default_ckpt)


def decode_process_pids(server_pid: int) -> list[int]:
    """The server's spawned pool processes (not its resource tracker), from /proc."""
    children: list[int] = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    return [p for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_server_decodes_in_processes_and_survives_a_killed_one(default_ckpt: Path, ref) -> None:  # type: ignore[no-untyped-def]
    ckpt, target, probs_of = ref.ckpt, ref.target, ref.probs
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
        check_answer(r.json(), probs_of(images_clip(blobs, target)), ckpt.labels, 12)
        video = write_mp4(synth_clip("clockwise", frames=24, seed=4, size=64))
        r = httpx.post(f"{url}/predict", files={"video": ("clip.mp4", video, "video/mp4")}, timeout=30)
        assert r.status_code == 200, r.text
        check_answer(r.json(), probs_of(video_clip(video, target)), ckpt.labels, target.clip_frames)
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
    # reset (ReadError)
    not_let_in = {"ConnectError", "RemoteProtocolError", "ReadError"}
    assert set(outcomes) <= {"200", "503 not_ready", *not_let_in}, outcomes
    assert "decode process died" not in log and "Traceback" not in log, log[-3000:]


def test_the_server_answers_a_224_clip_the_same_split_or_not(default_ckpt: Path) -> None:
    frames_224 = [encode(picture(224, 224, seed=i), quality=90) for i in range(16)]
    answers = []
    for split_kb in (16.0, 0.0):  # the clip is about 440 KB: split, then on one thread
        with live_server(checkpoint=default_ckpt, decode_split_kb=split_kb) as url:
            r = httpx.post(f"{url}/predict", files=multipart_frames(frames_224), params={"top_k": 8}, timeout=60)
            assert r.status_code == 200, r.text
            answers.append(r.json()["probabilities"])
    assert answers[0] == answers[1]
