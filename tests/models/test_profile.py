from __future__ import annotations

from models import LSTMHeadConfig, MeanHeadConfig, ModelConfig, SmallCNNConfig, build_model, profile_config


def test_parameters_are_counted_exactly() -> None:
    cfg = ModelConfig(4, SmallCNNConfig(widths=(8,)), MeanHeadConfig(), image_size=8)
    # conv 3x3x3x8 (no bias) + BN 2x8 + linear 8x4 + 4
    assert profile_config(cfg, frames=2).parameters == 3 * 3 * 3 * 8 + 2 * 8 + 8 * 4 + 4


def test_flops_scale_with_frames_and_include_the_lstm() -> None:
    enc = SmallCNNConfig(widths=(8, 16))
    mean = ModelConfig(4, enc, MeanHeadConfig(), image_size=16)
    lstm = ModelConfig(4, enc, LSTMHeadConfig(hidden=32), image_size=16)
    m8, m16 = profile_config(mean, frames=8).flops_per_clip, profile_config(mean, frames=16).flops_per_clip
    assert m16 == 2 * m8 - 2 * 16 * 4  # the encoder cost doubles; the final linear layer runs once
    extra = profile_config(lstm, frames=8).flops_per_clip - m8
    # 8 steps x 4 gates x (16 in + 32 hidden) x 32 MACs, plus a linear of 32 -> 4 instead of 16 -> 4.
    assert extra == 8 * 2 * 4 * 32 * (16 + 32) + 2 * 32 * 4 - 2 * 16 * 4
    assert build_model(lstm).head.extra_flops(8) == 8 * 2 * 4 * 32 * (16 + 32)
