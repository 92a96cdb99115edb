"""Distributed training: two gloo processes under torchrun on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from models import load_checkpoint
from training.synth import SynthConfig, write_dataset


def test_torchrun_two_processes_train_one_checkpoint(tmp_path: Path) -> None:
    data = tmp_path / "digits"
    write_dataset(data, SynthConfig(canvas=16, min_frames=3, max_frames=5, clips_per_label=4, seed=2))
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "training",
        "fit",
        "--data",
        str(data),
        "--model",
        "lstm",
        "--out",
        str(out),
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    proc = subprocess.run([*cmd, "--epochs", "2"], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ckpt = load_checkpoint(out)
    meta = ckpt.metadata
    assert meta["training"]["world_size"] == 2
    test = meta["metrics"]["test"]
    # 8 test clips, sharded 4 + 4 over the two ranks and gathered back: every clip counted once.
    assert test["clips"] == 8 and test["clips_per_rank"] == [4, 4]
    assert meta["metrics"]["val"]["clips_per_rank"] == [4, 4]
    # Rank 0 alone logs: one line per epoch, not two.
    lines = out.with_suffix(".log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    # Both ranks trained on their shard: the epoch's clip count is the whole train split (8 labels x 4 clips).
    assert json.loads(lines[0])["train_clips"] == 32

    # Resume under DDP continues the same run.
    state = out.with_suffix(".train-state.safetensors")
    proc = subprocess.run(
        [*cmd, "--epochs", "3", "--resume", str(state)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["epoch"] for line in out.with_suffix(".log.jsonl").read_text().splitlines()] == [1, 2, 3]
