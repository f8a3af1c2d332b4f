"""Expert weight moves after a placement change (comm/rebalance.py): the plan, then the collective on gloo."""

from __future__ import annotations

import pytest
import torch

from comm.eplb import rebalance_experts
from comm.launch import run_ranks
from comm.rebalance import move_expert_weights, plan_moves


def _expert_weights(e: int) -> dict[str, torch.Tensor]:
    """Distinct, recognisable weights of logical expert ``e`` in several dtypes and shapes."""
    base = torch.arange(24, dtype=torch.float32).view(4, 6) + 100.0 * e
    return {
        "w13": base,
        "w2_fp8": (base / 64.0 - 1.0).to(torch.float8_e4m3fn),
        "w2_packed": ((torch.arange(12) * 7 + e * 13) % 256).to(torch.uint8).view(4, 3),
        "bias": torch.full((5,), float(e) + 0.5, dtype=torch.bfloat16),
        "count": torch.tensor(e, dtype=torch.int64),  # a per-slot scalar
    }


def _stack(experts: list[int]) -> dict[str, torch.Tensor]:
    per = [_expert_weights(e) for e in experts]
    return {name: torch.stack([w[name] for w in per]) for name in per[0]}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
            return False
    return True


def _scenarios(ep_size: int) -> list[tuple[str, list[int], list[int]]]:
    """(name, old phy2log row, new phy2log row) cases for ``ep_size`` ranks, 4 slots per rank."""
    num_experts = 3 * ep_size  # P = 4 * ep_size: ep_size redundant slots
    num_phy = 4 * ep_size
    # Old: round robin expert e on rank e % ep_size, plus one replica of expert r on each rank r.
    s = 4
    old = [-1] * num_phy
    for e in range(num_experts):
        old[(e % ep_size) * s + e // ep_size] = e
    for r in range(ep_size):
        old[r * s + 3] = (r + 1) % num_experts
    load = torch.ones(1, num_experts)
    load[0, num_experts - 1] = 50.0  # one hot expert
    eplb_new = rebalance_experts(load, num_phy, 1, 1, ep_size)[0][0].tolist()
    shifted = old[s:] + old[:s]  # every slot's weights move one rank down
    swapped_inside = [old[r * s + (3 - j)] for r in range(ep_size) for j in range(s)]  # local only
    return [("eplb", old, eplb_new), ("shift", old, shifted), ("same", old, old),
            ("inside", old, swapped_inside)]


def _move_all(rank: int, world_size: int) -> list[tuple[str, bool, int]]:
    """Rank body: run every scenario, report whether this rank's new slots hold exactly the right weights."""
    report = []
    for name, old, new in _scenarios(world_size):
        s = len(old) // world_size
        mine = _stack(old[rank * s:(rank + 1) * s])
        before = {k: v.clone() for k, v in mine.items()}
        got = move_expert_weights(mine, torch.tensor(old), torch.tensor(new), rank, world_size, None)
        want = _stack(new[rank * s:(rank + 1) * s])
        report.append((name, _same(got, want) and _same(mine, before), len(plan_moves(torch.tensor(old),
                                                                                     torch.tensor(new),
                                                                                     world_size).transfers)))
    return report


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_move_expert_weights_on_gloo(world_size: int):
    results = run_ranks(_move_all, world_size, timeout_s=120)
    for rank, report in enumerate(results):
        for name, ok, _ in report:
            assert ok, f"rank {rank} of {world_size}: wrong weights after the {name!r} move"
    transfers = {name: n for name, _, n in results[0]}
    assert transfers["same"] == 0 and transfers["inside"] == 0
    assert transfers["shift"] > 0 and transfers["eplb"] > 0


def test_plan_prefers_local_copies_and_dedupes():
    # 2 ranks x 3 slots. Rank 0 only permutes what it has; rank 1 keeps expert 3 (a local copy) and needs
    # expert 0 in two slots, which costs one transfer from rank 0's slot 0.
    old = torch.tensor([0, 1, 2, 3, 4, 5])
    plan = plan_moves(old, torch.tensor([1, 0, 2, 0, 3, 0]), 2)
    assert plan.local[0] == ((0, 1), (1, 0), (2, 2))
    assert plan.local[1] == ((1, 0),)
    assert [(t.expert, t.src, t.src_slot, t.dst) for t in plan.transfers] == [(0, 0, 0, 1)]
    assert plan.sends(0, 1) == list(plan.transfers) and plan.sends(1, 0) == []
    assert plan.fill == ((), ((0, 0), (2, 0)))


def test_plan_spreads_a_hot_expert_over_its_holders():
    # 4 ranks x 2 slots; expert 0 lives on ranks 0 and 1 and every other slot of ranks 2, 3 wants it.
    old = torch.tensor([0, 1, 0, 2, 3, 4, 5, 6])
    new = torch.tensor([0, 1, 0, 2, 0, 4, 0, 6])
    plan = plan_moves(old, new, 4)
    assert sorted((t.src, t.dst) for t in plan.transfers) == [(0, 2), (1, 3)]


@pytest.mark.parametrize("old,new,ep,match", [
    ([0, 1, 2, 3], [0, 1, 2, 4], 2, r"logical experts \[4\] that no rank holds"),
    ([0, 1, 2, 3], [0, 1, 2], 2, "differ in length"),
    ([0, 1, 2, 3], [0, 1, 2, 3], 3, "not divisible by ep_size=3"),
    ([0, 1, 2, -1], [0, 1, 2, 3], 2, "negative expert id"),
    ([0, 1, 2, 3], [0, 1, 2, 3], 0, "ep_size must be a positive int"),
])
def test_plan_bad_arguments(old, new, ep, match):
    with pytest.raises(ValueError, match=match):
        plan_moves(torch.tensor(old), torch.tensor(new), ep)


def test_move_single_rank_and_bad_inputs():
    weights = _stack([0, 1, 2])
    got = move_expert_weights(weights, torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0]), 0, 1)
    assert _same(got, _stack([2, 2, 0]))
    with pytest.raises(ValueError, match="expected \\[3, ...\\]"):
        move_expert_weights({"w": torch.zeros(2, 4)}, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 0, 1)
    with pytest.raises(ValueError, match="slot_tensors is empty"):
        move_expert_weights({}, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 0, 1)
    with pytest.raises(ValueError, match="ep_rank 1 is outside"):
        move_expert_weights(weights, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 1, 1)
    with pytest.raises(RuntimeError, match="process group"):
        move_expert_weights(_stack([0]), torch.tensor([0, 1]), torch.tensor([1, 0]), 0, 2)
