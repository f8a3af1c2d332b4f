"""EPLB placement (comm/eplb.py) against DeepSeek's published example and the algorithm's invariants."""

from __future__ import annotations

import pytest
import torch

from comm.eplb import balanced_packing, rank_load, rebalance_experts, replicate_experts

# The worked example of deepseek-ai/EPLB, README.md ("Example"; eplb.py at d52c72d, 2025-03-24):
# 2 MoE layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs (hierarchical policy), and the
# phy2log the README prints for it.
README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                               [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def _check_tables(phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, num_log: int) -> None:
    """phy2log, log2phy and logcnt describe one and the same placement."""
    num_layers, num_phy = phy2log.shape
    assert logcnt.shape == (num_layers, num_log)
    assert log2phy.shape == (num_layers, num_log, int(logcnt.max()))
    assert bool((logcnt >= 1).all()), "every logical expert needs a replica"
    assert torch.equal(logcnt.sum(-1), torch.full((num_layers,), num_phy))
    for layer in range(num_layers):
        counted = torch.bincount(phy2log[layer], minlength=num_log)
        assert torch.equal(counted, logcnt[layer])
        for e in range(num_log):
            slots = log2phy[layer, e]
            n = int(logcnt[layer, e])
            assert bool((slots[n:] == -1).all())
            assert bool((phy2log[layer, slots[:n]] == e).all())
            assert len(set(slots[:n].tolist())) == n


def test_published_example_exact():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert torch.equal(phy2log, README_PHY2LOG)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    _check_tables(phy2log, log2phy, logcnt, 12)
    # The hot experts got the four redundant slots in each layer.
    assert torch.equal(logcnt[0], torch.tensor([1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]))
    assert torch.equal(logcnt[1], torch.tensor([1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]))


def test_hierarchical_keeps_each_group_on_one_node():
    phy2log, _, _ = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    group_size, slots_per_node = 3, 8
    for layer in range(2):
        for group in range(4):
            experts = range(group * group_size, (group + 1) * group_size)
            nodes = {p // slots_per_node for p in range(16) if int(phy2log[layer, p]) in experts}
            assert len(nodes) == 1, f"layer {layer} group {group} is split over nodes {nodes}"


def test_global_policy_worked_by_hand():
    # 3 groups do not divide over 2 nodes -> global policy. Expert 0 is hot: both redundant slots go to
    # it (10 > 1, then 10/2 > 1), so each of its 3 replicas carries 10/3. Packing onto 2 GPUs, 3 slots
    # each, heaviest first, ties to the lower GPU: phys 0 -> g0, 4 -> g1, 5 -> g0 (3.33 vs 3.33),
    # 1 -> g1, 2 -> g1 (g1 5.33 < g0 6.67), 3 -> g0 (g1 full).
    weight = torch.tensor([[10.0, 1.0, 1.0, 1.0]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 6, 3, 2, 2)
    assert phy2log.tolist() == [[0, 0, 3, 0, 1, 2]]
    assert logcnt.tolist() == [[3, 1, 1, 1]]
    assert log2phy.tolist() == [[[0, 3, 1], [4, -1, -1], [5, -1, -1], [2, -1, -1]]]
    loads = rank_load(weight, phy2log, logcnt, 2)
    assert torch.allclose(loads, torch.tensor([[10 / 3 * 2 + 1, 10 / 3 + 2]], dtype=torch.float64))


def test_global_policy_differs_from_hierarchical_on_readme_weights():
    # 3 groups over 2 nodes -> global policy, no group/node constraint.
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 3, 2, 8)
    _check_tables(phy2log, log2phy, logcnt, 12)
    # Global replication picks the 4 largest loads per replica over the whole layer.
    _, _, want_cnt = replicate_experts(README_WEIGHT.double(), 16)
    assert torch.equal(logcnt, want_cnt)
    hier, _, _ = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert not torch.equal(phy2log, hier)
    # Global is at least as balanced as the node-constrained placement on these weights.
    g_max = rank_load(README_WEIGHT, phy2log, logcnt, 8).max(-1).values
    h_cnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)[2]
    h_max = rank_load(README_WEIGHT, hier, h_cnt, 8).max(-1).values
    assert bool((g_max <= h_max + 1e-9).all())


@pytest.mark.parametrize("num_log,groups,nodes,gpus,replicas", [
    (40, 8, 2, 4, 48),  # hierarchical, 2 nodes x 2 GPUs
    (32, 8, 4, 8, 48),  # hierarchical, 4 nodes x 2 GPUs
    (24, 3, 2, 4, 32),  # global: 3 groups over 2 nodes
    (32, 1, 1, 4, 32),  # no redundancy
    (32, 4, 1, 1, 40),  # one GPU holds everything
    (40, 5, 2, 2, 44),  # global, groups not divisible by nodes
])
def test_invariants_random_loads(num_log: int, groups: int, nodes: int, gpus: int, replicas: int):
    gen = torch.Generator().manual_seed(groups * 100 + replicas)
    weight = torch.randint(0, 1000, (3, num_log), generator=gen)
    phy2log, log2phy, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus)
    assert phy2log.shape == (3, replicas)
    _check_tables(phy2log, log2phy, logcnt, num_log)
    # Equal slots per rank, and the total load is conserved when split over replicas.
    per_rank = rank_load(weight, phy2log, logcnt, gpus)
    assert per_rank.shape == (3, gpus)
    assert torch.allclose(per_rank.sum(-1), weight.double().sum(-1))


def test_replicas_split_a_hot_expert():
    # One expert takes almost all tokens: with 4 redundant slots it gets them all, each replica
    # carries a fifth of its load, and the busiest rank gets far less than with no redundancy.
    weight = torch.ones(1, 16)
    weight[0, 5] = 1000.0
    phy2log, log2phy, logcnt = rebalance_experts(weight, 20, 1, 1, 4)
    assert int(logcnt[0, 5]) == 5
    assert int(logcnt.sum()) == 20
    hot_slots = log2phy[0, 5].tolist()
    assert {p // 5 for p in hot_slots} == {0, 1, 2, 3}, "every rank shares the hot expert's load"
    balanced = rank_load(weight, phy2log, logcnt, 4).max()
    static = rank_load(weight, torch.arange(16).view(1, 16), torch.ones(1, 16, dtype=torch.int64), 4).max()
    assert float(static) == 1003.0
    assert float(balanced) < 0.5 * float(static)


def test_balanced_packing_equal_items_and_greedy_order():
    weight = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 3.0]])
    pack, slot = balanced_packing(weight, 3)
    assert torch.equal(torch.bincount(pack[0], minlength=3), torch.tensor([2, 2, 2]))
    # 5 -> p0, 4 -> p1, 3 (item 4) -> p2, 3 (item 5) -> p2 (lightest with room: p2 has 3 < 4 < 5),
    # 2 -> p1 (4 < 5), 1 -> p0.
    assert pack.tolist() == [[0, 0, 1, 1, 2, 2]]
    assert slot.tolist() == [[0, 1, 0, 1, 0, 1]]
    one, zero = balanced_packing(weight, 6)
    assert one.tolist() == [[0, 1, 2, 3, 4, 5]] and zero.tolist() == [[0] * 6]


@pytest.mark.parametrize("args,match", [
    ((torch.ones(12), 16, 4, 2, 8), "2-D"),
    ((torch.ones(2, 12), 10, 4, 2, 2), "fewer than the 12 logical"),
    ((torch.ones(2, 12), 16, 4, 2, 3), "num_gpus=3 must be a multiple of num_nodes=2"),
    ((torch.ones(2, 12), 18, 4, 2, 4), "num_replicas=18 must be a multiple of num_gpus=4"),
    ((torch.ones(2, 12), 16, 8, 2, 8), "cannot be split into num_groups=8"),
    ((torch.ones(2, 12), 16, 0, 2, 8), "num_groups must be a positive int"),
    ((torch.ones(2, 12), 16.0, 4, 2, 8), "num_replicas must be a positive int"),
    ((-torch.ones(2, 12), 16, 4, 2, 8), "non-negative"),
    ((torch.full((2, 12), float("nan")), 16, 4, 2, 8), "finite"),
    ((torch.ones(0, 12), 16, 4, 2, 8), "empty"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(*args)
