"""Occlusion and attention pooling weights: one ragged batch gives what T separate forward passes give."""

from __future__ import annotations

import pytest
import torch

from models import AttentionHeadConfig, LSTMHeadConfig, MeanHeadConfig, ModelConfig, SmallCNNConfig, build_model
from models.explain import leave_one_out, occlusion

HEADS = {
    "lstm": LSTMHeadConfig(hidden=16),
    "attention": AttentionHeadConfig(dim=16, heads=2, layers=1),
    "attention-cls": AttentionHeadConfig(dim=16, heads=2, layers=1, pooling="cls"),
    "mean": MeanHeadConfig(),
}


def tiny(head: str) -> torch.nn.Module:
    model = build_model(ModelConfig(5, SmallCNNConfig(widths=(4, 8)), HEADS[head], image_size=16))
    return model.eval()


def test_leave_one_out_lists_the_clip_then_each_clip_without_one_frame() -> None:
    index, lengths = leave_one_out(3)
    assert index.tolist() == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert lengths.tolist() == [3, 2, 2, 2]
    index, lengths = leave_one_out(1)
    assert index.tolist() == [0] and lengths.tolist() == [1]


@pytest.mark.parametrize("head", sorted(HEADS))
def test_importance_is_the_probability_drop_of_each_frame_left_out(head: str) -> None:
    model = tiny(head)
    frames = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    explained = occlusion(model, frames)
    with torch.no_grad():
        full = model(frames, torch.tensor([6])).softmax(-1)[0]
        c = int(full.argmax())
        drops = [
            float(full[c] - model(frames[torch.arange(6) != i], torch.tensor([5])).softmax(-1)[0, c]) for i in range(6)
        ]
    torch.testing.assert_close(explained.probabilities, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(explained.importance, torch.tensor(drops), atol=1e-5, rtol=0)
    assert explained.importance.shape == (6,)


def test_attention_pooling_weights_are_the_heads_own() -> None:
    model = tiny("attention")
    frames = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    explained = occlusion(model, frames)
    assert explained.attention is not None and explained.attention.shape == (4,)
    assert float(explained.attention.sum()) == pytest.approx(1.0, abs=1e-5)
    head = model.head
    with torch.no_grad():
        feats = model.forward_features(frames)[None]  # (1, T, D)
        h, _ = head.hidden(feats, torch.tensor([4]))
        pooled = torch.einsum("bt,btd->bd", explained.attention[None], h)
        torch.testing.assert_close(head.fc(pooled).softmax(-1)[0], explained.probabilities, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["lstm", "mean", "attention-cls"])
def test_heads_without_pooling_weights_give_no_attention(head: str) -> None:
    assert occlusion(tiny(head), torch.zeros(3, 3, 16, 16, dtype=torch.uint8)).attention is None


def test_a_single_frame_counts_its_probability_above_chance() -> None:
    model = tiny("lstm")
    explained = occlusion(model, torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8))
    top = float(explained.probabilities.max())
    assert explained.importance.tolist() == pytest.approx([top - 1 / 5], abs=1e-6)
