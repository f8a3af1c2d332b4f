"""Expert placement from measured expert load: DeepSeek's EPLB algorithm, in our own code.

The algorithm is the one published in deepseek-ai/EPLB (`eplb.py`, README "The Algorithm"):

- Hierarchical policy (used when the nodes divide the expert groups): pack whole expert groups onto
  nodes so node loads are balanced (group-limited routing keeps a token's experts on few nodes), then
  inside each node replicate the heaviest experts until the node's slots are full, then pack the node's
  physical experts onto its GPUs.
- Global policy (otherwise): the same routine with one group and one node: replicate over all slots,
  then pack the physical experts onto all GPUs.

"Packing" is greedy balanced packing with an equal number of items per pack: items in descending weight
order each go to the lightest pack that still has room. "Replicating" repeatedly gives one more replica
to the logical expert with the largest load per replica; a replica's load is its expert's load divided by
the expert's replica count.

Vocabulary (as in comm/placement.py): a layer has E logical experts and P physical slots; ``phy2log[l, p]``
is the logical expert in slot p; ``logcnt[l, e]`` counts e's replicas; ``log2phy[l, e, k]`` is the slot of
e's k-th replica (-1 padded). GPU g holds slots [g * P/G, (g+1) * P/G).
"""

from __future__ import annotations

import torch
from torch import Tensor


def balanced_packing(weight: Tensor, num_packs: int) -> tuple[Tensor, Tensor]:
    """Pack the n items of each row into ``num_packs`` packs of exactly n / num_packs items each.

    Items are taken heaviest first (ties: lower index first) and each goes to the lightest pack that still
    has room (ties: lower pack index). Returns ``pack[X, n]`` (pack of each item) and ``slot[X, n]`` (the
    item's position inside its pack, in the order it was placed).
    """
    rows, n = weight.shape
    if num_packs <= 0 or n % num_packs != 0:
        raise ValueError(f"balanced_packing: {n} items cannot be split evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:
        items = torch.arange(n, dtype=torch.int64)
        return items.repeat(rows, 1), torch.zeros(rows, n, dtype=torch.int64)
    order = torch.sort(weight.double(), dim=-1, descending=True, stable=True).indices.tolist()
    values = weight.double().tolist()
    pack = torch.empty(rows, n, dtype=torch.int64)
    slot = torch.empty(rows, n, dtype=torch.int64)
    for r in range(rows):
        load = [0.0] * num_packs
        fill = [0] * num_packs
        for item in order[r]:
            best = -1
            for p in range(num_packs):
                if fill[p] < per_pack and (best < 0 or load[p] < load[best]):
                    best = p
            pack[r, item] = best
            slot[r, item] = fill[best]
            load[best] += values[r][item]
            fill[best] += 1
    return pack, slot


def replicate_experts(weight: Tensor, num_phy: int) -> tuple[Tensor, Tensor, Tensor]:
    """Spread ``num_log`` logical experts of each row over ``num_phy >= num_log`` physical experts.

    Physical expert i < num_log is logical expert i; each further one is a replica of the logical expert
    with the largest load per replica at that moment (ties: lowest expert id). Returns ``phy2log[X, num_phy]``,
    ``replica[X, num_phy]`` (which replica of its logical expert each physical expert is, from 0) and
    ``logcnt[X, num_log]``.
    """
    rows, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"replicate_experts: {num_phy} physical experts cannot hold {num_log} logical experts")
    load = weight.double()
    phy2log = torch.empty(rows, num_phy, dtype=torch.int64)
    phy2log[:, :num_log] = torch.arange(num_log, dtype=torch.int64)
    replica = torch.zeros(rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(rows, num_log, dtype=torch.int64)
    row_ids = torch.arange(rows)
    for p in range(num_log, num_phy):
        hottest = torch.argmax(load / logcnt, dim=-1)
        phy2log[:, p] = hottest
        replica[:, p] = logcnt[row_ids, hottest]
        logcnt[row_ids, hottest] += 1
    return phy2log, replica, logcnt


def _place(weight: Tensor, num_phy: int, num_groups: int, num_nodes: int,
           num_gpus: int) -> tuple[Tensor, Tensor, Tensor]:
    """Hierarchical placement; returns (phy2log [L, P], replica index of each slot [L, P], logcnt [L, E])."""
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    phy_per_node = num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # 1. Whole groups onto nodes. Node n lists its experts group by group in the order the groups were
    #    placed: node_expert[l, n * log_per_node + j] is the logical id of node n's j-th expert.
    group_load = weight.view(num_layers, num_groups, group_size).sum(-1)
    group_node, group_pos = balanced_packing(group_load, num_nodes)
    first_expert = (group_node * groups_per_node + group_pos) * group_size  # [L, groups], node-major index
    node_index = (first_expert.unsqueeze(-1) + torch.arange(group_size)).view(num_layers, num_log)
    node_expert = torch.empty_like(node_index)
    node_expert.scatter_(1, node_index, torch.arange(num_log).expand(num_layers, num_log).contiguous())

    # 2. Replicate inside each node; one row per (layer, node).
    node_load = weight.gather(1, node_expert).view(num_layers * num_nodes, log_per_node)
    phy2local, replica, local_cnt = replicate_experts(node_load, phy_per_node)

    # 3. The node's physical experts onto its GPUs, weighted by load per replica.
    phy_load = (node_load / local_cnt).gather(1, phy2local)
    gpu, pos = balanced_packing(phy_load, gpus_per_node)
    slot_of_phy = gpu * phy_per_gpu + pos  # slot inside the node
    phy_of_slot = torch.empty_like(slot_of_phy)
    phy_of_slot.scatter_(1, slot_of_phy, torch.arange(phy_per_node).expand_as(slot_of_phy).contiguous())

    # Back to global ids: a node-local expert j of node n is node_expert[l, n * log_per_node + j].
    local_of_slot = phy2local.gather(1, phy_of_slot).view(num_layers, num_nodes, phy_per_node)
    local_of_slot = local_of_slot + (torch.arange(num_nodes) * log_per_node).view(1, num_nodes, 1)
    phy2log = node_expert.gather(1, local_of_slot.view(num_layers, num_phy))
    slot_replica = replica.gather(1, phy_of_slot).view(num_layers, num_phy)
    logcnt = local_cnt.view(num_layers, num_log).gather(1, node_index)
    return phy2log, slot_replica, logcnt


def _check(weight: Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"rebalance_experts: weight must be a 2-D tensor [layers, experts], got {shape}")
    num_layers, num_log = weight.shape
    if num_layers == 0 or num_log == 0:
        raise ValueError(f"rebalance_experts: weight is empty: shape {tuple(weight.shape)}")
    if weight.is_complex() or weight.dtype == torch.bool:
        raise ValueError(f"rebalance_experts: weight must be real numbers, got dtype {weight.dtype}")
    w = weight.double()
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("rebalance_experts: weight must be finite and non-negative (token counts or loads)")
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"rebalance_experts: {name} must be a positive int, got {value!r}")
    if num_replicas < num_log:
        raise ValueError(f"rebalance_experts: num_replicas={num_replicas} is fewer than the {num_log} logical "
                         f"experts; every logical expert needs at least one slot")
    if num_gpus % num_nodes != 0:
        raise ValueError(f"rebalance_experts: num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if num_replicas % num_gpus != 0:
        raise ValueError(f"rebalance_experts: num_replicas={num_replicas} must be a multiple of "
                         f"num_gpus={num_gpus} (equal slots per GPU)")
    if num_groups % num_nodes == 0 and num_log % num_groups != 0:
        raise ValueError(f"rebalance_experts: {num_log} experts cannot be split into num_groups={num_groups} "
                         f"equal groups")


def rebalance_experts(weight: Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[Tensor, Tensor, Tensor]:
    """Place ``num_replicas`` physical experts per layer on ``num_gpus`` GPUs from measured expert load.

    Parameters:
        weight: [layers, experts] load per logical expert (e.g. tokens routed in a recent window).
        num_replicas: physical slots per layer, a multiple of ``num_gpus``, at least ``experts``.
        num_groups: expert groups (group-limited routing); the hierarchical policy needs ``experts``
            divisible by it.
        num_nodes: server nodes (fast links inside a node); ``num_gpus`` must be a multiple.
        num_gpus: GPUs (EP ranks) in all.

    Returns ``phy2log [L, P]``, ``log2phy [L, E, R]`` (-1 padded, R = largest replica count) and
    ``logcnt [L, E]``, all int64 on the CPU. Uses the hierarchical policy when ``num_groups % num_nodes == 0``,
    else the global policy.
    """
    _check(weight, num_replicas, num_groups, num_nodes, num_gpus)
    load = weight.detach().double().cpu()
    if num_groups % num_nodes == 0:
        phy2log, replica, logcnt = _place(load, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, replica, logcnt = _place(load, num_replicas, 1, 1, num_gpus)
    num_layers, num_log = load.shape
    width = int(logcnt.max())
    log2phy = torch.full((num_layers, num_log * width), -1, dtype=torch.int64)
    log2phy.scatter_(1, phy2log * width + replica, torch.arange(num_replicas).expand(num_layers, -1).contiguous())
    return phy2log, log2phy.view(num_layers, num_log, width), logcnt


def replica_load(weight: Tensor, phy2log: Tensor, logcnt: Tensor) -> Tensor:
    """Load of each physical slot [L, P]: its logical expert's load split evenly over that expert's replicas."""
    return (weight.double() / logcnt.double()).gather(1, phy2log)


def rank_load(weight: Tensor, phy2log: Tensor, logcnt: Tensor, num_ranks: int) -> Tensor:
    """Load of each rank [L, num_ranks]: the sum of its slots' replica loads (slots split evenly over ranks)."""
    per_slot = replica_load(weight, phy2log, logcnt)
    num_layers, num_phy = per_slot.shape
    if num_phy % num_ranks != 0:
        raise ValueError(f"rank_load: {num_phy} slots cannot be split evenly over {num_ranks} ranks")
    return per_slot.view(num_layers, num_ranks, num_phy // num_ranks).sum(-1)


__all__ = ["balanced_packing", "rank_load", "rebalance_experts", "replica_load", "replicate_experts"]
