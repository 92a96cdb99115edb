"""Every registered encoder/head combination: shapes, gradients, ragged batching, streaming."""

from __future__ import annotations

import pytest
import torch

from models import (
    ENCODERS,
    HEADS,
    AttentionHeadConfig,
    LSTMHeadConfig,
    MeanHeadConfig,
    ModelConfig,
    ResNetConfig,
    SmallCNNConfig,
    build_model,
    preset_config,
    preset_names,
)
from models.encoders import SmallCNN, conv_bn_relu, fold_batchnorm
from models.registry import Registry

SMALL = SmallCNNConfig(widths=(8, 16))
CONFIGS = {
    "mean": ModelConfig(5, SMALL, MeanHeadConfig(), image_size=16),
    "lstm": ModelConfig(5, SMALL, LSTMHeadConfig(hidden=12), image_size=16),
    "lstm-bi-2layer": ModelConfig(5, SMALL, LSTMHeadConfig(hidden=12, layers=2, bidirectional=True), image_size=16),
    "attention": ModelConfig(5, SMALL, AttentionHeadConfig(dim=16, heads=2, dropout=0.0), image_size=16),
    "attention-cls": ModelConfig(5, SMALL, AttentionHeadConfig(dim=16, heads=2, pooling="cls"), image_size=16),
    "attention-causal-window": ModelConfig(
        5, SMALL, AttentionHeadConfig(dim=16, heads=2, causal=True, window=3), image_size=16
    ),
    "attention-causal-mean": ModelConfig(
        5, SMALL, AttentionHeadConfig(dim=16, heads=2, causal=True, pooling="mean"), image_size=16
    ),
    "resnet-lstm": ModelConfig(
        5, ResNetConfig(widths=(8, 16), blocks_per_stage=1), LSTMHeadConfig(hidden=8), image_size=16
    ),
    "resnet-attention-1ch": ModelConfig(
        5,
        ResNetConfig(widths=(8, 16), blocks_per_stage=2),
        AttentionHeadConfig(dim=16, heads=4),
        in_channels=1,
        mean=(0.5,),
        std=(0.5,),
        image_size=16,
    ),
}
CAUSAL = ["mean", "lstm", "attention-causal-window", "attention-causal-mean"]


def clip_batch(cfg: ModelConfig, lengths: list[int], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    shape = (sum(lengths), cfg.in_channels, cfg.image_size, cfg.image_size)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    return torch.rand(shape)


def test_every_registered_encoder_and_head_is_covered() -> None:
    backbones = {"timm", "torchvision"}  # built from their libraries: tests/backbones
    assert {c.encoder.name for c in CONFIGS.values()} | backbones == set(ENCODERS.names())
    assert {c.head.name for c in CONFIGS.values()} == set(HEADS.names())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_shapes_finite_and_gradients_reach_input(name: str) -> None:
    cfg = CONFIGS[name]
    model = build_model(cfg).train()
    lengths = [3, 1, 5]
    frames = clip_batch(cfg, lengths, torch.float32).requires_grad_(True)
    logits = model(frames, torch.tensor(lengths))
    assert logits.shape == (3, cfg.num_classes)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert frames.grad is not None
    # Every clip's frames receive gradient: no clip was dropped or replaced by padding.
    for grad in frames.grad.split(lengths):
        assert grad.abs().sum() > 0
    for pname, p in model.named_parameters():
        if p.requires_grad and "cls" not in pname:
            assert p.grad is not None, f"no gradient for {pname}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_clip_logits_do_not_change_with_longer_batchmates(name: str) -> None:
    cfg = CONFIGS[name]
    model = build_model(cfg).eval()
    lengths = [2, 7, 4, 9]
    frames = clip_batch(cfg, lengths)
    with torch.no_grad():
        batched = model(frames, torch.tensor(lengths))
        alone = torch.cat([model(f, torch.tensor([len(f)])) for f in frames.split(lengths)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_equal_length_fast_path_matches_the_ragged_path(name: str) -> None:
    cfg = CONFIGS[name]
    model = build_model(cfg).eval()
    lengths = torch.tensor([6, 6, 6])
    frames = clip_batch(cfg, lengths.tolist())
    with torch.no_grad():
        fast = model(frames, lengths)  # equal lengths: forward_uniform, no padding or packing
        ragged = model.forward_head(model.forward_features(frames), lengths)
        assert torch.equal(fast, model.forward_uniform(frames, 3))
    torch.testing.assert_close(fast, ragged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padded_clips_match_ragged_frames(name: str) -> None:
    cfg = CONFIGS[name]
    model = build_model(cfg).eval()
    lengths = torch.tensor([3, 5])
    clips = torch.randint(0, 256, (2, 5, cfg.in_channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    clips[0, 3:] = 255  # padding content must not matter
    with torch.no_grad():
        padded = model.forward_clips(clips, lengths)
        ragged = model(torch.cat([clips[0, :3], clips[1]]), lengths)
    torch.testing.assert_close(padded, ragged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", CAUSAL)
def test_streaming_step_by_step_equals_whole_clip(name: str) -> None:
    cfg = CONFIGS[name]
    model = build_model(cfg).eval()
    assert model.causal
    T = 6
    frames = clip_batch(cfg, [T, T])  # two clips stepped in lockstep
    clips = frames.view(2, T, *frames.shape[1:])
    state = model.init_state(2)
    with torch.no_grad():
        for t in range(T):
            stepped, state = model.step(clips[:, t], state)
            whole = model.forward_clips(clips[:, : t + 1])
            torch.testing.assert_close(stepped, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CAUSAL)
def test_states_of_clips_at_different_frames_stack_into_one_step(name: str) -> None:
    """A server steps many streams at once, each at its own frame: stacking their states (by group) and
    stepping them together gives each clip the logits of stepping it alone."""
    cfg = CONFIGS[name]
    model = build_model(cfg).eval()
    head = model.head
    lengths = [7, 2, 5]  # each clip is stepped this many frames before the joint step
    frames = clip_batch(cfg, [8, 8, 8]).view(3, 8, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        feats = model.forward_features(frames.flatten(0, 1)).view(3, 8, -1)
        states = []
        for clip, n in enumerate(lengths):
            state = head.init_state(1)
            for t in range(n):
                _, state = head.step(feats[clip, t][None], state)
            states.append(state)
        groups: dict[object, list[int]] = {}
        for clip, state in enumerate(states):
            groups.setdefault(head.state_group(state), []).append(clip)
        for members in groups.values():
            stacked = head.stack_states([states[i] for i in members])
            joint, after = head.step(torch.stack([feats[i, lengths[i]] for i in members]), stacked)
            for row, (i, state) in enumerate(zip(members, head.unstack_state(after), strict=True)):
                alone, alone_state = head.step(feats[i, lengths[i]][None], states[i])
                torch.testing.assert_close(joint[row], alone[0], atol=1e-5, rtol=1e-5)
                whole = model.forward_clips(frames[i : i + 1, : lengths[i] + 1])
                torch.testing.assert_close(joint[row], whole[0], atol=1e-5, rtol=1e-5)
                # the split state steps on as the clip's own
                nxt, _ = head.step(feats[i, 7][None] if lengths[i] < 7 else feats[i, 0][None], state)
                ref, _ = head.step(feats[i, 7][None] if lengths[i] < 7 else feats[i, 0][None], alone_state)
                torch.testing.assert_close(nxt, ref, atol=1e-5, rtol=1e-5)
    if name == "attention-causal-window":
        assert len(groups) < len(lengths)  # clips past the window share a group: their caches are equally long


def test_which_heads_step_with_bounded_state() -> None:
    bounded = {name: build_model(cfg).head.steps_bounded for name, cfg in CONFIGS.items()}
    assert bounded["lstm"] and bounded["mean"] and bounded["attention-causal-window"]
    assert not bounded["lstm-bi-2layer"] and not bounded["attention"] and not bounded["attention-causal-mean"]


@pytest.mark.parametrize("name", ["lstm-bi-2layer", "attention", "attention-cls"])
def test_non_causal_heads_refuse_to_stream(name: str) -> None:
    model = build_model(CONFIGS[name]).eval()
    assert not model.causal
    with pytest.raises(NotImplementedError, match="not causal"):
        model.init_state(1)


def test_attention_without_position_encoding_is_order_blind() -> None:
    cfg = ModelConfig(4, SMALL, AttentionHeadConfig(dim=16, heads=2, position="none", dropout=0.0), image_size=16)
    model = build_model(cfg).eval()
    frames = clip_batch(cfg, [6])
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    with torch.no_grad():
        a, b = model(frames, torch.tensor([6])), model(frames[perm], torch.tensor([6]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_attention_with_position_encoding_sees_order() -> None:
    model = build_model(CONFIGS["attention"]).eval()
    frames = clip_batch(CONFIGS["attention"], [6])
    with torch.no_grad():
        a, b = model(frames, torch.tensor([6])), model(frames.flip(0), torch.tensor([6]))
    assert (a - b).abs().max() > 1e-4


def test_uint8_and_float_frames_give_the_same_logits() -> None:
    model = build_model(CONFIGS["lstm"]).eval()
    frames = clip_batch(CONFIGS["lstm"], [4])
    with torch.no_grad():
        torch.testing.assert_close(model(frames, torch.tensor([4])), model(frames.float() / 255, torch.tensor([4])))


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_normalize_is_the_configured_mean_and_std_in_the_configured_layout(
    dtype: torch.dtype, channels_last: bool
) -> None:
    cfg = ModelConfig(
        5,
        SMALL,
        LSTMHeadConfig(hidden=12),
        image_size=16,
        mean=(0.2, 0.4, 0.6),
        std=(0.1, 0.3, 0.5),
        channels_last=channels_last,
    )
    model = build_model(cfg)
    frames = clip_batch(cfg, [3, 2], dtype)
    unit = frames.float() / 255 if dtype == torch.uint8 else frames
    expected = (unit - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for given in (frames, frames.contiguous(memory_format=torch.channels_last)):  # as sent, and as decoded
        x = model.normalize(given)
        assert x.dtype == torch.float32
        assert x.is_contiguous(memory_format=layout)
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", preset_names())
def test_presets_build_the_seed_cnn_with_their_head(preset: str) -> None:
    cfg = preset_config(preset, num_classes=8, image_size=32)
    assert cfg.encoder == SmallCNNConfig(widths=(32, 64, 128))
    assert cfg.head.name == preset
    model = build_model(cfg)
    assert model.encoder.out_features == 128


def test_config_round_trips_through_dict() -> None:
    for cfg in CONFIGS.values():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_config_rejects_unknown_names_and_keys() -> None:
    with pytest.raises(ValueError, match="unknown head 'gru'"):
        ModelConfig.from_dict({"num_classes": 3, "head": {"name": "gru"}})
    with pytest.raises(ValueError, match="unknown head config keys"):
        ModelConfig.from_dict({"num_classes": 3, "head": {"name": "lstm", "hiden": 3}})
    with pytest.raises(ValueError, match="one value per channel"):
        ModelConfig(3, in_channels=1)


def test_invalid_attention_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="CLS"):
        build_model(ModelConfig(3, SMALL, AttentionHeadConfig(dim=16, causal=True, pooling="cls")))
    with pytest.raises(ValueError, match="window needs causal"):
        build_model(ModelConfig(3, SMALL, AttentionHeadConfig(dim=16, window=4)))


def test_registry_refuses_a_duplicate_name() -> None:
    reg: Registry = Registry("thing")
    reg.register("a", MeanHeadConfig)(lambda cfg: torch.nn.Identity())
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", MeanHeadConfig)(lambda cfg: torch.nn.Identity())
    with pytest.raises(KeyError, match="unknown thing 'b'"):
        reg.builder("b")


@pytest.mark.parametrize("train", [True, False])
def test_the_small_cnn_pools_before_its_relu_with_the_outputs_and_gradients_of_the_seed_order(train: bool) -> None:
    """SmallCNN runs conv + BN, pool, ReLU; the seed design's order is conv + BN + ReLU, pool. The same
    parameter names load into both, and both give the same outputs and gradients to the bit."""
    torch.manual_seed(5)
    widths = (8, 16, 32)
    cnn = SmallCNN(3, widths)
    blocks: list[torch.nn.Module] = []
    c_in = 3
    for width in widths:
        blocks += [conv_bn_relu(c_in, width), torch.nn.MaxPool2d(2)]
        c_in = width
    seed_order = torch.nn.Sequential(torch.nn.Sequential(*blocks), torch.nn.AdaptiveAvgPool2d(1))
    # the parameters and buffers under the names that checkpoints hold (features.{2i}.{0,1}.*)
    seed_order.load_state_dict({k.replace("features.", "0."): v for k, v in cnn.state_dict().items()}, strict=True)
    assert len(cnn.state_dict()) == len(seed_order.state_dict())
    cnn.train(train), seed_order.train(train)
    x = torch.randn(6, 3, 32, 32)
    # about one pooling window in 16 is all negative after a random conv: there the ReLU ties at zero
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, ref = cnn(a), seed_order(b).flatten(1)
    assert torch.equal(out, ref)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad)
    for (name, p), (_, q) in zip(cnn.named_parameters(), seed_order.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("name", ["lstm", "resnet-lstm", "resnet-attention-1ch"])
def test_folding_batch_norms_into_convs_keeps_the_outputs(name: str) -> None:
    cfg = CONFIGS[name]
    torch.manual_seed(3)
    model = build_model(cfg)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:  # statistics far from a fresh norm's identity, so folding has work to do
        c = norm.num_features
        norm.running_mean.copy_(torch.randn(c))
        norm.running_var.copy_(torch.rand(c) + 0.5)
        norm.weight.data.copy_(torch.randn(c))
        norm.bias.data.copy_(torch.randn(c))
    model.eval()
    lengths = torch.tensor([5, 3])
    frames = clip_batch(cfg, lengths.tolist())
    with torch.no_grad():
        before = model(frames, lengths)
        assert fold_batchnorm(model) == len(norms)  # each follows a conv in a Sequential
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        after = model(frames, lengths)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(build_model(cfg))


@pytest.mark.parametrize("name", ["lstm", "attention", "resnet-lstm"])
@pytest.mark.parametrize("lengths", [[6, 6, 6], [5, 3, 7]])
def test_encoding_frames_in_slices_keeps_the_logits(name: str, lengths: list[int]) -> None:
    # the CPU server slices a large batch's frames through the encoder (frames_per_pass);
    # slices that cut through clips, a last short slice, and equal/ragged clips alike
    model = build_model(CONFIGS[name]).eval()
    frames, lengths_t = clip_batch(CONFIGS[name], lengths), torch.tensor(lengths)
    with torch.no_grad():
        whole = model(frames, lengths_t)
        for step in (1, 4, sum(lengths) - 1, sum(lengths), 100):
            model.frames_per_pass = step
            torch.testing.assert_close(model(frames, lengths_t), whole, atol=1e-5, rtol=1e-5)


def test_slices_bound_what_the_encoder_sees_at_once() -> None:
    model = build_model(CONFIGS["lstm"]).eval()
    seen: list[int] = []
    model.encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    model.frames_per_pass = 4
    with torch.no_grad():
        model(clip_batch(CONFIGS["lstm"], [5, 5]), torch.tensor([5, 5]))
    assert seen == [4, 4, 2]
