"""comm.placement: static layouts, tables derived from phy2log, replica routing, validation errors."""

from __future__ import annotations

import pytest
import torch

from comm.placement import Placement, PlacementError


def test_static_round_robin_without_redundancy():
    p = Placement.static(num_layers=3, num_experts=8, ep_size=2)
    assert (p.num_layers, p.num_experts, p.num_physical, p.slots_per_rank) == (3, 8, 8, 4)
    assert p.local_logical(0, 0) == [0, 2, 4, 6]
    assert p.local_logical(2, 1) == [1, 3, 5, 7]
    assert torch.equal(p.logcnt, torch.ones(3, 8, dtype=torch.int64))
    assert p.log2phy.shape == (3, 8, 1)
    assert p.log2phy[0, 6, 0].item() == 3 and p.log2phy[0, 1, 0].item() == 4


def test_static_contiguous_with_redundant_replicas():
    p = Placement.static(num_layers=1, num_experts=8, ep_size=4, redundant=4, policy="contiguous")
    assert p.slots_per_rank == 3
    got = [p.local_logical(0, r) for r in range(4)]
    assert got[0] == [0, 1, 2] and got[1] == [3, 4, 5]
    flat = [e for row in got for e in row]
    assert sorted(set(flat)) == list(range(8))
    for row in got:  # a replica never lands on a rank that already has that expert
        assert len(set(row)) == len(row)
    assert int(p.logcnt.sum()) == 12 and int(p.logcnt.max()) == 2
    again = Placement.static(num_layers=1, num_experts=8, ep_size=4, redundant=4, policy="contiguous")
    assert torch.equal(again.phy2log, p.phy2log)  # deterministic
    for e in range(8):
        phys = p.log2phy[0, e, : p.logcnt[0, e]].tolist()
        assert all(p.phy2log[0, q].item() == e for q in phys)
        assert phys == sorted(phys)


def test_round_robin_redundant_fills_free_slots():
    p = Placement.static(num_layers=2, num_experts=6, ep_size=4, redundant=2)
    assert p.num_physical == 8 and p.slots_per_rank == 2
    rows = [p.local_logical(0, r) for r in range(4)]
    assert rows[0][0] == 0 and rows[1][0] == 1 and rows[0][1] == 4 and rows[1][1] == 5
    assert rows[2][0] == 2 and rows[3][0] == 3
    assert rows[2][1] not in (2,) and rows[3][1] not in (3,)
    assert p.local_experts(2) == sorted(set(rows[2]))


def test_from_phy2log_roundtrip_and_route():
    phy2log = torch.tensor([[0, 1, 2, 0, 3, 0], [3, 2, 1, 0, 1, 2]])
    p = Placement.from_phy2log(phy2log, ep_size=3)
    assert p.logcnt.tolist() == [[3, 1, 1, 1], [1, 2, 2, 1]]
    assert p.log2phy[0, 0].tolist() == [0, 3, 5]
    assert p.log2phy[1, 1].tolist() == [2, 4, -1]
    assert p.local_logical(0, 1) == [2, 0]
    topk = torch.tensor([[0, 1], [0, 3], [0, 1], [2, 0]])
    phys = p.route(0, topk)
    assert phys[:, 0].tolist() == [0, 3, 5, 2]  # token i -> replica i % 3 of expert 0
    assert phys[3, 1].item() == 0
    assert p.route(0, topk, token_offset=1)[0, 0].item() == 3
    assert torch.equal(p.phy2log[0][phys], topk)  # the slot always holds the requested expert
    # explicit tables (as EPLB returns them, maybe with extra -1 padding) are accepted
    wide = torch.cat([p.log2phy, torch.full((2, 4, 2), -1)], dim=-1)
    assert Placement(p.phy2log, wide, p.logcnt, 3).num_physical == 6


def test_validation_errors_are_clear():
    with pytest.raises(PlacementError, match="not divisible by ep_size=4"):
        Placement.static(num_layers=1, num_experts=6, ep_size=4)
    with pytest.raises(PlacementError, match=r"layer 1: logical experts \[2\] have no physical replica"):
        Placement.from_phy2log(torch.tensor([[0, 1, 2, 3], [0, 1, 3, 3]]), ep_size=2)
    with pytest.raises(PlacementError, match="expert id 4 >= num_experts=4"):
        Placement.from_phy2log(torch.tensor([[0, 1, 2, 4]]), ep_size=2, num_experts=4)
    with pytest.raises(PlacementError, match="policy"):
        Placement.static(num_layers=1, num_experts=4, ep_size=2, policy="random")
    with pytest.raises(PlacementError, match="ep_size must be an int >= 1"):
        Placement.static(num_layers=1, num_experts=4, ep_size=0)
    p = Placement.static(num_layers=1, num_experts=4, ep_size=2)
    bad_cnt = p.logcnt.clone()
    bad_cnt[0, 1] = 2
    with pytest.raises(PlacementError, match="logcnt disagrees"):
        Placement(p.phy2log, p.log2phy, bad_cnt, 2)
    bad_l2p = p.log2phy.clone()
    bad_l2p[0, 0, 0], bad_l2p[0, 1, 0] = bad_l2p[0, 1, 0].item(), bad_l2p[0, 0, 0].item()
    with pytest.raises(PlacementError, match="log2phy disagrees with phy2log at layer 0, expert 0"):
        Placement(p.phy2log, bad_l2p, p.logcnt, 2)
    with pytest.raises(IndexError, match="rank 2"):
        p.local_logical(0, 2)
    with pytest.raises(PlacementError, match="integer tensor"):
        Placement.from_phy2log(torch.zeros(2, 4), ep_size=2)


def test_placement_pickles_and_routes_after():
    import pickle

    p = Placement.static(num_layers=2, num_experts=4, ep_size=2, redundant=2)
    topk = torch.tensor([[0, 1], [2, 3], [0, 2]])
    before = p.route(1, topk)
    q = pickle.loads(pickle.dumps(p))
    assert torch.equal(q.phy2log, p.phy2log) and q.ep_size == 2
    assert torch.equal(q.route(1, topk), before)
