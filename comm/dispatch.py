"""Expert-parallel dispatch/combine for one MoE layer call, with three backends chosen by name.

    d = Dispatcher(placement, ep_rank, ep_size, backend="sync" | "tbo" | "wave", group=None, num_waves=None)
    y = d(layer, x, topk_idx, topk_weights, expert_fn, shared_fn=None)     # collective: every rank calls it

    fl = d.begin(layer, x, topk_idx, topk_weights, token_offset=0)          # staged form of one call (no
    fl.run_experts(expert_fn); y = d.finish(fl)                             # shared expert), to interleave
                                                                            # micro-batches (model-level tbo)

Inputs per rank: ``x [T, D]`` (T may be 0), ``topk_idx [T, k]`` logical expert ids, ``topk_weights [T, k]``.
Each assignment goes to the replica ``placement.route`` picks (token_index % logcnt), i.e. to rank
``phys // S`` and its local slot ``phys % S``. ``expert_fn(x_rows [N, D], slot [N] int64, weight [N] f32)
-> [N, D]`` runs this rank's local experts: row i is ``weight[i] * Expert_slot[i](x_rows[i])`` (weight
applied where the model applies it). ``shared_fn(x) -> [T, D]`` is the optional shared expert, which the
overlapping backends run while tokens travel. Returns ``sum_k w_k Expert(x) (+ shared_fn(x))`` in x.dtype.
comm never imports engine: the model passes the callables.

Backends (comm/backends/): ``sync`` — counts all-to-all, then one blocking variable-size all-to-all each
way (the reference); ``tbo`` — two micro-batches of tokens, one in flight while the other computes
(engine.model.model goes further for a whole forward: it splits the sequences into two micro-batches and drives
them layer by layer through ``begin``/``finish``, so attention overlaps communication too; the in-layer split
here serves the MTP block and direct calls); ``wave`` — MegaMoE schedule over waves of local slots.
All produce the same result up to float32 summation order. Every rank must call with the same ``layer``
sequence, even with T == 0, and drive staged calls (``begin``/``run_experts``/``finish``) in the same order
as its peers.

Statistics (what helper B's bench reads): ``d.last_stats`` is a ``DispatchStats`` for the last call,
``d.totals`` accumulates over calls until ``d.reset_stats()``. Fields: calls, tokens (T), assignments_sent
/ assignments_recv (token-expert pairs), collectives (all-to-all calls incl. the count exchange),
bytes_sent / bytes_recv (all payload incl. the rows a rank sends itself), bytes_sent_remote /
bytes_recv_remote (only to/from other ranks), wait_s (seconds blocked waiting on communication).
Dispatch rows are D*itemsize + 8 bytes (slot int32, weight f32), combine rows D*itemsize.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor

from comm.backends import sync, tbo, wave
from comm.backends.exchange import Exchange, make_plan
from comm.backends.inflight import InFlight
from comm.backends.pipeline import ExpertFn, SharedFn
from comm.placement import Placement

BACKENDS = ("sync", "tbo", "wave")


@dataclass
class DispatchStats:
    """Communication counters of one call (``last_stats``) or summed over calls (``totals``)."""

    calls: int = 0
    tokens: int = 0
    assignments_sent: int = 0
    assignments_recv: int = 0
    collectives: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    bytes_sent_remote: int = 0
    bytes_recv_remote: int = 0
    wait_s: float = 0.0

    def add(self, other: DispatchStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        return asdict(self)


class Dispatcher:
    """Dispatch/combine for one EP group; ``placement`` may be replaced between steps (``set_placement``)."""

    def __init__(self, placement: Placement, ep_rank: int, ep_size: int, backend: str = "sync", group=None,
                 num_waves: int | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: must be one of {BACKENDS}")
        if not isinstance(ep_size, int) or ep_size < 1 or not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank {ep_rank!r} / ep_size {ep_size!r}: need 0 <= ep_rank < ep_size")
        if dist.is_available() and dist.is_initialized():
            gsize, grank = dist.get_world_size(group), dist.get_rank(group)
            if (gsize, grank) != (ep_size, ep_rank):
                raise ValueError(f"ep_rank/ep_size {ep_rank}/{ep_size} disagree with the process group "
                                 f"(rank {grank} of {gsize})")
        elif ep_size > 1:
            raise RuntimeError(f"ep_size={ep_size} needs an initialised torch.distributed process group")
        if backend == "wave":
            wave.waves_for(placement.slots_per_rank, num_waves)  # validates num_waves
        self.backend, self.ep_rank, self.ep_size, self.group = backend, ep_rank, ep_size, group
        self.num_waves = num_waves
        self.set_placement(placement)
        self.last_stats = DispatchStats()
        self.totals = DispatchStats()

    def set_placement(self, placement: Placement) -> None:
        if placement.ep_size != self.ep_size:
            raise ValueError(f"placement is for ep_size={placement.ep_size}, this dispatcher has {self.ep_size}")
        self.placement = placement

    def reset_stats(self) -> None:
        self.totals = DispatchStats()

    def _check(self, x: Tensor, topk_idx: Tensor, topk_weights: Tensor) -> None:
        if x.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape != topk_weights.shape \
                or topk_idx.shape[0] != x.shape[0]:
            raise ValueError(f"shapes: x {tuple(x.shape)} must be [T, D], topk_idx {tuple(topk_idx.shape)} and "
                             f"topk_weights {tuple(topk_weights.shape)} both [T, k]")
        if topk_idx.numel() and (int(topk_idx.min()) < 0 or int(topk_idx.max()) >= self.placement.num_experts):
            raise ValueError(f"topk_idx holds ids outside [0, {self.placement.num_experts})")

    def begin(self, layer: int, x: Tensor, topk_idx: Tensor, topk_weights: Tensor,
              token_offset: int = 0) -> InFlight:
        """Start one call in stages (any backend name): count exchange, then the tokens leave asynchronously.

        ``token_offset``: index of this micro-batch's first token in the rank's batch (replica choice).
        Continue with ``fl.run_experts(expert_fn)`` and ``self.finish(fl)``.
        """
        self._check(x, topk_idx, topk_weights)
        stats = DispatchStats(calls=1, tokens=int(x.shape[0]))
        ex = Exchange(self.group, self.ep_rank, self.ep_size, stats)
        phys = self.placement.route(layer, topk_idx, token_offset)
        plan = make_plan(phys, topk_weights, torch.zeros_like(phys), 1, self.placement.slots_per_rank,
                         self.ep_size)
        return InFlight.launch(ex, plan, x)

    def finish(self, fl: InFlight) -> Tensor:
        """Wait for a staged call's results: the routed sum [T, D] in x.dtype (stats recorded here)."""
        y = fl.finish()
        self.last_stats = fl.ex.stats
        self.totals.add(fl.ex.stats)
        return y

    def __call__(self, layer: int, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, expert_fn: ExpertFn,
                 shared_fn: SharedFn | None = None) -> Tensor:
        self._check(x, topk_idx, topk_weights)
        stats = DispatchStats(calls=1, tokens=int(x.shape[0]))
        ex = Exchange(self.group, self.ep_rank, self.ep_size, stats)
        if self.backend == "sync":
            y = sync.run(ex, self.placement, layer, x, topk_idx, topk_weights, expert_fn, shared_fn)
        elif self.backend == "tbo":
            y = tbo.run(ex, self.placement, layer, x, topk_idx, topk_weights, expert_fn, shared_fn)
        else:
            y = wave.run(ex, self.placement, layer, x, topk_idx, topk_weights, expert_fn, shared_fn,
                         num_waves=self.num_waves)
        self.last_stats = stats
        self.totals.add(stats)
        return y
