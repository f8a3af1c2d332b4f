"""The routed-expert MLP of one MoE layer through two grouped GEMMs, without a host sync.

    sort the (token, k) assignments by expert -> offsets (cumulative row ends)
    h = row_weight * swiglu(x_sorted w1^T, x_sorted w3^T)     (one launch, fused SwiGLU)
    y = h w2^T                                                (one launch)
    out[token] += y                                           (index_add_)

Every op has a shape fixed by the input shapes (no nonzero, no .item(), counts by scatter_add_, not bincount), so
the whole function can be captured in a CUDA graph. Weights: bf16/fp16/fp32 `[E, I, D]` (w1, w3) and `[E, D, I]`
(w2), or MXFP4 packed bytes with their E8M0 scales (see `moe_grouped_gemm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.kernels.triton import moe_grouped_gemm


@dataclass(frozen=True)
class ExpertWeights:
    """One layer's stacked routed experts: w1, w3 [E, I, D] and w2 [E, D, I] (or MXFP4 [.., K/2] bytes, then the
    three E8M0 scales [.., K/32])."""

    w1: Tensor
    w3: Tensor
    w2: Tensor
    w1_scale: Tensor | None = None
    w3_scale: Tensor | None = None
    w2_scale: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]


def sort_by_expert(topk_idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """topk_idx [T, k] (local expert ids in [0, num_experts), or -1: not on this rank) -> (order [T*k] int64: the
    flat assignment indices sorted by expert, stable, the -1 ones last; offsets [num_experts] int32: cumulative row
    ends, so the -1 rows lie past offsets[-1]). No host sync."""
    flat = topk_idx.reshape(-1)
    flat = torch.where(flat < 0, num_experts, flat)  # dropped assignments: one bucket after the last expert
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, torch.cumsum(counts[:num_experts], 0, dtype=torch.int32)


def routed_experts(x: Tensor, topk_weights: Tensor, topk_idx: Tensor, weights: ExpertWeights, swiglu_limit: float,
                   input_precision: str | None = None) -> Tensor:
    """x [T, D], topk_weights/topk_idx [T, k] -> sum_k w_k * Expert_{idx_k}(x) [T, D] in x's dtype.

    `topk_idx` holds local expert ids (rows of the stacked weights); -1 marks an assignment to an expert this rank
    does not hold (it contributes nothing), e.g. `RoutedExperts.g2l[topk_idx]`. Same math as
    `engine.model.experts.RoutedExperts.forward`: the routing weight multiplies the SwiGLU output before w2; fp32
    accumulation, the SwiGLU in fp32, h stored in x's dtype between the GEMMs. For EP rows that each carry one
    slot (`forward_slots(x, slot, weight)`), pass topk_idx = slot[:, None] and topk_weights = weight[:, None].
    """
    t, k = topk_idx.shape
    order, offsets = sort_by_expert(topk_idx, weights.num_experts)
    tok = order // k
    xs = x.index_select(0, tok)
    rw = topk_weights.reshape(-1).index_select(0, order).float()
    h = moe_grouped_gemm(xs, weights.w1, offsets, w_scale=weights.w1_scale, w3=weights.w3, w3_scale=weights.w3_scale,
                         swiglu_limit=swiglu_limit, row_weight=rw, input_precision=input_precision)
    y = moe_grouped_gemm(h, weights.w2, offsets, w_scale=weights.w2_scale, out_dtype=torch.float32,
                         input_precision=input_precision)
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, tok, y).to(x.dtype)
