"""Temporal heads: per-frame features of each clip -> class logits.

Every head takes padded features ``feats: (B, T, D)`` and ``lengths: (B,)`` (real
frames per clip; positions at or past a clip's length are padding and never change
its logits). Causal heads also stream: ``init_state(batch)`` then
``step(feat: (B, D), state) -> (logits, state)``, one frame at a time, giving the
same logits as ``forward`` on the frames seen so far. The states of separate clips stack into
one batch (``stack_states``, ``unstack_state``) when they share a ``state_group``, so a server
steps many streams, each at its own frame, in one call.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from models.config import AttentionHeadConfig, LSTMHeadConfig, MeanHeadConfig
from models.registry import HEADS

State = dict[str, Any]


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, True on real frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def stack_rows(states: list[State], dims: dict[str, int]) -> State:
    """Per-clip states -> one state of all the clips: each key's tensors concatenated on its batch dim."""
    return {key: torch.cat([s[key] for s in states], dim=dim) for key, dim in dims.items()}


def split_rows(state: State, dims: dict[str, int]) -> list[State]:
    """One state of B clips -> B per-clip states (copies: a view would keep the whole batch's alive)."""
    parts = {key: [row.clone() for row in state[key].split(1, dim=dim)] for key, dim in dims.items()}
    return [dict(zip(parts, row, strict=True)) for row in zip(*parts.values(), strict=True)]


class TemporalHead(nn.Module):
    """Base class; ``causal`` heads implement ``init_state``, ``step`` and the stacking of states."""

    causal: bool = False

    @property
    def steps_bounded(self) -> bool:
        """Streams by ``step`` with a state of bounded size, however long the stream (else a server
        answers a stream from a sliding window of its last frames)."""
        return self.causal

    def stack_states(self, states: list[State]) -> State:
        """Per-clip states (batch 1 each, one ``state_group``) -> one state of all of them, in order."""
        raise NotImplementedError(f"{type(self).__name__} is not causal and cannot stream")

    def unstack_state(self, state: State) -> list[State]:
        """The inverse of ``stack_states``."""
        raise NotImplementedError(f"{type(self).__name__} is not causal and cannot stream")

    def state_group(self, state: State) -> Hashable:
        """States of one group stack; the default: all do."""
        return 0

    def init_state(self, batch: int, device: torch.device | None = None) -> State:
        raise NotImplementedError(f"{type(self).__name__} is not causal and cannot stream")

    def step(self, feat: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        raise NotImplementedError(f"{type(self).__name__} is not causal and cannot stream")

    def pooling_weights(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """feats: (B, T, D), lengths: (B,) -> the weight pooling gives each frame (B, T), for heads that
        pool by learned weights (attention pooling); None for the others."""
        return None

    def extra_flops(self, length: int) -> int:
        """FLOPs that torch's flop counter misses (fused RNN kernels) for a clip of ``length``."""
        return 0

    def forward_full(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: (B, T, D) where every clip has all T frames -> logits (B, K).

        Same logits as ``forward`` with lengths all T, without reading anything back to
        the host, so a CUDA graph can capture it.
        """
        B, T = feats.shape[:2]
        return self(feats, torch.full((B,), T, device=feats.device))


class MeanHead(TemporalHead):
    """Order-blind baseline: masked mean over time, then linear. Streams trivially."""

    causal = True

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats: (B, T, D), lengths: (B,) -> logits (B, K)."""
        mask = length_mask(lengths, feats.shape[1]).unsqueeze(-1)  # (B, T, 1)
        pooled = feats.masked_fill(~mask, 0.0).sum(1) / lengths[:, None].to(feats.dtype)  # (B, D)
        return self.fc(self.dropout(pooled))

    STATE_DIMS = {"sum": 0, "count": 0}  # noqa: RUF012 (read only)

    def init_state(self, batch: int, device: torch.device | None = None) -> State:
        return {
            "sum": torch.zeros(batch, self.fc.in_features, device=device),
            "count": torch.zeros(batch, 1, device=device),
        }

    def step(self, feat: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        total = state["sum"] + feat  # (B, D)
        count = state["count"] + 1  # (B, 1): each clip's own count
        return self.fc(total / count), {"sum": total, "count": count}

    def stack_states(self, states: list[State]) -> State:
        return stack_rows(states, self.STATE_DIMS)

    def unstack_state(self, state: State) -> list[State]:
        return split_rows(state, self.STATE_DIMS)


class LSTMHead(TemporalHead):
    """LSTM over packed sequences; the last layer's final hidden state(s) -> linear."""

    def __init__(self, in_features: int, num_classes: int, cfg: LSTMHeadConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            in_features,
            cfg.hidden,
            num_layers=cfg.layers,
            batch_first=True,
            bidirectional=cfg.bidirectional,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0,
        )
        self.directions = 2 if cfg.bidirectional else 1
        self.causal = not cfg.bidirectional
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.hidden * self.directions, num_classes)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats: (B, T, D), lengths: (B,) -> logits (B, K)."""
        packed = pack_padded_sequence(feats, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: (layers * dirs, B, H), already unsorted
        last = torch.cat(list(h[-self.directions :]), dim=-1)  # (B, H * dirs)
        return self.fc(self.dropout(last))

    def forward_full(self, feats: torch.Tensor) -> torch.Tensor:
        # Full-length clips need no packing (and packing would read the lengths on the host).
        _, (h, _) = self.lstm(feats)
        return self.fc(self.dropout(torch.cat(list(h[-self.directions :]), dim=-1)))

    def init_state(self, batch: int, device: torch.device | None = None) -> State:
        if not self.causal:
            return super().init_state(batch, device)
        shape = (self.lstm.num_layers, batch, self.lstm.hidden_size)
        return {"h": torch.zeros(shape, device=device), "c": torch.zeros(shape, device=device)}

    def step(self, feat: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if not self.causal:
            return super().step(feat, state)
        _, (h, c) = self.lstm(feat.unsqueeze(1), (state["h"], state["c"]))  # feat: (B, D) -> (B, 1, D)
        return self.fc(h[-1]), {"h": h, "c": c}

    STATE_DIMS = {"h": 1, "c": 1}  # noqa: RUF012 (read only): (layers, B, hidden)

    def stack_states(self, states: list[State]) -> State:
        return stack_rows(states, self.STATE_DIMS)

    def unstack_state(self, state: State) -> list[State]:
        return split_rows(state, self.STATE_DIMS)

    def extra_flops(self, length: int) -> int:
        # Per step, per layer and direction: 4 gates of (input + hidden) x hidden MACs.
        h = self.lstm.hidden_size
        flops = 0
        for layer in range(self.lstm.num_layers):
            d_in = self.lstm.input_size if layer == 0 else h * self.directions
            flops += self.directions * length * 2 * 4 * h * (d_in + h)
        return flops


def sinusoidal_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """positions: (T,) or (B, T) -> (..., dim) fixed sin/cos encoding, defined for any position."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    angles = positions.float()[..., None] * freqs  # (..., half)
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(enc, (0, dim - 2 * half))  # (..., dim)


class SelfAttention(nn.Module):
    """Multi-head attention whose queries can be a suffix of the keys (for streaming)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, h, T, D/h)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def attend(self, x_q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x_q: (B, Tq, D); k, v: (B, h, Tk, D/h); allowed: (B, 1, Tq, Tk) bool -> (B, Tq, D)."""
        B, Tq, D = x_q.shape
        q = self.split(self.q(x_q))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, Tq, D))  # (B, Tq, D)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D); allowed: (B, 1, T, T) bool."""
        h = self.norm1(x)
        k, v = self.attn.project_kv(h)
        x = x + self.drop(self.attn.attend(h, k, v, allowed))
        return x + self.drop(self.ff(self.norm2(x)))


class AttentionHead(TemporalHead):
    """Transformer encoder over frames with temporal position encoding and pooling."""

    def __init__(self, in_features: int, num_classes: int, cfg: AttentionHeadConfig) -> None:
        super().__init__()
        if cfg.position not in ("sinusoidal", "none"):
            raise ValueError(f"position must be 'sinusoidal' or 'none', got {cfg.position!r}")
        if cfg.pooling not in ("attention", "cls", "mean"):
            raise ValueError(f"pooling must be 'attention', 'cls' or 'mean', got {cfg.pooling!r}")
        if cfg.causal and cfg.pooling == "cls":
            raise ValueError("a causal head cannot pool with a CLS token (it would see no frame)")
        if cfg.window is not None and (not cfg.causal or cfg.window < 1):
            raise ValueError("window needs causal=True and must be at least 1")
        self.cfg = cfg
        self.causal = cfg.causal
        self.proj = nn.Linear(in_features, cfg.dim) if in_features != cfg.dim else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.ff_mult, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pooling == "cls" else None
        self.score = nn.Linear(cfg.dim, 1) if cfg.pooling == "attention" else None
        self.fc = nn.Linear(cfg.dim, num_classes)

    def embed(self, feats: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """feats: (B, T, D_in) at positions start.. (one start, or each clip's: (B,)) -> (B, T, dim)."""
        x = self.proj(feats)
        if self.cfg.position == "sinusoidal":
            pos = torch.arange(x.shape[1], device=x.device) + (
                start if isinstance(start, int) else start.to(x.device)[:, None]
            )
            x = x + sinusoidal_encoding(pos, self.cfg.dim).to(x.dtype)
        return x

    def allowed_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """valid: (B, T) bool -> (B, 1, T, T) bool: which keys each query may attend to."""
        T = valid.shape[1]
        allowed = valid[:, None, None, :].expand(-1, 1, T, T)
        if self.causal:
            i = torch.arange(T, device=valid.device)
            rel = i[:, None] - i[None, :]  # query - key
            causal = rel >= 0
            if self.cfg.window is not None:
                causal = causal & (rel < self.cfg.window)
            allowed = allowed & causal
        # A padding query may have no allowed key; let it see itself so softmax stays finite.
        return allowed | torch.eye(T, dtype=torch.bool, device=valid.device)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats: (B, T, D), lengths: (B,) -> logits (B, K)."""
        h, valid = self.hidden(feats, lengths)
        return self.fc(self.pool(h, valid))

    def hidden(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats: (B, T, D), lengths: (B,) -> the last block's normalised output (B, T', dim) and which
        of its positions are real (B, T') bool; T' is T + 1 with a CLS token first."""
        valid = length_mask(lengths, feats.shape[1])  # (B, T)
        x = self.embed(feats, 0)  # (B, T, dim)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + T, dim)
            valid = F.pad(valid, (1, 0), value=True)
        allowed = self.allowed_mask(valid)
        for block in self.blocks:
            x = block(x, allowed).masked_fill(~valid[..., None], 0.0)
        return self.norm(x), valid

    def pool(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """h: (B, T, dim), valid: (B, T) -> (B, dim)."""
        if self.cls is not None:
            return h[:, 0]
        if self.score is None:  # mean
            return h.masked_fill(~valid[..., None], 0.0).sum(1) / valid.sum(1, keepdim=True)
        return torch.einsum("bt,btd->bd", self.score_weights(h, valid), h)

    def score_weights(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """h: (B, T, dim), valid: (B, T) -> attention pooling's weight of each frame (B, T), 0 on padding."""
        assert self.score is not None, "only attention pooling weighs its frames"
        scores = self.score(h).squeeze(-1).masked_fill(~valid, float("-inf"))  # (B, T)
        return scores.softmax(dim=1)

    def pooling_weights(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        if self.score is None:
            return None
        return self.score_weights(*self.hidden(feats, lengths))

    def init_state(self, batch: int, device: torch.device | None = None) -> State:
        if not self.causal:
            return super().init_state(batch, device)
        dim = self.cfg.dim
        return {
            "t": torch.zeros(batch, dtype=torch.long, device=device),  # each clip's next position
            "kv": [None] * len(self.blocks),  # per block: (k, v), each (B, h, <=window, dim/h)
            # Online softmax pooling: running max score, sum of weights, weighted sum.
            "max": torch.full((batch, 1), float("-inf"), device=device),
            "norm": torch.zeros(batch, 1, device=device),
            "acc": torch.zeros(batch, dim, device=device),
        }

    def step(self, feat: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if not self.causal:
            return super().step(feat, state)
        t = state["t"]
        x = self.embed(feat.unsqueeze(1), t)  # (B, 1, dim)
        caches = []
        blocks = cast(list[Block], list(self.blocks))
        for block, cache in zip(blocks, state["kv"], strict=True):
            h = block.norm1(x)
            k, v = block.attn.project_kv(h)
            if cache is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            if self.cfg.window is not None:
                k, v = k[:, :, -self.cfg.window :], v[:, :, -self.cfg.window :]
            allowed = torch.ones(x.shape[0], 1, 1, k.shape[2], dtype=torch.bool, device=x.device)
            x = x + block.attn.attend(h, k, v, allowed)
            x = x + block.ff(block.norm2(x))
            caches.append((k, v))
        h = self.norm(x[:, 0])  # (B, dim)
        new: State = {"t": t + 1, "kv": caches}
        if self.score is None:  # running mean
            new.update(acc=state["acc"] + h, norm=state["norm"] + 1, max=state["max"])
        else:
            score = self.score(h)  # (B, 1)
            m = torch.maximum(state["max"], score)
            scale, w = torch.exp(state["max"] - m), torch.exp(score - m)
            new.update(max=m, norm=state["norm"] * scale + w, acc=state["acc"] * scale + w * h)
        return self.fc(new["acc"] / new["norm"]), new

    @property
    def steps_bounded(self) -> bool:
        return self.causal and self.cfg.window is not None  # else the key cache grows with every frame

    POOL_DIMS = {"t": 0, "max": 0, "norm": 0, "acc": 0}  # noqa: RUF012 (read only)

    def state_group(self, state: State) -> Hashable:
        first = state["kv"][0]
        return 0 if first is None else first[0].shape[2]  # frames in the key cache: equal ones stack

    def stack_states(self, states: list[State]) -> State:
        stacked = stack_rows(states, self.POOL_DIMS)
        if states[0]["kv"][0] is None:
            stacked["kv"] = [None] * len(self.blocks)
        else:
            per_block = zip(*(s["kv"] for s in states), strict=True)
            stacked["kv"] = [(torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs])) for kvs in per_block]
        return stacked

    def unstack_state(self, state: State) -> list[State]:
        rows = split_rows(state, self.POOL_DIMS)
        per_block = [
            [(k_row.clone(), v_row.clone()) for k_row, v_row in zip(k.split(1), v.split(1), strict=True)]
            for k, v in state["kv"]
        ]
        for i, row in enumerate(rows):
            row["kv"] = [kvs[i] for kvs in per_block]
        return rows


@HEADS.register("mean", MeanHeadConfig)
def build_mean(cfg: MeanHeadConfig, *, in_features: int, num_classes: int) -> nn.Module:
    return MeanHead(in_features, num_classes, cfg.dropout)


@HEADS.register("lstm", LSTMHeadConfig)
def build_lstm(cfg: LSTMHeadConfig, *, in_features: int, num_classes: int) -> nn.Module:
    return LSTMHead(in_features, num_classes, cfg)


@HEADS.register("attention", AttentionHeadConfig)
def build_attention(cfg: AttentionHeadConfig, *, in_features: int, num_classes: int) -> nn.Module:
    return AttentionHead(in_features, num_classes, cfg)
