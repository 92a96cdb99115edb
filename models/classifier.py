"""The fused classifier: a frame encoder (CNN) followed by a temporal head.

Ragged batching: clips of different lengths travel as all their frames concatenated,
``frames: (N, C, H, W)`` with ``lengths: (B,)`` summing to N. The encoder runs on
those N real frames only; the head gets features padded to (B, T_max, D) with the
lengths, so a clip's logits do not depend on the other clips in its batch.

Frames are uint8 (0..255) or float (0..1); normalisation by the config's mean and std
happens inside the model, on whatever device it runs on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from models.config import ModelConfig
from models.heads import State, TemporalHead
from models.registry import ENCODERS, HEADS


class FusedClassifier(nn.Module):
    mean: torch.Tensor  # (1, C, 1, 1) buffers, from the config
    std: torch.Tensor
    scale_uint8: torch.Tensor  # 1 / (255 std), 1 / std and -mean / std: normalize's multiply-add
    scale_unit: torch.Tensor
    shift: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ENCODERS.builder(config.encoder.name)(config.encoder, in_channels=config.in_channels)
        head = HEADS.builder(config.head.name)(
            config.head, in_features=self.encoder.out_features, num_classes=config.num_classes
        )
        assert isinstance(head, TemporalHead), f"head {config.head.name!r} must be a TemporalHead"
        self.head = head
        # Not saved: they come from the config, which the checkpoint holds.
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)
        # (x - mean) / std as one multiply-add per element: x * scale + shift, with the uint8 scale
        # folding in the division by 255 (one pass over the batch instead of three, no temporaries).
        self.register_buffer("scale_uint8", 1.0 / (255.0 * self.std), persistent=False)
        self.register_buffer("scale_unit", 1.0 / self.std, persistent=False)
        self.register_buffer("shift", -self.mean / self.std, persistent=False)
        # Most frames the encoder takes in one pass (None: all of them). A serving choice, not part
        # of the config: app.runtime sets it on the CPU, so that a large batch's activations (the
        # first conv block's output is 32 floats per pixel) are those of one slice, not of the batch.
        self.frames_per_pass: int | None = None
        self.encoder_frozen = False  # training only: see freeze_encoder

    def freeze_encoder(self, frozen: bool) -> None:
        """Training: while frozen the encoder takes no gradients and its batch norms stay in eval mode
        (their running statistics are those it came with), whatever ``train()`` is called."""
        self.encoder_frozen = frozen
        self.encoder.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> FusedClassifier:
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    @property
    def causal(self) -> bool:
        return self.head.causal

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: (N, C, H, W) uint8 0..255 or float 0..1 -> normalised float (N, C, H, W)."""
        assert frames.dim() == 4 and frames.shape[1] == self.config.in_channels, (
            f"expected frames (N, {self.config.in_channels}, H, W), got {tuple(frames.shape)}"
        )
        # channels-last runs the CPU convolutions faster (docs/performance.md); the layout is set
        # on the input (a uint8 copy, if any), and the multiply-add's output keeps it.
        fmt = torch.channels_last if self.config.channels_last else torch.contiguous_format
        x = frames.contiguous(memory_format=fmt)
        if x.dtype == torch.uint8:
            return torch.addcmul(self.shift, x, self.scale_uint8)
        return torch.addcmul(self.shift, x.float(), self.scale_unit)

    def forward_features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: (N, C, H, W) -> per-frame features (N, D), ``frames_per_pass`` frames at a time when set."""
        step = self.frames_per_pass
        if step is None or frames.shape[0] <= step:
            return self.encoder(self.normalize(frames))
        return torch.cat([self.encoder(self.normalize(part)) for part in frames.split(step)])

    def forward_head(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats: (N, D) of all clips' frames in order, lengths: (B,) -> logits (B, K)."""
        assert int(lengths.sum()) == feats.shape[0], (
            f"lengths sum to {int(lengths.sum())} but there are {feats.shape[0]} frames"
        )
        assert bool((lengths > 0).all()), "every clip needs at least one frame"
        padded = pad_sequence(list(feats.split(lengths.tolist())), batch_first=True)  # (B, T, D)
        return self.head(padded, lengths.to(feats.device))

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """frames: (N, C, H, W) concatenated clips, lengths: (B,) -> logits (B, K)."""
        B = lengths.numel()
        if (
            lengths.device.type == "cpu"
            and B
            and int(lengths[0]) * B == frames.shape[0]
            and bool((lengths == lengths[0]).all())
        ):
            return self.forward_uniform(frames, B)  # the common case: no padding, no packing
        return self.forward_head(self.forward_features(frames), lengths)

    def classify_features(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats: (N, D) of all clips' frames, lengths: (B,) -> logits (B, K), as ``forward`` runs the head
        on the encoder's output (training on cached features takes this path)."""
        B = lengths.numel()
        if B and int(lengths[0]) * B == feats.shape[0] and bool((lengths == lengths[0]).all()):
            return self.head.forward_full(feats.view(B, -1, feats.shape[-1]))
        return self.forward_head(feats, lengths)

    def forward_uniform(self, frames: torch.Tensor, clips: int) -> torch.Tensor:
        """frames: (clips * T, C, H, W), every clip T frames -> logits (clips, K).

        Never reads back to the host: the server captures it in CUDA graphs.
        """
        assert frames.shape[0] % clips == 0, f"{frames.shape[0]} frames do not split into {clips} equal clips"
        feats = self.forward_features(frames)  # (clips * T, D)
        return self.head.forward_full(feats.view(clips, -1, feats.shape[-1]))

    def forward_clips(self, clips: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """clips: (B, T, C, H, W) padded, lengths: (B,) or None (all T) -> logits (B, K)."""
        B, T = clips.shape[:2]
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long)
        lengths = lengths.cpu()
        valid = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
        frames = clips[valid.to(clips.device)]  # (N, C, H, W), only real frames
        return self(frames, lengths)

    def init_state(self, batch: int) -> State:
        """Streaming state for ``batch`` clips stepped in lockstep (causal heads only)."""
        return self.head.init_state(batch, device=self.mean.device)

    def step(self, frames: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """frames: (B, C, H, W), one new frame per clip -> (logits (B, K), new state)."""
        return self.head.step(self.forward_features(frames), state)


def build_model(config: ModelConfig) -> FusedClassifier:
    return FusedClassifier(config)
