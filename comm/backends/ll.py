"""``ll``: fixed capacity per destination rank (the contract of DeepEP's low-latency kernels).

No count exchange and no host synchronisation: every rank sends every rank (itself included) exactly C rows
in one ``all_to_all_single`` with equal splits, and gets C rows back from each in one more. Nothing inside
dispatch or combine reads device data on the host or makes a shape from it (no ``.item()``, ``.tolist()``,
nonzero, boolean-mask indexing), so an EP decode step can be captured in a CUDA graph.

Capacity: ``C = capacity`` when given, else ``max_tokens_per_rank * k`` (k = top-k, from topk_idx's shape). A
token sends at most k rows to one destination, so a call with ``T * k <= C`` never overflows. That is checked
on the host from shapes before anything is sent (and ``T <= max_tokens_per_rank`` when that is set); a larger
batch raises ValueError: no token is ever dropped. Every rank must use the same C (same options, same k).

Send buffer ``[ep_size * C, row]``: destination r's block is rows [r*C, (r+1)*C); its first n_r rows are this
rank's assignments to r in (token, k) order, the rest padding. Position within a block: a stable sort by
destination and a cumulative count (fixed shapes). Rows are packed as by the other backends (activation
bytes, slot int32, weight float32); a padding row has zero activations, weight 0 and slot -1 on the wire.

Padding and ``expert_fn``: the receiver hands ``expert_fn`` all ``ep_size * C`` rows, padding rows with slot 0
(a valid slot) and weight 0. They are computed, not masked: their outputs are never read back (the combine
gathers only the rows of real assignments), so ``expert_fn`` needs no mask but spends compute on them.
Results are summed per token in float32 in the same order as ``sync`` (by destination rank, then k).

Stats: bytes and collectives count the fixed buffers (2 collectives, no count exchange); ``assignments_recv``
is a device-side count of the real rows, folded into the stats when they are read (``DispatchStats.as_dict``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from comm.backends.base import DispatchBackend
from comm.backends.exchange import Exchange, as_bytes, from_bytes, pack_dispatch, unpack_dispatch
from comm.backends.pipeline import ExpertFn, SharedFn
from comm.placement import Placement


class LowLatencyBackend(DispatchBackend):
    """Options: ``max_tokens_per_rank`` (the most tokens a rank passes in one call) and/or ``capacity`` (rows
    per destination rank; default ``max_tokens_per_rank * k``). At least one is needed."""

    def __init__(self, max_tokens_per_rank: int | None = None, capacity: int | None = None) -> None:
        for key, v in (("max_tokens_per_rank", max_tokens_per_rank), ("capacity", capacity)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"ll backend: {key} must be an int >= 1, got {v!r}")
        if max_tokens_per_rank is None and capacity is None:
            raise ValueError("ll backend: needs max_tokens_per_rank (capacity = max_tokens_per_rank x top-k) or "
                             "capacity (rows per destination rank)")
        self.max_tokens_per_rank, self.capacity = max_tokens_per_rank, capacity

    def capacity_for(self, topk: int) -> int:
        """Rows per destination rank for calls with ``topk`` experts per token."""
        return self.capacity if self.capacity is not None else self.max_tokens_per_rank * topk

    def begin(self, ex: Exchange, placement: Placement, layer: int, x: Tensor, topk_idx: Tensor,
              topk_weights: Tensor, token_offset: int = 0) -> FixedCapacityCall:
        t, k = topk_idx.shape
        cap = self.capacity_for(k)
        if self.max_tokens_per_rank is not None and t > self.max_tokens_per_rank:
            raise ValueError(f"ll backend: {t} tokens in one call, more than max_tokens_per_rank="
                             f"{self.max_tokens_per_rank}")
        if t * k > cap:
            raise ValueError(f"ll backend: {t} tokens x top-{k} = {t * k} assignments could exceed the capacity "
                             f"of {cap} rows per destination rank; raise capacity or max_tokens_per_rank")
        return FixedCapacityCall.launch(ex, placement, layer, x, topk_idx, topk_weights, token_offset, cap)

    def run(self, ex: Exchange, placement: Placement, layer: int, x: Tensor, topk_idx: Tensor,
            topk_weights: Tensor, expert_fn: ExpertFn, shared_fn: SharedFn | None) -> Tensor:
        call = self.begin(ex, placement, layer, x, topk_idx, topk_weights)
        shared = shared_fn(x) if shared_fn is not None else None  # while the tokens travel
        call.run_experts(expert_fn)
        y = call.finish()
        return y if shared is None else y + shared


class FixedCapacityCall:
    """One ``ll`` call in stages (comm.backends.base.Staged): launch, run_experts, finish."""

    def __init__(self, ex: Exchange, x: Tensor, capacity: int, row: Tensor, tok: Tensor, got: Tensor, handle):
        self.ex, self.capacity = ex, capacity
        self.t, self.dim, self.dtype, self.device = x.shape[0], x.shape[1], x.dtype, x.device
        self.row = row  # [N] buffer row of the j-th assignment in send order (sorted by destination)
        self.tok = tok  # [N] its source token
        self._got, self._handle = got, handle
        self._back: Tensor | None = None
        self.stage = "dispatched"

    @classmethod
    def launch(cls, ex: Exchange, placement: Placement, layer: int, x: Tensor, topk_idx: Tensor,
               topk_weights: Tensor, token_offset: int, capacity: int) -> FixedCapacityCall:
        t, k = topk_idx.shape
        n, w, s, dev = t * k, ex.ep_size, placement.slots_per_rank, x.device
        phys = placement.route(layer, topk_idx, token_offset).reshape(n)  # [N]
        dest = torch.div(phys, s, rounding_mode="floor")  # [N] destination rank
        order = torch.argsort(dest, stable=True)  # [N] send order: by destination, then (token, k)
        dest_sorted = dest.index_select(0, order)
        count = torch.zeros(w, dtype=torch.int64, device=dev).scatter_add_(0, dest, torch.ones_like(dest))
        first = torch.cumsum(count, 0) - count  # [W] send-order index of each destination's first row
        row = dest_sorted * capacity + torch.arange(n, device=dev) - first.index_select(0, dest_sorted)
        tok = torch.div(order, k, rounding_mode="floor")
        rows = pack_dispatch(x.index_select(0, tok), (phys % s).index_select(0, order),
                             topk_weights.reshape(n).index_select(0, order))
        send = pack_dispatch(x.new_zeros(w * capacity, x.shape[1]),
                             torch.full((w * capacity,), -1, dtype=torch.int32, device=dev),
                             torch.zeros(w * capacity, dtype=torch.float32, device=dev))
        send.index_copy_(0, row, rows)
        ex.stats.assignments_sent += n
        got, handle = ex.start(send, [capacity] * w, [capacity] * w, async_op=True)
        return cls(ex, x, capacity, row, tok, got, handle)

    def run_experts(self, expert_fn: ExpertFn) -> None:
        """Wait for the tokens, run ``expert_fn`` on every received row (padding included), send results back."""
        if self.stage != "dispatched":
            raise RuntimeError(f"run_experts called in stage {self.stage!r}")
        self.ex.wait(self._handle)
        xs, slot, weight = unpack_dispatch(self._got, self.dim, self.dtype)
        self._got = None
        self.ex.stats.count_recv_later((slot >= 0).sum())
        y = expert_fn(xs, slot.clamp(min=0), weight)  # padding: slot -1 on the wire -> 0, weight 0
        if tuple(y.shape) != tuple(xs.shape):
            raise ValueError(f"expert_fn returned shape {tuple(y.shape)} for {xs.shape[0]} rows of width "
                             f"{self.dim}; expected {tuple(xs.shape)}")
        w = self.ex.ep_size
        self._back, self._handle = self.ex.start(as_bytes(y.to(self.dtype)), [self.capacity] * w,
                                                 [self.capacity] * w, async_op=True)
        self.stage = "combining"

    def finish(self) -> Tensor:
        """Wait for the results: the routed sum [T, D] in x.dtype."""
        if self.stage != "combining":
            raise RuntimeError(f"finish called in stage {self.stage!r}")
        self.ex.wait(self._handle)
        vals = from_bytes(self._back, self.dim, self.dtype).index_select(0, self.row).float()  # [N] send order
        out = torch.zeros(self.t, self.dim, dtype=torch.float32, device=self.device)
        out.index_add_(0, self.tok, vals)
        self._back = None
        self.stage = "done"
        return out.to(self.dtype)
