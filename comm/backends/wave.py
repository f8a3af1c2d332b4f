"""``wave``: the MegaMoE schedule over local expert slots.

Every rank's S local slots are cut into ``num_waves`` contiguous waves (the same cut on every rank). An
assignment belongs to the wave of its destination slot. Tokens for all waves are launched asynchronously
in wave order and the shared expert runs while the first wave's tokens travel; then wave k computes while
wave k+1's tokens are in flight, and wave k's results travel back while wave k+1 computes.
Option: ``num_waves`` (default DEFAULT_NUM_WAVES; at most one wave per slot is used).
"""

from __future__ import annotations

from torch import Tensor

from comm.backends.base import DispatchBackend
from comm.backends.exchange import Exchange, make_plan
from comm.backends.pipeline import ExpertFn, SharedFn, run_pipeline
from comm.placement import Placement

DEFAULT_NUM_WAVES = 4


def waves_for(slots_per_rank: int, num_waves: int | None) -> int:
    """The wave count actually used: at most one wave per slot."""
    n = DEFAULT_NUM_WAVES if num_waves is None else num_waves
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_waves must be an int >= 1, got {n!r}")
    return min(n, slots_per_rank)


class WaveBackend(DispatchBackend):
    def __init__(self, num_waves: int | None = None) -> None:
        waves_for(1, num_waves)  # validates
        self.num_waves = num_waves

    def run(self, ex: Exchange, placement: Placement, layer: int, x: Tensor, topk_idx: Tensor,
            topk_weights: Tensor, expert_fn: ExpertFn, shared_fn: SharedFn | None) -> Tensor:
        phys = placement.route(layer, topk_idx)
        s = placement.slots_per_rank
        w = waves_for(s, self.num_waves)
        wave = (phys % s) * w // s
        plan = make_plan(phys, topk_weights, wave, w, s, ex.ep_size)
        return run_pipeline(ex, plan, x, expert_fn, shared_fn, overlapped=True)
