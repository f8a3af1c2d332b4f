"""Move expert weights between EP ranks when one MoE layer's placement changes (after an EPLB rebalance).

Every rank knows the old and the new ``phy2log`` row of the layer, so every rank computes the same
transfer plan without talking (`plan_moves`):

- a new slot whose logical expert the destination rank already holds (in any of its old slots) is filled
  by a local copy: no traffic;
- otherwise one holder of that expert sends it once per destination rank (two new replicas of the same
  expert on one rank share one transfer); among the holders the one with the fewest sends so far is
  chosen (ties: the lower rank), which spreads the traffic of a hot expert over its replicas.

`move_expert_weights` then runs the plan: one message per (source, destination) pair that has anything to
move, carrying every tensor of every moved expert as raw bytes (so FP8, MXFP4-packed and scale tensors
travel unchanged on gloo and NCCL alike), through one batch of point-to-point sends and receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Transfer:
    """One expert sent from ``src`` (its old local slot ``src_slot``) to rank ``dst``."""

    expert: int
    src: int
    src_slot: int
    dst: int


@dataclass(frozen=True)
class MovePlan:
    """How one layer's new slots get their weights.

    ``local[r]``: (new local slot, old local slot) copies on rank r. ``transfers``: experts crossing ranks,
    sorted by (dst, src, expert) so both ends agree on the order inside each message. ``fill[r]``:
    (new local slot, logical expert) for the slots rank r fills from what it receives.
    """

    slots_per_rank: int
    local: tuple[tuple[tuple[int, int], ...], ...]
    transfers: tuple[Transfer, ...]
    fill: tuple[tuple[tuple[int, int], ...], ...]

    def sends(self, src: int, dst: int) -> list[Transfer]:
        """What ``src`` sends ``dst``, in message order."""
        return [t for t in self.transfers if t.src == src and t.dst == dst]


def _as_row(name: str, row: Tensor) -> list[int]:
    row = torch.as_tensor(row)
    if row.dim() != 1 or row.dtype.is_floating_point or row.dtype == torch.bool or row.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D integer tensor [P], got {row.dtype} {tuple(row.shape)}")
    out = row.tolist()
    if min(out) < 0:
        raise ValueError(f"{name} holds a negative expert id ({min(out)})")
    return out


def plan_moves(old_phy2log_layer: Tensor, new_phy2log_layer: Tensor, ep_size: int) -> MovePlan:
    """The transfer plan for one layer (a pure function of the two tables, so identical on every rank)."""
    old = _as_row("old_phy2log_layer", old_phy2log_layer)
    new = _as_row("new_phy2log_layer", new_phy2log_layer)
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive int, got {ep_size!r}")
    if len(old) != len(new):
        raise ValueError(f"old and new phy2log rows differ in length: {len(old)} vs {len(new)} physical slots")
    if len(new) % ep_size:
        raise ValueError(f"{len(new)} physical slots are not divisible by ep_size={ep_size}")
    missing = sorted(set(new) - set(old))
    if missing:
        raise ValueError(f"new placement needs logical experts {missing} that no rank holds in the old placement")
    s = len(new) // ep_size
    holders: dict[int, dict[int, int]] = {}  # expert -> {rank: its first old local slot holding the expert}
    for p, e in enumerate(old):
        holders.setdefault(e, {}).setdefault(p // s, p % s)

    sent = [0] * ep_size
    local: list[tuple[tuple[int, int], ...]] = []
    fill: list[tuple[tuple[int, int], ...]] = []
    transfers: list[Transfer] = []
    for dst in range(ep_size):
        copies, remote, fetched = [], [], set()
        for j in range(s):
            e = new[dst * s + j]
            here = holders[e].get(dst)
            if here is not None:
                copies.append((j, here))
                continue
            remote.append((j, e))
            if e not in fetched:
                fetched.add(e)
                src = min(holders[e], key=lambda r: (sent[r], r))
                sent[src] += 1
                transfers.append(Transfer(e, src, holders[e][src], dst))
        local.append(tuple(copies))
        fill.append(tuple(remote))
    transfers.sort(key=lambda t: (t.dst, t.src, t.expert))
    return MovePlan(s, tuple(local), tuple(transfers), tuple(fill))


def _rows_as_bytes(t: Tensor) -> Tensor:
    """[S, ...] of any dtype -> [S, bytes per slot] uint8; a view when ``t`` is contiguous, else a copy."""
    t = t.contiguous()
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    return t.view(torch.uint8).reshape(t.shape[0], -1)


def _global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


def move_expert_weights(slot_tensors: dict[str, Tensor], old_phy2log_layer: Tensor, new_phy2log_layer: Tensor,
                        ep_rank: int, ep_size: int, group: dist.ProcessGroup | None = None) -> dict[str, Tensor]:
    """Collective: give this rank the weights of its slots under ``new_phy2log_layer``.

    ``slot_tensors`` maps a weight name to this rank's stacked per-slot tensor [S, ...] under the old table
    (S = P // ep_size; every rank passes the same names, per-slot shapes and dtypes). Every rank of
    ``group`` (the default group when None) must call this with the same tables. Returns new tensors
    [S, ...] (same names, dtypes, device); slot j holds the weights of logical expert
    ``new_phy2log_layer[ep_rank * S + j]``. The inputs are not modified.
    """
    if not slot_tensors:
        raise ValueError("move_expert_weights: slot_tensors is empty; pass the stacked per-slot weights by name")
    plan = plan_moves(old_phy2log_layer, new_phy2log_layer, ep_size)
    s = plan.slots_per_rank
    if isinstance(ep_rank, bool) or not isinstance(ep_rank, int) or not 0 <= ep_rank < ep_size:
        raise ValueError(f"move_expert_weights: ep_rank {ep_rank!r} is outside [0, {ep_size})")
    devices = {t.device for t in slot_tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"move_expert_weights: slot tensors live on several devices {sorted(map(str, devices))}")
    for name, t in slot_tensors.items():
        if t.dim() < 1 or t.shape[0] != s:
            raise ValueError(f"move_expert_weights: {name!r} has shape {tuple(t.shape)}; expected [{s}, ...] "
                             f"({len(plan.fill) * s} slots over {ep_size} ranks)")
    if ep_size > 1 and not dist.is_initialized():
        raise RuntimeError("move_expert_weights: ep_size > 1 needs an initialised torch.distributed process group")
    if ep_size > 1:
        if dist.get_world_size(group) != ep_size or dist.get_rank(group) != ep_rank:
            raise ValueError(f"move_expert_weights: ep_rank/ep_size {ep_rank}/{ep_size} disagree with the process "
                             f"group ({dist.get_rank(group)}/{dist.get_world_size(group)})")

    device = next(iter(devices))
    names = list(slot_tensors)
    # All moves happen on byte views [S, bytes per slot]: one code path for every dtype (FP8 has no index ops).
    src_rows = {n: _rows_as_bytes(slot_tensors[n]) for n in names}
    out = {n: torch.empty(t.shape, dtype=t.dtype, device=device) for n, t in slot_tensors.items()}
    out_rows = {n: _rows_as_bytes(out[n]) for n in names}  # views: writing them fills `out`
    if plan.local[ep_rank]:
        new_idx = torch.tensor([j for j, _ in plan.local[ep_rank]], device=device)
        old_idx = torch.tensor([i for _, i in plan.local[ep_rank]], device=device)
        for n in names:
            out_rows[n].index_copy_(0, new_idx, src_rows[n].index_select(0, old_idx))

    row_bytes = [src_rows[n].shape[1] for n in names]
    ops: list[dist.P2POp] = []
    inbox: list[tuple[list[int], Tensor]] = []
    for peer in range(ep_size):
        if peer == ep_rank:
            continue
        outgoing = plan.sends(ep_rank, peer)
        if outgoing:
            idx = torch.tensor([t.src_slot for t in outgoing], device=device)
            payload = torch.cat([src_rows[n].index_select(0, idx) for n in names], dim=1)
            ops.append(dist.P2POp(dist.isend, payload.reshape(-1), _global_rank(group, peer), group))
        incoming = plan.sends(peer, ep_rank)
        if incoming:
            buf = torch.empty(len(incoming) * sum(row_bytes), dtype=torch.uint8, device=device)
            ops.append(dist.P2POp(dist.irecv, buf, _global_rank(group, peer), group))
            inbox.append(([t.expert for t in incoming], buf))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    received: dict[int, list[Tensor]] = {}  # expert -> its rows (one per name), as bytes
    for experts, buf in inbox:
        columns = buf.view(len(experts), sum(row_bytes)).split(row_bytes, dim=1)
        for row, e in enumerate(experts):
            received[e] = [col[row] for col in columns]
    for j, e in plan.fill[ep_rank]:
        for n, raw in zip(names, received[e]):
            out_rows[n][j].copy_(raw)
    return out


__all__ = ["MovePlan", "Transfer", "move_expert_weights", "plan_moves"]
