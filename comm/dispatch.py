"""Expert-parallel dispatch/combine for one MoE layer call, through a backend chosen by name.

    d = Dispatcher(placement, ep_rank, ep_size, backend="sync", group=None, num_waves=None, **options)
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

Backends are registered by name (comm.backends.registry; the contract is comm.backends.base): ``sync``
(count exchange, one blocking all-to-all each way: the reference), ``tbo`` (two micro-batches in the layer;
engine.model.model goes further and drives whole forwards of two micro-batches through ``begin``/``finish``),
``wave`` (MegaMoE waves of local slots; option ``num_waves``), ``ll`` (fixed capacity per destination, no
count exchange, no host sync; options ``max_tokens_per_rank``, ``capacity``), and any backend registered with
``register_backend``. ``options`` are the backends' keyword options: each backend gets the ones its
capabilities name, an option no registered backend takes is an error. All produce the same result up to
float32 summation order. Every rank must call with the same ``layer`` sequence, even with T == 0, and drive
staged calls (``begin``/``run_experts``/``finish``) in the same order as its peers.

Statistics (what helper B's bench reads): ``d.last_stats`` is a ``DispatchStats`` for the last call,
``d.totals`` accumulates over calls until ``d.reset_stats()``. Fields: calls, tokens (T), assignments_sent
/ assignments_recv (token-expert pairs), collectives (all-to-all calls incl. the count exchange),
bytes_sent / bytes_recv (all payload incl. the rows a rank sends itself), bytes_sent_remote /
bytes_recv_remote (only to/from other ranks), wait_s (seconds blocked waiting on communication).
Dispatch rows are D*itemsize + 8 bytes (slot int32, weight f32), combine rows D*itemsize. A host-sync-free
backend (``ll``) counts received assignments on the device; ``as_dict()`` folds that count in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch.distributed as dist
from torch import Tensor

from comm.backends.base import DispatchBackend, Staged
from comm.backends.exchange import Exchange
from comm.backends.pipeline import ExpertFn, SharedFn
from comm.backends.registry import (
    Capabilities,
    UnknownBackendError,
    backend_capabilities,
    backend_names,
    backend_options,
    get_backend,
    register_backend,
    unregister_backend,
)
from comm.placement import Placement

__all__ = ["Capabilities", "DispatchBackend", "DispatchStats", "Dispatcher", "UnknownBackendError",
           "backend_capabilities", "backend_names", "get_backend", "register_backend", "unregister_backend"]


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

    def __post_init__(self) -> None:
        self._recv_on_device: Tensor | None = None  # received assignments not yet added to assignments_recv

    def count_recv_later(self, n: Tensor) -> None:
        """Add a device-side count of received assignments without reading it now (no host sync)."""
        self._recv_on_device = n if self._recv_on_device is None else self._recv_on_device + n

    def settle(self) -> None:
        """Fold the device-side counts into ``assignments_recv`` (reads them: a host sync)."""
        if self._recv_on_device is not None:
            self.assignments_recv += int(self._recv_on_device)
            self._recv_on_device = None

    def add(self, other: DispatchStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        if other._recv_on_device is not None:
            self.count_recv_later(other._recv_on_device)

    def as_dict(self) -> dict:
        self.settle()
        return asdict(self)


class Dispatcher:
    """Dispatch/combine for one EP group; ``placement`` may be replaced between steps (``set_placement``).

    ``backend``: a registered name (``backend_names()``). ``num_waves`` and ``options``: backend options (module
    docstring); ``None`` values count as not given. ``self.impl`` is the backend instance, ``self.capabilities``
    what it declared.
    """

    def __init__(self, placement: Placement, ep_rank: int, ep_size: int, backend: str = "sync", group=None,
                 num_waves: int | None = None, **options: Any) -> None:
        caps = backend_capabilities(backend)  # UnknownBackendError (a ValueError) names the registered ones
        given = {k: v for k, v in {"num_waves": num_waves, **options}.items() if v is not None}
        unknown = sorted(set(given) - backend_options())
        if unknown:
            raise ValueError(f"dispatch options {unknown}: no registered backend takes them (known: "
                             f"{sorted(backend_options())})")
        if not isinstance(ep_size, int) or ep_size < 1 or not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank {ep_rank!r} / ep_size {ep_size!r}: need 0 <= ep_rank < ep_size")
        if dist.is_available() and dist.is_initialized():
            gsize, grank = dist.get_world_size(group), dist.get_rank(group)
            if (gsize, grank) != (ep_size, ep_rank):
                raise ValueError(f"ep_rank/ep_size {ep_rank}/{ep_size} disagree with the process group "
                                 f"(rank {grank} of {gsize})")
        elif ep_size > 1:
            raise RuntimeError(f"ep_size={ep_size} needs an initialised torch.distributed process group")
        self.impl: DispatchBackend = get_backend(backend)(**{k: v for k, v in given.items() if k in caps.options})
        self.backend, self.capabilities = backend, caps
        self.ep_rank, self.ep_size, self.group = ep_rank, ep_size, group
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
        """Shapes and devices; expert ids too unless the backend is host-sync free (reading them is a sync:
        there an id outside the table fails in the routing lookup instead)."""
        if x.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape != topk_weights.shape \
                or topk_idx.shape[0] != x.shape[0]:
            raise ValueError(f"shapes: x {tuple(x.shape)} must be [T, D], topk_idx {tuple(topk_idx.shape)} and "
                             f"topk_weights {tuple(topk_weights.shape)} both [T, k]")
        if x.device.type not in self.capabilities.devices:
            raise ValueError(f"EP backend {self.backend!r} runs on {self.capabilities.devices}, got a tensor on "
                             f"{x.device}")
        if not self.capabilities.host_sync_free and topk_idx.numel() \
                and (int(topk_idx.min()) < 0 or int(topk_idx.max()) >= self.placement.num_experts):
            raise ValueError(f"topk_idx holds ids outside [0, {self.placement.num_experts})")

    def _exchange(self, x: Tensor) -> Exchange:
        return Exchange(self.group, self.ep_rank, self.ep_size, DispatchStats(calls=1, tokens=int(x.shape[0])))

    def begin(self, layer: int, x: Tensor, topk_idx: Tensor, topk_weights: Tensor,
              token_offset: int = 0) -> Staged:
        """Start one call in stages (any backend): the tokens leave asynchronously.

        ``token_offset``: index of this micro-batch's first token in the rank's batch (replica choice).
        Continue with ``fl.run_experts(expert_fn)`` and ``self.finish(fl)``.
        """
        self._check(x, topk_idx, topk_weights)
        return self.impl.begin(self._exchange(x), self.placement, layer, x, topk_idx, topk_weights, token_offset)

    def finish(self, fl: Staged) -> Tensor:
        """Wait for a staged call's results: the routed sum [T, D] in x.dtype (stats recorded here)."""
        y = fl.finish()
        self._record(fl.ex.stats)
        return y

    def __call__(self, layer: int, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, expert_fn: ExpertFn,
                 shared_fn: SharedFn | None = None) -> Tensor:
        self._check(x, topk_idx, topk_weights)
        ex = self._exchange(x)
        y = self.impl.run(ex, self.placement, layer, x, topk_idx, topk_weights, expert_fn, shared_fn)
        self._record(ex.stats)
        return y

    def _record(self, stats: DispatchStats) -> None:
        self.last_stats = stats
        self.totals.add(stats)
