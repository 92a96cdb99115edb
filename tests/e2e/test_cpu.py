"""A CPU server as it starts by default: two instances sharing torch's threads, the wide lane, folded
batch norms and slices through the encoder, as /models/{name} reports them and a request uses them."""

from __future__ import annotations

from pathlib import Path

import httpx
import torch

from app.settings import PASS_PIXELS
from app.threads import STARTUP_THREADS
from models import load_checkpoint
from tests.support.media import encode, multipart_frames, synth_clip
from tests.support.servers import live_server


def test_a_default_cpu_server_runs_two_instances_when_torch_has_two_threads(default_ckpt: Path) -> None:
    ckpt = load_checkpoint(default_ckpt)
    expected = 2 if STARTUP_THREADS >= 2 else 1
    with live_server(checkpoint=default_ckpt, max_batch_size=2) as url:
        info = httpx.get(f"{url}/models/{ckpt.name}").json()
        jpegs = [encode(frame) for frame in synth_clip(frames=4)]
        answer = httpx.post(f"{url}/predict", files=multipart_frames(jpegs))  # a pass alone: on the lane
    assert answer.status_code == 200, answer.text
    assert info["batching"]["instances"] == expected
    # torch's threads as the process started; where there are two or more, passes alone take the wide lane
    assert info["batching"]["torch_threads"] == STARTUP_THREADS
    assert info["batching"]["wide_lane"] is (STARTUP_THREADS > 1)
    assert info["batching"]["max_batch_size"] == 2 and info["batching"]["share_from"] == 1  # half a batch
    # the served model's batch norms were folded into its convs (one per conv block of the bundled CNN)
    assert info["batchnorm_folded"] == sum(isinstance(m, torch.nn.BatchNorm2d) for m in ckpt.model.modules()) > 0
    # on the CPU the encoder takes a batch's frames in slices of ENCODER_PASS_PIXELS
    spec = ckpt.input
    assert info["frames_per_pass"] == PASS_PIXELS // (spec.height * spec.width)
    with live_server(
        checkpoint=default_ckpt, max_batch_size=2, instances=1, encoder_pass_pixels=0, wide_lane=False
    ) as url:
        info = httpx.get(f"{url}/models/{ckpt.name}").json()
    assert info["batching"]["instances"] == 1 and info["frames_per_pass"] is None
    assert info["batching"]["wide_lane"] is False
    with live_server(checkpoint=default_ckpt, max_batch_size=8, share_from=3) as url:  # set: it wins
        info = httpx.get(f"{url}/models/{ckpt.name}").json()
    assert info["batching"]["max_batch_size"] == 8 and info["batching"]["share_from"] == 3
