"""The front end's link to the engine, in one process: an engine's service and clip port, and a front end's
``RemoteService`` on the same event loop, over a real Unix socket and a real arena.

With a device decoder in the engine (a stand-in that decodes on the CPU and counts its uploads: no CUDA
here), the front end sends the JPEG frames the device takes undecoded and decodes everything else
itself; answers equal the one-process path's either way.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import torch

from app.budget import MemoryBudget
from app.decoding import Decoders
from app.errors import BadInput
from app.frontends import arena
from app.frontends.link import EngineLink, RemoteModel, RemoteService
from app.frontends.port import ClipPort
from app.frontends.relay import RelayedMetrics
from app.gpu_decode import GpuJpeg
from app.loading import load
from app.metrics import Metrics
from app.preprocess import array_to_clip
from app.service import Service
from app.settings import Settings
from app.uploads import Target, Upload, image_frames
from tests.support.clips import images_clip, reference
from tests.support.media import encode, multipart_frames, synth_clip


class StandIn:
    """A device decoder that decodes on the CPU (as the CPU path does) and counts what it took."""

    def __init__(self) -> None:
        self.uploads = 0

    eligible = staticmethod(GpuJpeg.eligible)

    def decode(self, blobs: list[bytes], target: Target) -> torch.Tensor:
        self.uploads += 1
        return array_to_clip(image_frames(blobs, target))


def form(blobs: list[bytes], fmt: str = "jpeg") -> Upload:
    request = httpx.Request("POST", "http://x/predict", files=multipart_frames(blobs, fmt))
    return Upload("form", request.read(), request.headers["content-type"])


async def never() -> None:
    await asyncio.Event().wait()


def test_the_front_end_sends_device_jpegs_undecoded_and_decodes_the_rest(default_ckpt: Path, tmp_path: Path) -> None:
    settings = Settings(checkpoint=default_ckpt, max_batch_size=4, autotune=False)
    ref = reference(default_ckpt)
    clip = synth_clip("down", frames=10, seed=4)
    jpegs, pngs = [encode(f, "JPEG", quality=95) for f in clip], [encode(f, "PNG") for f in clip]
    stand_in = StandIn()

    async def scenario() -> None:
        metrics = Metrics()
        loaded = await asyncio.to_thread(load, settings, metrics)
        loaded.decoders.device = stand_in
        service = Service(settings, metrics, loaded, MemoryBudget(1 << 30))
        service.start()
        fd = arena.create(1 << 24)
        port = ClipPort(service, str(tmp_path / "clips.sock"), lambda index: arena.mapping(fd))
        await port.start()
        link, hello = await EngineLink.connect(str(tmp_path / "clips.sock"), 0, arena.mapping(fd))
        assert hello["device_jpeg"] is True
        models = {m["name"]: RemoteModel.of(m) for m in hello["models"]}
        relay = RelayedMetrics(0)
        relay.link = link
        remote = RemoteService(settings, relay, link, models, hello["default"], Decoders(1))
        try:
            served = remote.model(None)
            for blobs, fmt, device_uploads in ((jpegs, "jpeg", 1), (pngs, "png", 1)):
                answer = await remote.intake.classify(served, form(blobs, fmt), never)
                expected = ref.probs(images_clip(blobs, ref.target))
                np.testing.assert_allclose(answer.result.probabilities.numpy(), expected, atol=1e-5)
                assert stand_in.uploads == device_uploads  # the PNGs were decoded in the front end
            try:
                await remote.intake.classify(served, form([b"\xff\xd8\xff not a jpeg"]), never)
            except BadInput as exc:
                assert "frame 0" in str(exc)
            else:
                raise AssertionError("a corrupt JPEG must be refused")
            assert link.blocks.used == 0  # every block given back once answered
        finally:
            await link.close()
            await port.close()
            await service.close()

    asyncio.run(scenario())
