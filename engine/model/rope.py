"""Interleaved rotary embeddings on the trailing `qk_rope_head_dim` channels (v4-model.md §2.1).

Two schedules: SWA-only layers use `rope_theta` (10000) plain; CSA/HCA layers use
`compress_rope_theta` (160000) with YaRN (no mscale) for every q/k in the layer.
"""

from __future__ import annotations

import math

import torch

from engine.kernels.cpu import norm_kernel
from engine.kernels.select import select_norm_path
from engine.model.config import ModelConfig


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
    """Rotate consecutive pairs (2i, 2i+1) of the trailing r channels of x: [T, ..., d] -> new [T, ..., d].

    cos/sin are [T, r/2]; `inverse` applies the conjugate rotation (the output de-rotation of §2.2).
    even' = even*cos - odd*sin, odd' = odd*cos + even*sin (sin negated for `inverse`), in float32; a float32
    result is written straight into the output's strided halves, other dtypes are rounded once at the end.
    These torch ops are the reference; few float32 CPU rows take one C call (`select_norm_path`, same roundings).
    """
    if cos.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous() \
            and select_norm_path(x, torch.is_grad_enabled() and x.requires_grad) == "kernel":
        return norm_kernel().rope(x if x.is_contiguous() else x.contiguous(), cos, sin, inverse)
    r = cos.shape[-1] * 2
    extra = x.dim() - 2
    cos = cos.view(cos.shape[0], *([1] * extra), cos.shape[1])
    sin = sin.view(sin.shape[0], *([1] * extra), sin.shape[1])
    sign = -1 if inverse else 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out[..., :-r] = x[..., :-r]
    rope = x[..., -r:]
    even, odd = rope[..., 0::2].float(), rope[..., 1::2].float()
    out_even, out_odd = out[..., -r:][..., 0::2], out[..., -r:][..., 1::2]
    direct = x.dtype == torch.float32 and not x.requires_grad  # out= ops are not recorded by autograd
    if direct:
        new_even, new_odd = torch.mul(even, cos, out=out_even), torch.mul(odd, cos, out=out_odd)
    else:
        new_even, new_odd = even * cos, odd * cos
    new_even.addcmul_(odd, sin, value=-sign)
    new_odd.addcmul_(even, sin, value=sign)
    if not direct:
        out_even.copy_(new_even)
        out_odd.copy_(new_odd)
    return out
