"""``sync``: the reference. One count exchange, then one blocking all-to-all each way; shared expert after."""

from __future__ import annotations

import torch
from torch import Tensor

from comm.backends.base import DispatchBackend
from comm.backends.exchange import Exchange, make_plan
from comm.backends.pipeline import ExpertFn, SharedFn, run_pipeline
from comm.placement import Placement


class SyncBackend(DispatchBackend):
    def run(self, ex: Exchange, placement: Placement, layer: int, x: Tensor, topk_idx: Tensor,
            topk_weights: Tensor, expert_fn: ExpertFn, shared_fn: SharedFn | None) -> Tensor:
        phys = placement.route(layer, topk_idx)
        plan = make_plan(phys, topk_weights, torch.zeros_like(phys), 1, placement.slots_per_rank, ex.ep_size)
        return run_pipeline(ex, plan, x, expert_fn, shared_fn, overlapped=False)
