"""One MoE call split into stages, so a caller can interleave two micro-batches (model-level ``tbo``).

    fl = InFlight.launch(ex, plan, x)     # count exchange, dispatch all-to-all launched asynchronously
    ...                                   # caller computes something else (the other micro-batch)
    fl.run_experts(expert_fn)             # wait for the tokens, run local experts, launch the combine
    ...
    y = fl.finish()                       # wait for the results: routed sum [T, D] in x.dtype

Every rank must drive its InFlights through the same stages in the same order (the collectives pair up by
issue order). Uses a one-chunk Plan (comm.backends.exchange.make_plan with a single chunk).
"""

from __future__ import annotations

import torch
from torch import Tensor

from comm.backends.exchange import Exchange, Plan, as_bytes, from_bytes, pack_dispatch
from comm.backends.pipeline import ExpertFn, run_local_experts


class InFlight:
    def __init__(self, ex: Exchange, plan: Plan, x: Tensor, send: list[int], recv: list[int], got, handle):
        self.ex, self.plan, self.send, self.recv = ex, plan, send, recv
        self.t, self.dim, self.dtype, self.device = x.shape[0], x.shape[1], x.dtype, x.device
        self._got, self._handle = got, handle
        self._back = None
        self.stage = "dispatched"

    @classmethod
    def launch(cls, ex: Exchange, plan: Plan, x: Tensor) -> InFlight:
        if plan.send.shape[0] != 1:
            raise ValueError(f"InFlight takes a one-chunk plan, got {plan.send.shape[0]} chunks")
        recv = ex.counts(plan.send, x.device)
        send_splits, recv_splits = plan.send[0].tolist(), recv[0].tolist()
        ex.stats.assignments_sent += sum(send_splits)
        ex.stats.assignments_recv += sum(recv_splits)
        rows = pack_dispatch(x[plan.tok], plan.slot.to(x.device), plan.weight.to(x.device))
        got, h = ex.start(rows, send_splits, recv_splits, async_op=True)
        return cls(ex, plan, x, send_splits, recv_splits, got, h)

    def run_experts(self, expert_fn: ExpertFn) -> None:
        if self.stage != "dispatched":
            raise RuntimeError(f"run_experts called in stage {self.stage!r}")
        self.ex.wait(self._handle)
        y = run_local_experts(expert_fn, self._got, self.dim, self.dtype)
        self._got = None
        self._back, self._handle = self.ex.start(as_bytes(y), self.recv, self.send, async_op=True)
        self.stage = "combining"

    def finish(self) -> Tensor:
        if self.stage != "combining":
            raise RuntimeError(f"finish called in stage {self.stage!r}")
        self.ex.wait(self._handle)
        out = torch.zeros(self.t, self.dim, dtype=torch.float32, device=self.device)
        out.index_add_(0, self.plan.tok.to(self.device), from_bytes(self._back, self.dim, self.dtype).float())
        self._back = None
        self.stage = "done"
        return out.to(self.dtype)
