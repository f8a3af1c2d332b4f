"""Plain-torch references of the Triton kernels (dequantize, then matmul; one expert after another).

Pure torch, any device, no Triton: the kernels are tested against these, and the CPU paths may call them.
Same layout contracts as the kernels (see `engine.kernels.triton`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.model.moe import swiglu
from engine.weights.formats import dequantize_fp4, dequantize_fp8_block


def fp8_block_linear_ref(x: Tensor, w_fp8: Tensor, w_scale: Tensor, block: int = 128) -> Tensor:
    """y [M, N] = x [M, K] @ dequant(w_fp8 [N, K], w_scale [ceil(N/block), ceil(K/block)])^T, fp32 math, x's dtype."""
    w = dequantize_fp8_block(_as_e4m3(w_fp8), w_scale, dtype=torch.float32)
    return (x.float() @ w.t()).to(x.dtype)


def moe_grouped_gemm_ref(x_sorted: Tensor, w: Tensor, expert_offsets: Tensor, w_scale: Tensor | None = None,
                         w3: Tensor | None = None, w3_scale: Tensor | None = None, swiglu_limit: float | None = None,
                         row_weight: Tensor | None = None) -> Tensor:
    """Expert after expert: rows offsets[e-1]:offsets[e] of x_sorted times expert e's weight (dequantized to fp32).

    Without `w3`: y = x_e @ w[e]^T. With `w3` (the SwiGLU pair, w = w1): y = silu(min(g, limit)) *
    clamp(u, -limit, limit) with g = x_e @ w1[e]^T, u = x_e @ w3[e]^T. `row_weight [T]` multiplies each row of
    the result. Rows at or past offsets[-1] are zero. Output [T, N] in x_sorted's dtype.
    """
    ends = expert_offsets.tolist()
    out = torch.zeros(x_sorted.shape[0], w.shape[1], dtype=torch.float32, device=x_sorted.device)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            xe = x_sorted[start:end].float()
            y = xe @ _dequant_expert(w, w_scale, e).t()
            if w3 is not None:
                u = xe @ _dequant_expert(w3, w3_scale, e).t()
                y = swiglu(y, u, float("inf") if swiglu_limit is None else swiglu_limit)
            if row_weight is not None:
                y = y * row_weight[start:end, None].float()
            out[start:end] = y
        start = max(start, end)
    return out.to(x_sorted.dtype)


def _dequant_expert(w: Tensor, scale: Tensor | None, e: int) -> Tensor:
    if scale is None:
        return w[e].float()
    return dequantize_fp4(w[e], scale[e], dtype=torch.float32)


def _as_e4m3(w: Tensor) -> Tensor:
    return w.view(torch.float8_e4m3fn) if w.dtype == torch.uint8 else w
