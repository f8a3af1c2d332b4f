"""Interleaved rotary embeddings on the trailing `qk_rope_head_dim` channels (v4-model.md §2.1).

Two schedules: SWA-only layers use `rope_theta` (10000) plain; CSA/HCA layers use
`compress_rope_theta` (160000) with YaRN (no mscale) for every q/k in the layer.
"""

from __future__ import annotations

import math

import torch

from engine.config import ModelConfig


def _correction_dim(num_rotations: float, dim: int, base: float, original_len: int) -> float:
    return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_freq(cfg: ModelConfig, compressed: bool) -> torch.Tensor:
    """[r/2] float32 inverse frequencies for one layer kind (YaRN ramp of §2.1 on compressed layers)."""
    r = cfg.qk_rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    ys = cfg.rope_scaling
    if compressed and ys is not None:
        orig = ys.original_max_position_embeddings
        low = max(math.floor(_correction_dim(ys.beta_fast, r, base, orig)), 0)
        high = min(math.ceil(_correction_dim(ys.beta_slow, r, base, orig)), r - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(r // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp  # 1 for fast-rotating dims (kept), 0 for slow ones (interpolated)
        freqs = freqs / ys.factor * (1 - smooth) + freqs * smooth
    return freqs.to(torch.float32)


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, r/2] float32."""
    angles = positions.to(torch.float32)[:, None] * freqs.to(positions.device)[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate consecutive pairs (2i, 2i+1) of the trailing r channels of x: [T, ..., d].

    cos/sin are [T, r/2]; `inverse` applies the conjugate rotation (the output de-rotation of §2.2).
    """
    r = cos.shape[-1] * 2
    extra = x.dim() - 2
    cos = cos.view(cos.shape[0], *([1] * extra), cos.shape[1])
    sin = sin.view(sin.shape[0], *([1] * extra), sin.shape[1])
    if inverse:
        sin = -sin
    rope = x[..., -r:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], rotated.to(x.dtype)], dim=-1)
