"""Manifold-constrained hyper-connections: the 4-stream residual of V4 (v4-model.md §3).

The state is `h: [T, hc, D]` everywhere. Each sub-layer collapses the streams with `pre`,
runs, and writes back as `h'_j = post_j * f(y) + sum_i comb[i, j] * h_i` where `comb` is
projected onto the doubly-stochastic matrices by Sinkhorn iterations.

Written for few, cheap passes over `h` (the [T, hc, D] tensors are the big ones and every fresh one costs
page faults): no normalised copy of h, one batched matmul per collapse / write-back, and a Sinkhorn loop
of two small ops per pass with no allocation in the loop.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from engine.layers import rsqrt_mean_square


def _mixes(h: torch.Tensor, fn: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, hc, D] -> ((flat(h) @ fn^T) * rsqrt(mean(flat(h)^2) + eps) [T, n_mix] float32, float32 h).

    The rsqrt factor is one scalar per row, so it scales the [T, n_mix] product (v4-model.md §3 writes it
    this way) instead of a normalised [T, hc*D] copy; the sum of squares comes from a norm, not a squared copy.
    """
    hf = h.float()
    xf = hf.flatten(1)
    return F.linear(xf, fn.float()).mul_(rsqrt_mean_square(xf, eps)), hf


def _collapse(pre: torch.Tensor, hf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_i pre[:, i] * h_i: pre [T, hc] f32, hf [T, hc, D] f32 -> [T, D] in `dtype`."""
    return torch.bmm(pre.unsqueeze(1), hf).squeeze(1).to(dtype)


@functools.lru_cache(maxsize=16)
def _sum_selectors(hc: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 matrices [hc*hc, hc] mapping a flattened [hc(i), hc(j)] matrix to its row sums (over j) / column sums."""
    eye = torch.eye(hc, dtype=dtype, device=device)
    return eye.repeat_interleave(hc, dim=0), eye.repeat(hc, 1)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """comb [T, hc, hc] (positive) -> doubly stochastic: one column pass, then iters-1 row+column passes.

    Each pass is `comb / (sum + eps)`. After the first (out-of-place) pass, the `sum + eps` of all T matrices
    is one matmul with a 0/1 selector whose added input is eps (the selector's zeros add nothing exactly),
    followed by one in-place division: two ops per pass and no allocation in the loop.
    """
    t, hc = comb.shape[0], comb.shape[-1]
    comb = (comb / (comb.sum(dim=-2, keepdim=True) + eps)).contiguous()
    if comb.requires_grad:  # autograd records no out= ops: the same passes out of place
        for _ in range(iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        return comb
    if iters <= 1:
        return comb
    rows, cols = _sum_selectors(hc, comb.dtype, comb.device)
    flat = comb.view(t, hc * hc)
    eps_t = torch.full((1,), eps, dtype=comb.dtype, device=comb.device)
    sums = torch.empty(t, hc, dtype=comb.dtype, device=comb.device)
    row_sums, col_sums = sums.view(t, hc, 1), sums.view(t, 1, hc)
    for _ in range(iters - 1):
        torch.addmm(eps_t, flat, rows, out=sums)
        comb.div_(row_sums)
        torch.addmm(eps_t, flat, cols, out=sums)
        comb.div_(col_sums)
    return comb


def hc_pre(
    h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
    hc_eps: float, norm_eps: float, sinkhorn_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [T, hc, D] -> (y [T, D] sub-layer input, post [T, hc] f32, comb [T, hc, hc] f32)."""
    hc = h.shape[1]
    mixes, hf = _mixes(h, fn, norm_eps)  # [T, (2+hc)*hc]
    scale = scale.float()
    base = base.float()
    # pre/post logits: mixes * scale_k + base for the first 2*hc columns (scale0 for pre, scale1 for post)
    gates = torch.sigmoid(torch.addcmul(base[: 2 * hc], mixes[:, : 2 * hc], scale[:2].repeat_interleave(hc)))
    pre = gates[:, :hc] + hc_eps
    post = gates[:, hc:].mul(2)
    comb_logits = torch.addcmul(base[2 * hc:].view(hc, hc), mixes[:, 2 * hc:].view(h.shape[0], hc, hc), scale[2])
    comb = torch.softmax(comb_logits, dim=-1).add_(hc_eps)
    comb = sinkhorn(comb, sinkhorn_iters, hc_eps)
    return _collapse(pre, hf, h.dtype), post, comb


def hc_post(h: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """h [T, hc, D], out [T, D] -> [T, hc, D]: post_j * out + sum_i comb[i, j] * h_i."""
    dtype = h.dtype
    res = post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2)  # the one new [T, hc, D] tensor
    comb_t = comb.to(dtype).transpose(-1, -2)  # [T, hc(j), hc(i)]
    if res.dtype != dtype:  # `out` of another dtype: keep torch's type promotion of the plain formula
        return res + torch.matmul(comb_t, h)
    return res.baddbmm_(comb_t, h)


def hc_head(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse (no Sinkhorn): h [T, hc, D] -> [T, D]."""
    mixes, hf = _mixes(h, fn, norm_eps)  # [T, hc]
    pre = torch.sigmoid(torch.addcmul(base.float(), mixes, scale.float())).add_(hc_eps)
    return _collapse(pre, hf, h.dtype)
