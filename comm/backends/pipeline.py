"""Run a Plan through dispatch -> local experts -> combine, chunk by chunk, blocking or overlapped.

``overlapped=False`` (sync): per chunk, a blocking dispatch, the experts, a blocking combine.
``overlapped=True`` (tbo, wave): every chunk's dispatch is launched asynchronously up front (chunk 0 first,
so it arrives first), the shared expert runs while they travel, then for each chunk in order: wait for its
tokens, run the experts, launch its combine asynchronously — chunk c+1's tokens travel while chunk c
computes and chunk c's results travel back while chunk c+1 computes. Results are summed per source token
in float32, in send order, so every backend performs the same additions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from comm.backends.exchange import Exchange, Plan, as_bytes, from_bytes, pack_dispatch, unpack_dispatch

ExpertFn = Callable[[Tensor, Tensor, Tensor], Tensor]
SharedFn = Callable[[Tensor], Tensor]


def run_local_experts(expert_fn: ExpertFn, rows: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    if rows.shape[0] == 0:
        return rows.new_empty((0, dim), dtype=dtype)
    xs, slot, weight = unpack_dispatch(rows, dim, dtype)
    y = expert_fn(xs, slot, weight)
    if tuple(y.shape) != (rows.shape[0], dim):
        raise ValueError(f"expert_fn returned shape {tuple(y.shape)} for {rows.shape[0]} rows of width {dim}; "
                         f"expected {(rows.shape[0], dim)}")
    return y.to(dtype)


def run_pipeline(ex: Exchange, plan: Plan, x: Tensor, expert_fn: ExpertFn, shared_fn: SharedFn | None,
                 overlapped: bool) -> Tensor:
    """-> routed (+ shared) output [T, D] in x.dtype."""
    t, dim = x.shape
    dtype = x.dtype
    recv = ex.counts(plan.send, x.device)  # [C, ep_size]
    send_splits = plan.send.tolist()
    recv_splits = recv.tolist()
    rows = pack_dispatch(x[plan.tok], plan.slot.to(x.device), plan.weight.to(x.device))
    bounds = [0, *torch.cumsum(plan.send.sum(1), 0).tolist()]
    chunks = range(len(send_splits))
    ex.stats.assignments_sent += bounds[-1]
    ex.stats.assignments_recv += int(recv.sum())
    out = torch.zeros(t, dim, dtype=torch.float32, device=x.device)
    shared = None
    if not overlapped:
        for c in chunks:
            got, h = ex.start(rows[bounds[c]:bounds[c + 1]], send_splits[c], recv_splits[c], async_op=False)
            ex.wait(h)
            y = run_local_experts(expert_fn, got, dim, dtype)
            back, h = ex.start(as_bytes(y), recv_splits[c], send_splits[c], async_op=False)
            ex.wait(h)
            out.index_add_(0, plan.tok[bounds[c]:bounds[c + 1]].to(x.device), from_bytes(back, dim, dtype).float())
    else:
        inflight = [ex.start(rows[bounds[c]:bounds[c + 1]], send_splits[c], recv_splits[c], async_op=True)
                    for c in chunks]
        if shared_fn is not None:
            shared = shared_fn(x)
        returning = []
        for c in chunks:
            got, h = inflight[c]
            ex.wait(h)
            y = run_local_experts(expert_fn, got, dim, dtype)
            returning.append(ex.start(as_bytes(y), recv_splits[c], send_splits[c], async_op=True))
        for c in chunks:
            back, h = returning[c]
            ex.wait(h)
            out.index_add_(0, plan.tok[bounds[c]:bounds[c + 1]].to(x.device), from_bytes(back, dim, dtype).float())
    y = out.to(dtype)
    if shared_fn is not None:
        y = y + (shared if shared is not None else shared_fn(x))
    return y
