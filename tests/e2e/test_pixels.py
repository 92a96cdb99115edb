"""A model is served the pixels it was trained on: the same JPEG frames, PNG frames and MP4 read by the
training dataset and posted to a real server reach the model as identical uint8 tensors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.runtime import ModelRuntime
from models import load_checkpoint
from tests.support.media import multipart_frames, picture, write_frames, write_video
from tests.support.servers import live_server
from training.data import ClipDataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One clip of each kind, at sizes the model's 32x32 does not divide evenly: 16 JPEG frames of 130x100
    (decoded at a reduced scale, then resized), 12 PNG frames of 45x45, and a 200-frame MP4 at 4 fps that
    the dataset reaches by seeking and the server by decoding every frame."""
    root = tmp_path_factory.mktemp("pixels")
    # a val split of its own: without one, training holds out a seeded tenth of train, by path
    write_frames(root / "val" / "a" / "held", np.stack([picture(32, 32, seed=99)] * 2), "png")
    write_frames(root / "train" / "a" / "jpeg", np.stack([picture(100, 130, seed=i) for i in range(16)]), "jpg")
    write_frames(root / "train" / "a" / "png", np.stack([picture(45, 45, seed=i) for i in range(12)]), "png")
    frames = np.stack([np.clip(picture(48, 64, seed=i % 7) // 2 + i, 0, 255).astype(np.uint8) for i in range(200)])
    write_video(root / "train" / "b" / "clip.mp4", frames, fps=4)
    phone = root / "train" / "b" / "exif"  # stored sideways (EXIF orientation 6), bright at the top when upright
    phone.mkdir(parents=True)
    for i in range(8):
        upright = picture(64, 48, seed=i) // 2
        upright[:32] += 120
        image = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))
        exif = image.getexif()
        exif[0x0112] = 6
        image.save(phone / f"img_{i + 1}.jpg", quality=95, exif=exif)
    return root


@pytest.fixture(scope="module")
def served(default_ckpt: Path) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """A real server whose model records every batch of frames it is given."""
    seen: list[torch.Tensor] = []
    real = ModelRuntime.run

    def recording(self: ModelRuntime, frames: torch.Tensor, lengths: torch.Tensor):  # type: ignore[no-untyped-def]
        seen.append(frames.clone())
        return real(self, frames, lengths)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModelRuntime, "run", recording)
        with live_server(checkpoint=default_ckpt, max_batch_size=1) as url:
            yield url, seen


def posted(url: str, seen: list[torch.Tensor], files: list) -> torch.Tensor:  # type: ignore[type-arg]
    seen.clear()
    r = httpx.post(f"{url}/predict", files=files, timeout=60)
    assert r.status_code == 200, r.text
    [frames] = seen
    return frames


@pytest.mark.parametrize(
    ("clip", "kind"), [("a/jpeg", "jpeg"), ("a/png", "png"), ("b/clip.mp4", "video"), ("b/exif", "jpeg")]
)
def test_training_and_serving_decode_the_same_uint8_frames(
    dataset: Path, served: tuple[str, list[torch.Tensor]], default_ckpt: Path, clip: str, kind: str
) -> None:
    spec = load_checkpoint(default_ckpt).input
    ds = ClipDataset(dataset, "train", image_size=spec.height, frames=spec.frames, labels=["a", "b"], preload=False)
    index = [str(c.path.relative_to(dataset / "train")) for c in ds.clips].index(clip)
    trained = torch.from_numpy(ds.read(index))  # (T, C, H, W) uint8, as training batches it
    path = dataset / "train" / clip
    if kind == "video":
        files = [("video", ("clip.mp4", path.read_bytes(), "video/mp4"))]
    else:
        files = multipart_frames([f.read_bytes() for f in ds.clips[index].frames], kind)
    url, seen = served
    got = posted(url, seen, files)
    assert got.dtype == torch.uint8 and got.shape == trained.shape == (trained.shape[0], 3, spec.height, spec.width)
    assert torch.equal(got, trained)
    assert trained.shape[0] == {"a/jpeg": 16, "a/png": 12, "b/clip.mp4": spec.frames, "b/exif": 8}[clip]
    if clip == "b/exif":  # turned upright on both sides: the bright half on top
        top, bottom = trained[:, :, : spec.height // 2].float().mean(), trained[:, :, spec.height // 2 :].float().mean()
        assert top > bottom + 60, (top, bottom)
    assert len({f.numpy().tobytes() for f in trained}) == trained.shape[0]  # every frame differs: order shows


def test_the_recording_sees_what_the_model_answers(served: tuple[str, list[torch.Tensor]]) -> None:
    """The recorded tensors are the requests' own: two concurrent requests, two recorded clips."""
    url, seen = served
    seen.clear()

    async def both() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            bodies = [multipart_frames([_png(seed)] * n, "png") for seed, n in ((1, 3), (2, 5))]
            return [r.status_code for r in await asyncio.gather(*(client.post("/predict", files=b) for b in bodies))]

    assert asyncio.run(both()) == [200, 200]
    assert sorted(t.shape[0] for t in seen) == [3, 5]


def _png(seed: int) -> bytes:
    from tests.support.media import encode

    return encode(picture(40, 40, seed=seed), "PNG")
