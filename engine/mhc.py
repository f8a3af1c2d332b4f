"""Manifold-constrained hyper-connections: the 4-stream residual of V4 (v4-model.md §3).

The state is `h: [T, hc, D]` everywhere. Each sub-layer collapses the streams with `pre`,
runs, and writes back as `h'_j = post_j * f(y) + sum_i comb[i, j] * h_i` where `comb` is
projected onto the doubly-stochastic matrices by Sinkhorn iterations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mixes(h: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """h [T, hc, D] -> (flat(h) @ fn^T) * rsqrt(mean(flat(h)^2) + eps): [T, n_mix] float32."""
    xf = h.flatten(1).float()
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return F.linear(xf, fn.float())


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """comb [T, hc, hc] (positive) -> doubly stochastic: one column pass, then iters-1 row+column passes."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def hc_pre(
    h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
    hc_eps: float, norm_eps: float, sinkhorn_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [T, hc, D] -> (y [T, D] sub-layer input, post [T, hc] f32, comb [T, hc, hc] f32)."""
    hc = h.shape[1]
    mixes = _mixes(h, fn, norm_eps)  # [T, (2+hc)*hc]
    pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.float().split([hc, hc, hc * hc])
    scale = scale.float()
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb = torch.softmax(comb_w.view(-1, hc, hc) * scale[2] + comb_b.view(hc, hc), dim=-1) + hc_eps
    comb = sinkhorn(comb, sinkhorn_iters, hc_eps)
    y = (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)
    return y, post, comb


def hc_post(h: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """h [T, hc, D], out [T, D] -> [T, hc, D]: post_j * out + sum_i comb[i, j] * h_i."""
    dtype = h.dtype
    mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), h)  # [T, hc(j), D]
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + mixed


def hc_head(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse (no Sinkhorn): h [T, hc, D] -> [T, D]."""
    mixes = _mixes(h, fn, norm_eps)  # [T, hc]
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)
