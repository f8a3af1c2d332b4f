"""Manifold-constrained hyper-connections: the 4-stream residual of V4 (v4-model.md §3).

The state is `h: [T, hc, D]` everywhere. Each sub-layer collapses the streams with `pre`,
runs, and writes back as `h'_j = post_j * f(y) + sum_i comb[i, j] * h_i` where `comb` is
projected onto the doubly-stochastic matrices by Sinkhorn iterations.

At decode sizes on CPU (float32, no autograd, at most MHC_FUSED_MAX_TOKENS tokens) each of `hc_pre`, `hc_post`,
`hc_head` is one single-threaded C call (`engine.kernels.cpu.mhc_kernel`: the same math in the same order,
instead of ~10-80 tiny torch ops each); the torch code below is the reference and runs everywhere else.

Written for few, cheap passes over `h` (the [T, hc, D] tensors are the big ones and every fresh one costs
page faults): no normalised copy of h, one batched matmul per collapse / write-back, and a Sinkhorn loop
of two vectorised ops per pass with no allocation in the loop.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from engine.kernels.cpu import mhc_kernel
from engine.kernels.select import select_mhc_path, triton_kernels
from engine.model.layers import rsqrt_mean_square

# Up to this many tokens, float32 CPU calls without autograd take the one-call C kernels; above, the torch path
# (whose F.linear of the mixes is an MKL GEMM over all tokens) stays.
MHC_FUSED_MAX_TOKENS = 16


def _fused(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, grad: bool) -> bool:
    """True when the one-call C kernel applies: a CPU h of at most MHC_FUSED_MAX_TOKENS tokens, h and the other
    three arguments float32, and `select_mhc_path` picks the CPU kernel (no autograd, the library built)."""
    return (h.is_cpu and h.dtype is a.dtype is b.dtype is c.dtype is torch.float32
            and h.shape[0] <= MHC_FUSED_MAX_TOKENS and select_mhc_path("cpu", grad) == "kernel")


def _mixes(h: torch.Tensor, fn: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, hc, D] -> ((flat(h) @ fn^T) * rsqrt(mean(flat(h)^2) + eps) [T, n_mix] float32, float32 h).

    The rsqrt factor is one scalar per row, so it scales the [T, n_mix] product (v4-model.md §3 writes it
    this way) instead of a normalised [T, hc*D] copy; the sum of squares comes from a norm, not a squared copy.
    """
    hf = h.float()
    xf = hf.flatten(1)
    return F.linear(xf, fn.float()) * rsqrt_mean_square(xf, eps), hf  # [T, n_mix]: out of place for autograd


def _collapse(pre: torch.Tensor, hf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_i pre[:, i] * h_i: pre [T, hc] f32, hf [T, hc, D] f32 -> [T, D] in `dtype`."""
    return torch.bmm(pre.unsqueeze(1), hf).squeeze(1).to(dtype)


@functools.lru_cache(maxsize=16)
def _group_scale_index(hc: int, device: torch.device) -> torch.Tensor:
    """Which of hc_pre's 3 scales each of its 2+hc column groups uses: [0, 1, 2, ..., 2].

    Made outside inference mode whatever the caller's mode: a cached inference tensor could not be saved for
    backward by a later call with autograd."""
    with torch.inference_mode(False):
        return torch.tensor([0, 1] + [2] * hc, device=device)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """comb [T, hc, hc] (positive) -> doubly stochastic: one column pass, then iters-1 row+column passes.

    Each pass is `comb / (sum + eps)`. The passes run on a [hc+1, hc+1, T] buffer (T innermost, so every op is
    vectorised over tokens) whose extra row and column hold eps: a row or column sum over the padded buffer
    is `sum + eps` in one reduction, then one in-place division; no allocation in the loop.
    """
    t, hc = comb.shape[0], comb.shape[-1]
    if comb.requires_grad:  # autograd records no out= ops: the same passes out of place
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        for _ in range(iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        return comb
    buf = torch.full((hc + 1, hc + 1, t), eps, dtype=comb.dtype, device=comb.device)
    mat = buf[:hc, :hc]  # [i, j, T]
    torch.div(comb, comb.sum(dim=-2, keepdim=True) + eps, out=mat.permute(2, 0, 1))
    rows, cols = buf[:hc], buf[:, :hc]  # [i, j + eps, T], [i + eps, j, T]
    sums = torch.empty(hc, t, dtype=comb.dtype, device=comb.device)
    row_sums, col_sums = sums.view(hc, 1, t), sums.view(1, hc, t)
    for _ in range(iters - 1):
        torch.sum(rows, dim=1, out=sums)
        mat.div_(row_sums)
        torch.sum(cols, dim=0, out=sums)
        mat.div_(col_sums)
    return mat.permute(2, 0, 1).contiguous()


def mhc_gates(mixes: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int, hc_eps: float,
              sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes [T, (2+hc)*hc] f32 -> (pre [T, hc], post [T, hc], comb [T, hc, hc]), all f32: the plain-torch
    reference of the C kernel (`engine.kernels.cpu.mhc_kernel`, CPU) and `engine.kernels.triton.mhc_gates` (one
    launch, CUDA); `select_mhc_path` picks."""
    t = mixes.shape[0]
    # 2+hc groups of hc columns (pre, post, the hc rows of comb); group k's logits are mixes * scale + base
    # with scale[0] for pre, scale[1] for post, scale[2] for comb: one addcmul for all of them.
    group_scale = scale.float().index_select(0, _group_scale_index(hc, scale.device)).view(2 + hc, 1)
    logits = torch.addcmul(base.float().view(2 + hc, hc), mixes.view(t, 2 + hc, hc), group_scale)
    gates = torch.sigmoid(logits[:, :2])  # [T, 2, hc]
    pre = gates[:, 0] + hc_eps
    post = gates[:, 1] * 2
    comb = torch.softmax(logits[:, 2:], dim=-1) + hc_eps  # not add_: softmax's backward reads its output
    return pre, post, sinkhorn(comb, sinkhorn_iters, hc_eps)


def hc_pre(
    h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
    hc_eps: float, norm_eps: float, sinkhorn_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [T, hc, D] -> (y [T, D] sub-layer input, post [T, hc] f32, comb [T, hc, hc] f32).

    Decode sizes on CPU (`_fused`): one C call for all of it. Else the mixes by torch, then the gates by the path
    `select_mhc_path` picks (the CPU gates kernel, one Triton launch on CUDA, or torch), then the collapse."""
    hc = h.shape[1]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (h, fn, base, scale))
    if _fused(h, fn, base, scale, grad):
        return mhc_kernel().pre(h, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters)
    mixes, hf = _mixes(h, fn, norm_eps)  # [T, (2+hc)*hc]: hc pre, hc post, hc*hc comb logits
    path = select_mhc_path(mixes.device.type, grad)
    if path == "kernel":  # CPU: the same math, one C call
        pre, post, comb = mhc_kernel().mix(mixes, base.float().reshape(-1), scale.float(), hc, sinkhorn_iters, hc_eps)
    elif path == "triton":  # CUDA: one launch
        pre, post, comb = triton_kernels().mhc_gates(mixes, base, scale, hc, hc_eps, sinkhorn_iters)
    else:
        pre, post, comb = mhc_gates(mixes, base, scale, hc, hc_eps, sinkhorn_iters)
    return _collapse(pre, hf, h.dtype), post, comb


def hc_post(h: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """h [T, hc, D], out [T, D] -> [T, hc, D]: post_j * out + sum_i comb[i, j] * h_i.

    Decode sizes on CPU, all float32 (`_fused`): one C call. On CUDA without autograd (`select_mhc_path`), `out` in
    h's dtype and float32 post/comb (as hc_pre gives): one Triton launch (fp32 math, one rounding); else these
    torch ops, the reference."""
    dtype = h.dtype
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (h, out, post, comb))
    if _fused(h, out, post, comb, grad):
        return mhc_kernel().post(h, out, post, comb)
    if out.dtype == dtype and post.dtype == comb.dtype == torch.float32 \
            and select_mhc_path(h.device.type, grad) == "triton":
        return triton_kernels().mhc_post(h, out, post, comb)
    res = post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2)  # the one new [T, hc, D] tensor
    comb_t = comb.to(dtype).transpose(-1, -2)  # [T, hc(j), hc(i)]
    if res.dtype != dtype:  # `out` of another dtype: keep torch's type promotion of the plain formula
        return res + torch.matmul(comb_t, h)
    return res.baddbmm_(comb_t, h)


def hc_head(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse (no Sinkhorn): h [T, hc, D] -> [T, D]. Decode sizes on CPU (`_fused`): one C call."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (h, fn, base, scale))
    if _fused(h, fn, base, scale, grad):
        return mhc_kernel().head(h, fn, base, scale, hc_eps, norm_eps)
    mixes, hf = _mixes(h, fn, norm_eps)  # [T, hc]
    pre = torch.sigmoid(torch.addcmul(base.float(), mixes, scale.float())) + hc_eps  # not add_ (autograd)
    return _collapse(pre, hf, h.dtype)
