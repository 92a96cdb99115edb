"""timm and torchvision encoders through the real command line and server: a run starts from exactly the
weights file it is given, trains frozen then fine-tuned, and the checkpoint loads offline, unpickled, folds
its batch norms, answers /predict and exports to ONNX. Runs where timm imports (make pytest-backbones)."""

from __future__ import annotations

import json
import pickle
import socket
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models import LSTMHeadConfig, ModelConfig, TimmConfig, build_model, load_checkpoint, read_metadata
from models.backbones import Backbone
from models.encoders import fold_batchnorm
from tests.support.media import encode, multipart_frames, synth_clip
from tests.support.servers import live_server
from training.cli import main as cli

pytestmark = pytest.mark.backbones


def library_model(source: str, name: str) -> torch.nn.Module:
    """The library's own model with its classifier, random weights: what a user's weights file holds."""
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    import torchvision.models

    return torchvision.models.get_model(name, weights=None).eval()


def write_weights(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def fit(data: Path, out: Path, *extra: str) -> dict[str, Any]:
    argv = ["fit", "--data", str(data), "--out", str(out), "--image-size", "32", "--frames", "4"]
    argv += ["--batch-size", "8", "--no-progress", *extra]
    assert cli(argv) == 0
    return read_metadata(out)


def features_of(model: torch.nn.Module, source: str, batch: torch.Tensor) -> torch.Tensor:
    """The library model's pooled features, its classifier skipped, on normalised frames."""
    with torch.no_grad():
        if source == "timm":
            return model.forward_head(model.forward_features(batch), pre_logits=True)  # type: ignore[operator]
        last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
        hooked: list[torch.Tensor] = []
        handle = model.get_submodule(last).register_forward_hook(lambda m, args, out: hooked.append(args[0]))
        model(batch)
        handle.remove()
        return hooked[0]


@pytest.mark.parametrize(("source", "name"), [("timm", "resnet18"), ("torchvision", "mobilenet_v3_small")])
def test_a_backbone_starts_from_its_file_trains_frozen_then_fine_tuned_and_serves(
    tiny_dataset: Path, tmp_path: Path, source: str, name: str
) -> None:
    own = library_model(source, name)
    weights = write_weights(own, tmp_path / "weights.safetensors")
    spec = f"{source}:{name}"

    # frozen the whole run: the encoder is exactly the file's, so its features are the library model's
    frozen = tmp_path / "frozen.safetensors"
    meta = fit(tiny_dataset, frozen, "--encoder", spec, "--pretrained", str(weights), "--epochs", "1",
               "--freeze-encoder", "1")  # fmt: skip
    assert meta["arch"]["encoder"] == {"name": source, "model": name, "grad_checkpointing": False}
    assert meta["training"]["pretrained"] == str(weights)
    ckpt = load_checkpoint(frozen)
    encoder = ckpt.model.encoder
    assert isinstance(encoder, Backbone)
    batch = torch.rand(3, 3, 32, 32)
    mean, std = torch.tensor(ckpt.input.mean).view(1, 3, 1, 1), torch.tensor(ckpt.input.std).view(1, 3, 1, 1)
    assert ckpt.input.mean != (0.5, 0.5, 0.5)  # the backbone's own normalisation (ImageNet's)
    with torch.no_grad():
        ours = ckpt.model.eval().forward_features(batch)  # normalises inside
    torch.testing.assert_close(ours, features_of(own, source, (batch - mean) / std), atol=1e-5, rtol=0)

    # frozen for one epoch, then fine-tuned for one at a tenth of the rate: the encoder moves
    tuned = tmp_path / "tuned.safetensors"
    log = tmp_path / "tuned.log.jsonl"
    meta = fit(tiny_dataset, tuned, "--encoder", spec, "--pretrained", str(weights), "--epochs", "2",
               "--freeze-encoder", "1", "--encoder-lr-mult", "0.1", "--patience", "5", "--log", str(log))  # fmt: skip
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    assert meta["training"]["encoder_frozen_epochs"] == 1
    last = load_file(str(tuned.with_suffix(".train-state.safetensors")))  # the model after the last epoch
    start = load_file(str(weights))
    after = {k.removeprefix("model.encoder.model."): v for k, v in last.items() if k.startswith("model.encoder.model.")}
    weights_moved = [
        k for k, v in start.items() if k.endswith(".weight") and k in after and not torch.equal(after[k], v)
    ]
    assert len(weights_moved) > 10  # fine-tuned in the second epoch

    # served: the server loads it, folds its batch norms and answers /predict
    clip = synth_clip("left", frames=4, seed=1)
    files = multipart_frames([encode(f) for f in clip], "jpeg")
    with live_server(checkpoint=tuned, max_batch_size=2) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/predict", files=files)
        info = client.get(f"/models/{tuned.stem}").json()
    assert r.status_code == 200, r.text
    assert r.json()["frames"] == 4 and r.json()["label"] in meta["labels"]
    assert info["encoder"]["name"] == spec and info["encoder"]["parameters"] > 100_000
    assert info["encoder"]["flops_per_frame"] > 0 and info["batchnorm_folded"] > 10


@pytest.mark.parametrize(("source", "name", "wrong"), [("timm", "resnet18", "resnet34"),
                                                     ("torchvision", "mobilenet_v3_small", "resnet18")])  # fmt: skip
def test_a_weights_file_of_another_model_fails_naming_its_keys(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, name: str, wrong: str
) -> None:
    weights = write_weights(library_model(source, wrong), tmp_path / f"{wrong}.safetensors")
    argv = ["fit", "--data", str(tiny_dataset), "--out", str(tmp_path / "m.safetensors"), "--image-size", "32",
            "--encoder", f"{source}:{name}", "--pretrained", str(weights), "--epochs", "1"]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert f"does not fit {source}:{name}" in err and ("missing keys" in err or "unexpected keys" in err)
    assert not (tmp_path / "m.safetensors").exists()


def test_a_backbone_checkpoint_loads_offline_without_unpickling(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "offline.safetensors"
    fit(tiny_dataset, out, "--encoder", "timm:resnet18", "--epochs", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint load reached for the network or for pickle")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ckpt = load_checkpoint(out)
    model = ckpt.model.eval()
    frames = torch.from_numpy(np.stack(synth_clip("up", frames=4, seed=2))).permute(0, 3, 1, 2)
    with torch.no_grad():
        before = model(frames, torch.tensor([4]))
        assert fold_batchnorm(model) == 20  # resnet18: every batch norm follows a convolution
        torch.testing.assert_close(model(frames, torch.tensor([4])), before, atol=1e-4, rtol=0)


def test_a_backbone_checkpoint_exports_to_onnx(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "export.safetensors"
    fit(tiny_dataset, out, "--encoder", "timm:resnet18", "--epochs", "1")
    onnx = tmp_path / "export.onnx"
    assert cli(["export", str(out), "--format", "onnx", "--out", str(onnx)]) == 0
    assert onnx.stat().st_size > 1_000_000


def test_cached_backbone_features_train_the_same_head_as_the_frozen_backbone(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    heads = []
    for flag in ("--no-cache-features", "--cache-features"):
        out = tmp_path / f"{flag}.safetensors"
        meta = fit(tiny_dataset, out, "--encoder", "timm:resnet18", "--epochs", "2", "--freeze-encoder", "2", flag)
        assert meta["training"]["features_cached"] is (flag == "--cache-features")
        state = load_file(str(out.with_suffix(".train-state.safetensors")))
        heads.append({k: v for k, v in state.items() if k.startswith("model.head.")})
    assert heads[0] and heads[0].keys() == heads[1].keys()
    for key, value in heads[0].items():
        torch.testing.assert_close(heads[1][key], value, atol=1e-4, rtol=0, msg=key)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dataset: Path, tmp_path: Path) -> None:
    """Recomputing activations in the backward pass changes memory, not the gradients. (Batch norms
    count the recomputed forward too, so their running statistics move twice a step.)"""
    meta = fit(tiny_dataset, tmp_path / "gc.safetensors", "--encoder", "timm:resnet18", "--epochs", "1",
               "--grad-checkpointing")  # fmt: skip
    assert meta["arch"]["encoder"]["grad_checkpointing"] is True
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = build_model(
            ModelConfig(8, TimmConfig(model="resnet18", grad_checkpointing=on), LSTMHeadConfig(hidden=16))
        )
        frames = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        model(frames, torch.tensor([3, 3])).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-4, rtol=1e-3, msg=name)
