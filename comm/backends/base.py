"""The contract of a dispatch/combine backend; ``comm.dispatch.Dispatcher`` drives one, chosen by name.

    @register_backend("mine", Capabilities(...))            # comm.backends.registry
    class Mine(DispatchBackend):
        def __init__(self, **options): ...                  # the options its Capabilities name, validated here
        def run(self, ex, placement, layer, x, topk_idx, topk_weights, expert_fn, shared_fn) -> Tensor: ...
        def begin(...) -> Staged: ...                       # optional: the default is a count-exchange call

The Dispatcher builds one instance (its own options only) and checks shapes, devices and ids before each call;
the placement may change between calls (EPLB), so it comes with every call.

What a call must compute, on every rank, collectively (every rank calls with the same ``layer`` sequence, also
with T == 0): ``x [T, D]``, ``topk_idx [T, k]`` logical experts, ``topk_weights [T, k]``; assignment (t, j) goes
to physical slot ``placement.route(layer, topk_idx, token_offset)[t, j]``, i.e. rank ``phys // S``, local slot
``phys % S``; that rank runs ``expert_fn(rows [N, D], slot [N] int64, weight [N] float32) -> [N, D]`` on the
rows it received (row i = weight_i * Expert_slot_i(x_i)); the results come back and are summed per token in
float32. Returns ``sum_j w_tj Expert(x_t) (+ shared_fn(x))`` as [T, D] in x.dtype; ``shared_fn`` may run while
tokens travel. The ``sync`` backend is the reference every backend is tested against.

``ex`` (comm.backends.exchange.Exchange) is this rank's view of the EP group: ``ex.group`` (None: the default
torch.distributed group), ``ex.ep_rank``, ``ex.ep_size`` and ``ex.stats``, the comm.dispatch.DispatchStats the
backend fills (assignments, collectives, bytes, wait). Its helpers (``counts``, ``start``, ``wait``) run
accounted all-to-alls over torch.distributed; a backend with its own transport uses the group and fills the
stats itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import Tensor

from comm.backends.exchange import Exchange, make_plan
from comm.backends.inflight import InFlight
from comm.backends.pipeline import ExpertFn, SharedFn
from comm.placement import Placement


class Staged(Protocol):
    """One call in stages, so a caller can interleave two micro-batches (model-level two-batch overlap):
    ``begin`` sends the tokens, ``run_experts`` waits for them and starts the results back, ``finish`` waits
    for the results. Every rank drives its staged calls through the same stages in the same order."""

    ex: Exchange

    def run_experts(self, expert_fn: ExpertFn) -> None: ...

    def finish(self) -> Tensor: ...


class DispatchBackend(ABC):
    """Base of every backend; subclasses take their options as keywords in ``__init__`` (none by default)."""

    @abstractmethod
    def run(self, ex: Exchange, placement: Placement, layer: int, x: Tensor, topk_idx: Tensor,
            topk_weights: Tensor, expert_fn: ExpertFn, shared_fn: SharedFn | None) -> Tensor:
        """One MoE layer call (module docstring): the routed sum (+ shared) [T, D] in x.dtype."""

    def begin(self, ex: Exchange, placement: Placement, layer: int, x: Tensor, topk_idx: Tensor,
              topk_weights: Tensor, token_offset: int = 0) -> Staged:
        """Start one call in stages (no shared expert: the caller runs it). ``token_offset``: index of the first
        token in the rank's whole batch (replica choice). Default: a count exchange, then one variable-size
        all-to-all each way, launched asynchronously."""
        phys = placement.route(layer, topk_idx, token_offset)
        plan = make_plan(phys, topk_weights, torch.zeros_like(phys), 1, placement.slots_per_rank, ex.ep_size)
        return InFlight.launch(ex, plan, x)
