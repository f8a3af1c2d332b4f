"""Expert placement: which logical expert each physical slot holds, per MoE layer (the EPLB vocabulary).

    phy2log [L, P]     logical expert of physical slot p in layer l
    log2phy [L, E, R]  the physical slots holding logical expert e, ascending, padded with -1
    logcnt  [L, E]     number of replicas of e (>= 1)

P physical slots split evenly over ``ep_size`` ranks: S = P // ep_size, rank r holds slots [r*S, (r+1)*S).
A token's replica of logical expert e in layer l: ``phys = log2phy[l, e, token_index % logcnt[l, e]]``
(``Placement.route``), so the choice is deterministic and spreads a batch over the replicas.

Public API:
    Placement.static(num_layers, num_experts, ep_size, redundant=0, policy="round_robin" | "contiguous")
    Placement.from_phy2log(phy2log, ep_size, num_experts=None)        (e.g. from comm.eplb.rebalance_experts)
    p.local_logical(layer, rank) -> list[int]   (one logical id per local slot of ``rank``)
    p.local_experts(rank) -> list[int]          (union over layers: what ``rank`` must load)
    p.route(layer, topk_idx, token_offset=0) -> physical slots [T, k]
    p.num_layers / num_experts / num_physical / slots_per_rank / ep_size
Invalid tables raise PlacementError naming the layer and the experts or slots at fault.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

POLICIES = ("round_robin", "contiguous")


class PlacementError(ValueError):
    """A placement table is inconsistent (a logical expert without replica, slots not divisible, ...)."""


def _log2phy_logcnt(phy2log: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    num_layers = phy2log.shape[0]
    logcnt = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    for layer in range(num_layers):
        logcnt[layer] = torch.bincount(phy2log[layer], minlength=num_experts)[:num_experts]
    r = max(1, int(logcnt.max())) if logcnt.numel() else 1
    log2phy = torch.full((num_layers, num_experts, r), -1, dtype=torch.int64)
    for layer in range(num_layers):
        order = torch.argsort(phy2log[layer], stable=True)  # slots grouped by expert, ascending within
        starts = torch.cumsum(logcnt[layer], 0) - logcnt[layer]
        rank_in_expert = torch.arange(order.numel()) - starts[phy2log[layer][order]]
        log2phy[layer, phy2log[layer][order], rank_in_expert] = order
    return log2phy, logcnt


@dataclass(frozen=True, eq=False)
class Placement:
    """Per-layer placement of logical experts on physical slots; build with ``static`` or ``from_phy2log``."""

    phy2log: Tensor
    log2phy: Tensor
    logcnt: Tensor
    ep_size: int

    def __post_init__(self) -> None:
        self._validate()
        object.__setattr__(self, "_on_device", {})  # device -> (log2phy, logcnt) copies used by route

    def __getstate__(self) -> dict:
        return {f: getattr(self, f) for f in ("phy2log", "log2phy", "logcnt", "ep_size")}

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_on_device", {})

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_phy2log(cls, phy2log: Tensor, ep_size: int, num_experts: int | None = None) -> Placement:
        """Derive log2phy/logcnt from ``phy2log [L, P]``; ``num_experts`` defaults to max id + 1."""
        phy2log = torch.as_tensor(phy2log)
        if phy2log.dim() != 2 or phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
            raise PlacementError(f"phy2log must be an integer tensor [L, P], got {phy2log.dtype} "
                                 f"{tuple(phy2log.shape)}")
        phy2log = phy2log.detach().to("cpu", torch.int64).contiguous()
        if phy2log.numel() == 0:
            raise PlacementError(f"phy2log {tuple(phy2log.shape)} is empty: need >= 1 layer and >= 1 slot")
        if int(phy2log.min()) < 0:
            raise PlacementError(f"phy2log holds negative expert ids (min {int(phy2log.min())})")
        e = int(phy2log.max()) + 1 if num_experts is None else int(num_experts)
        if int(phy2log.max()) >= e:
            raise PlacementError(f"phy2log holds expert id {int(phy2log.max())} >= num_experts={e}")
        log2phy, logcnt = _log2phy_logcnt(phy2log, e)
        return cls(phy2log, log2phy, logcnt, int(ep_size))

    @classmethod
    def static(cls, num_layers: int, num_experts: int, ep_size: int, redundant: int = 0,
               policy: str = "round_robin") -> Placement:
        """The same layout in every layer.

        ``round_robin``: expert e on rank e % ep_size; ``contiguous``: slot p < E holds expert p.
        The ``redundant`` extra slots (the free slots, in slot order) each replicate the expert with the fewest
        replicas that is not yet on that rank, ties broken by a rotating expert id — deterministic.
        """
        if policy not in POLICIES:
            raise PlacementError(f"policy {policy!r}: must be one of {POLICIES}")
        for name, v, lo in (("num_layers", num_layers, 1), ("num_experts", num_experts, 1),
                            ("ep_size", ep_size, 1), ("redundant", redundant, 0)):
            if not isinstance(v, int) or v < lo:
                raise PlacementError(f"{name} must be an int >= {lo}, got {v!r}")
        p = num_experts + redundant
        if p % ep_size:
            raise PlacementError(f"num_experts + redundant = {p} physical slots is not divisible by "
                                 f"ep_size={ep_size}")
        s = p // ep_size
        row = [-1] * p
        if policy == "contiguous":
            row[:num_experts] = range(num_experts)
        else:
            for e in range(num_experts):
                row[(e % ep_size) * s + e // ep_size] = e
        count = [1] * num_experts
        for j, slot in enumerate(q for q in range(p) if row[q] < 0):
            rank = slot // s
            here = set(row[rank * s:(rank + 1) * s])
            candidates = sorted(range(num_experts), key=lambda e: (e in here, count[e], (e - j) % num_experts))
            row[slot] = candidates[0]
            count[candidates[0]] += 1
        phy2log = torch.tensor(row, dtype=torch.int64).unsqueeze(0).repeat(num_layers, 1)
        return cls.from_phy2log(phy2log, ep_size, num_experts)

    # ---- shape ------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.logcnt.shape[1])

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.ep_size

    # ---- queries ----------------------------------------------------------------------------------
    def _check(self, layer: int, rank: int | None = None) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} outside [0, {self.num_layers})")
        if rank is not None and not 0 <= rank < self.ep_size:
            raise IndexError(f"rank {rank} outside [0, {self.ep_size})")

    def local_logical(self, layer: int, rank: int) -> list[int]:
        """The logical expert of each of ``rank``'s S slots in ``layer`` (may repeat an expert)."""
        self._check(layer, rank)
        s = self.slots_per_rank
        return self.phy2log[layer, rank * s:(rank + 1) * s].tolist()

    def local_experts(self, rank: int) -> list[int]:
        """Sorted logical experts ``rank`` holds in any layer: the routed experts it has to load."""
        self._check(0, rank)
        s = self.slots_per_rank
        return sorted(set(self.phy2log[:, rank * s:(rank + 1) * s].flatten().tolist()))

    def route(self, layer: int, topk_idx: Tensor, token_offset: int = 0) -> Tensor:
        """Physical slot for every (token, k) of ``topk_idx [T, k]`` (logical ids): replica token_index % logcnt.

        Token i of the batch has token_index ``token_offset + i`` (micro-batches pass their offset).
        """
        self._check(layer)
        dev = topk_idx.device
        if dev not in self._on_device:
            self._on_device[dev] = (self.log2phy.to(dev), self.logcnt.to(dev))
        log2phy, logcnt = self._on_device[dev]
        cnt = logcnt[layer][topk_idx]  # [T, k]
        tok = torch.arange(token_offset, token_offset + topk_idx.shape[0], device=dev).unsqueeze(1)
        return log2phy[layer][topk_idx, tok % cnt]

    def __repr__(self) -> str:
        return (f"Placement(layers={self.num_layers}, experts={self.num_experts}, physical={self.num_physical}, "
                f"ep_size={self.ep_size}, max_replicas={int(self.logcnt.max())})")

    # ---- validation -------------------------------------------------------------------------------
    def _validate(self) -> None:
        p2l, l2p, cnt = self.phy2log, self.log2phy, self.logcnt
        if not isinstance(self.ep_size, int) or self.ep_size < 1:
            raise PlacementError(f"ep_size must be an int >= 1, got {self.ep_size!r}")
        for name, t, dim in (("phy2log", p2l, 2), ("log2phy", l2p, 3), ("logcnt", cnt, 2)):
            if not isinstance(t, Tensor) or t.dim() != dim or t.dtype != torch.int64:
                raise PlacementError(f"{name} must be an int64 tensor with {dim} dims, got "
                                     f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        num_layers, p = p2l.shape
        if l2p.shape[:2] != cnt.shape or cnt.shape[0] != num_layers:
            raise PlacementError(f"shapes disagree: phy2log {tuple(p2l.shape)}, log2phy {tuple(l2p.shape)}, "
                                 f"logcnt {tuple(cnt.shape)}")
        if p % self.ep_size:
            raise PlacementError(f"{p} physical slots are not divisible by ep_size={self.ep_size}")
        e = cnt.shape[1]
        if int(p2l.min()) < 0 or int(p2l.max()) >= e:
            raise PlacementError(f"phy2log ids must lie in [0, {e}), found [{int(p2l.min())}, {int(p2l.max())}]")
        for layer in range(num_layers):
            missing = (cnt[layer] < 1).nonzero().flatten().tolist()
            if missing:
                raise PlacementError(f"layer {layer}: logical experts {missing} have no physical replica")
        expect_l2p, expect_cnt = _log2phy_logcnt(p2l, e)
        if not torch.equal(cnt, expect_cnt):
            bad = (cnt != expect_cnt).nonzero()[0].tolist()
            raise PlacementError(f"logcnt disagrees with phy2log (first at layer {bad[0]}, expert {bad[1]})")
        # log2phy: each expert's replicas in any order, -1 padded; compare as sets.
        r = l2p.shape[2]
        if r < int(cnt.max()):
            raise PlacementError(f"log2phy has {r} replica columns, fewer than max logcnt {int(cnt.max())}")
        ok = torch.sort(torch.where(l2p < 0, torch.full_like(l2p, p), l2p), dim=-1).values
        ref = torch.sort(torch.where(expect_l2p < 0, torch.full_like(expect_l2p, p), expect_l2p), dim=-1).values
        pad = torch.full((num_layers, e, r - ref.shape[2]), p, dtype=torch.int64)
        if not torch.equal(ok, torch.cat([ref, pad], dim=-1)):
            bad = (ok != torch.cat([ref, pad], dim=-1)).any(-1).nonzero()[0].tolist()
            raise PlacementError(f"log2phy disagrees with phy2log at layer {bad[0]}, expert {bad[1]}")
        valid = torch.arange(r).view(1, 1, r) < cnt.unsqueeze(-1)
        if not torch.equal(valid, l2p >= 0):
            raise PlacementError("log2phy must hold each expert's logcnt replicas first, then -1 padding")
