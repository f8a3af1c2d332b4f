"""EPLB placement (comm/eplb.py) against DeepSeek's published example and the algorithm's invariants;
the expert load window and balancedness metric (comm/expert_load.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from comm.eplb import balanced_packing, rank_load, rebalance_experts, replicate_experts
from comm.expert_load import ExpertLoadWindow, balancedness

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


# --- comm/expert_load.py ---


@dataclass(frozen=True)
class _Tables:
    """The three fields balancedness reads from a placement."""

    phy2log: torch.Tensor
    logcnt: torch.Tensor
    ep_size: int


def _tables(phy2log: list[list[int]], num_experts: int, ep_size: int) -> _Tables:
    p = torch.tensor(phy2log)
    cnt = torch.stack([torch.bincount(row, minlength=num_experts) for row in p])
    return _Tables(p, cnt, ep_size)


def test_window_counts_tokens_per_expert_and_ignores_minus_one():
    w = ExpertLoadWindow(num_layers=2, num_experts=4, window_steps=3)
    w.record(0, torch.tensor([[0, 1], [1, 3], [-1, -1]]))
    w.record(0, torch.tensor([[1, 2]]))  # a second call in the same step adds up
    w.record(1, torch.tensor([[3, 3]], dtype=torch.int32))
    assert w.load().tolist() == [[0] * 4, [0] * 4], "nothing counts until the step ends"
    w.end_step()
    assert w.load().tolist() == [[1, 3, 1, 1], [0, 0, 0, 2]]
    assert w.load().dtype == torch.int64 and w.steps == 1


def test_window_keeps_only_the_last_window_steps():
    w = ExpertLoadWindow(num_layers=1, num_experts=3, window_steps=2)
    for expert in (0, 1, 2, 2):
        w.record(0, torch.full((5, 1), expert))
        w.end_step()
    # Steps 3 and 4 (experts 2 and 2) remain; 0 and 1 left the window.
    assert w.load().tolist() == [[0, 0, 10]]
    w.end_step()  # an empty step pushes one out
    assert w.load().tolist() == [[0, 0, 5]]


def test_window_empty_and_bad_input():
    w = ExpertLoadWindow(2, 4, 8)
    w.end_step()
    assert w.load().tolist() == [[0] * 4] * 2
    w.record(1, torch.empty(0, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="layer 2 is outside"):
        w.record(2, torch.zeros(1, 6, dtype=torch.int64))
    w.end_step()
    assert w.load().tolist() == [[0] * 4] * 2 and w.steps == 2
    # Bad ids are checked once per step, at end_step (record stays free of host reads); the bad step's
    # counts are dropped and the window keeps the steps before it.
    w.record(0, torch.tensor([[0, 1]]))
    w.end_step()
    w.record(0, torch.tensor([[0, 4]]))
    w.record(1, torch.tensor([[2, 2]]))
    with pytest.raises(ValueError, match="expert id 4 >= num_experts 4"):
        w.end_step()
    assert w.load().tolist() == [[1, 1, 0, 0], [0] * 4] and w.steps == 3
    w.record(0, torch.tensor([[0, -2]]))
    with pytest.raises(ValueError, match="expert id -2 < -1"):
        w.end_step()
    w.record(1, torch.tensor([[3, -1]]))  # a clean step after a bad one counts as usual
    w.end_step()
    assert w.load().tolist() == [[1, 1, 0, 0], [0, 0, 0, 1]] and w.steps == 4
    with pytest.raises(ValueError, match="integer expert ids"):
        w.record(0, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="window_steps must be a positive int"):
        ExpertLoadWindow(2, 4, 0)


class _OpNames(TorchDispatchMode):
    """Records the name of every aten op a region runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_window_record_reads_nothing_back_and_has_fixed_shapes():
    """record runs inside the static decode step: no scalar read, no bincount/nonzero (bad ids included);
    they are caught by end_step's range check, once per step."""
    w = ExpertLoadWindow(2, 4, 2)
    w.record(0, torch.zeros(0, dtype=torch.int64))  # allocates the counters, as the EP engine does
    with _OpNames() as rec:
        w.record(0, torch.tensor([[0, 3], [-1, 7], [2, -5]]))
    bad = ("_local_scalar_dense", "bincount", "nonzero", "unique", "masked_select")
    assert rec.names and not [n for n in rec.names if any(b in n for b in bad)], rec.names
    with _OpNames() as probe:  # control: the mode sees a scalar read and a bincount
        torch.tensor([1, 2]).max().item()
        torch.bincount(torch.tensor([1, 2]))
    assert sum(any(b in n for b in bad) for n in probe.names) == 2, probe.names
    with pytest.raises(ValueError, match="expert id -5 < -1"):  # the bad ids recorded above, checked here
        w.end_step()


def test_balancedness_static_placement_by_hand():
    # 4 experts on 2 ranks, two slots each: rank 0 = experts 0, 1; rank 1 = experts 2, 3.
    tables = _tables([[0, 1, 2, 3]], 4, 2)
    load = torch.tensor([[30, 10, 5, 15]])
    (row,) = balancedness(load, tables)
    assert row["layer"] == 0
    assert row["mean_tokens_per_rank"] == 30.0  # (40 + 20) / 2
    assert row["max_tokens_per_rank"] == 40.0
    assert row["balancedness"] == pytest.approx(0.75)


def test_balancedness_splits_a_replicated_expert():
    # Experts 0 and 3 have a replica on each rank: their tokens split evenly over the two replicas.
    # rank 0 holds experts (0, 1, 3), rank 1 holds (0, 2, 3).
    tables = _tables([[0, 1, 3, 0, 2, 3]], 4, 2)
    load = torch.tensor([[30, 10, 5, 16]])
    (row,) = balancedness(load, tables)
    # rank 0: 15 + 10 + 8 = 33; rank 1: 15 + 5 + 8 = 28.
    assert row["max_tokens_per_rank"] == 33.0
    assert row["mean_tokens_per_rank"] == 30.5
    assert row["balancedness"] == pytest.approx(30.5 / 33)


def test_balancedness_empty_layer_and_shape_mismatch():
    tables = _tables([[0, 1], [1, 0]], 2, 2)
    rows = balancedness(torch.tensor([[0, 0], [4, 4]]), tables)
    assert [r["balancedness"] for r in rows] == [1.0, 1.0]
    with pytest.raises(ValueError, match="does not match"):
        balancedness(torch.zeros(3, 2), tables)


def test_eplb_from_measured_load_improves_balancedness():
    # Skewed routing measured by the window; EPLB with 4 redundant slots beats the static layout.
    gen = torch.Generator().manual_seed(0)
    w = ExpertLoadWindow(num_layers=1, num_experts=16, window_steps=4)
    probs = torch.ones(16)
    probs[3] = 30.0
    for _ in range(4):
        w.record(0, torch.multinomial(probs, 256 * 2, replacement=True, generator=gen).view(256, 2))
        w.end_step()
    load = w.load()
    static = balancedness(load, _tables([list(range(16))], 16, 4))[0]["balancedness"]
    phy2log, _, logcnt = rebalance_experts(load, 20, 1, 1, 4)
    tuned = balancedness(load, _Tables(phy2log, logcnt, 4))[0]["balancedness"]
    assert static < 0.45 and tuned > 0.75  # measured: about 0.33 and 0.79


def test_balancedness_with_placement_tables():
    from comm.placement import Placement

    load = torch.tensor([[30, 10, 5, 15], [1, 1, 1, 1]])
    placement = Placement.from_phy2log(torch.tensor([[0, 1, 2, 3], [0, 2, 1, 3]]), ep_size=2)
    rows = balancedness(load, placement)
    assert [r["max_tokens_per_rank"] for r in rows] == [40.0, 2.0]
    # EPLB's tables are accepted as a Placement as they are.
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    eplb = Placement.from_phy2log(phy2log, ep_size=8, num_experts=12)
    assert torch.equal(eplb.logcnt, logcnt)
    assert balancedness(README_WEIGHT, eplb)[0]["balancedness"] > balancedness(
        README_WEIGHT, Placement.static(2, 12, 8, redundant=4))[0]["balancedness"]
