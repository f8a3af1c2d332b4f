"""``tbo``: two-batch overlap inside the MoE layer.

The rank's tokens are split into two micro-batches (first ceil(T/2) tokens, the rest). Both dispatches are
launched asynchronously; the shared expert runs while they travel; micro-batch 0's experts run while
micro-batch 1's tokens are still in flight, and micro-batch 0's results travel back while micro-batch 1
computes. Replica choice uses each token's index in the whole batch, as ``sync`` does, so both backends
send every assignment to the same slot. Attention is not split here (the overlap is within the MoE layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from comm.backends.base import DispatchBackend
from comm.backends.exchange import Exchange, make_plan
from comm.backends.pipeline import ExpertFn, SharedFn, run_pipeline
from comm.placement import Placement


class TwoBatchBackend(DispatchBackend):
    def run(self, ex: Exchange, placement: Placement, layer: int, x: Tensor, topk_idx: Tensor,
            topk_weights: Tensor, expert_fn: ExpertFn, shared_fn: SharedFn | None) -> Tensor:
        phys = placement.route(layer, topk_idx)
        t = topk_idx.shape[0]
        micro = (torch.arange(t, device=phys.device) >= (t + 1) // 2).long().unsqueeze(1).expand_as(phys)
        plan = make_plan(phys, topk_weights, micro, 2, placement.slots_per_rank, ex.ep_size)
        return run_pipeline(ex, plan, x, expert_fn, shared_fn, overlapped=True)
