"""The EP engine: greedy outputs of an EP group equal the single-rank engine token for token, for every
dispatch backend, with idle ranks and with a run-time rebalance mid-generation; nothing leaks.

One spawn per world size (4 ranks: several cases in one process group; 2 ranks: run_engine_group).
"""

from __future__ import annotations

import random

import pytest

from comm.launch import run_ranks
from engine.core.engine import EngineConfig, LLMEngine
from engine.core.ep.engine import EPEngine, PlacementConfig, make_ep_engine
from engine.core.ep.group import run_engine_group, serve_until_idle
from engine.weights.tokenizer import load_tokenizer
from scheduler.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
# Small budgets: chunked prefills, a queue behind max_num_seqs, decodes and prefills in one step.
CONFIG = EngineConfig(max_num_seqs=3, max_num_batched_tokens=128, page_tokens=128, num_pages=24)
LENGTHS = (3, 17, 64, 131, 140, 9, 200, 33, 127, 260, 5, 48, 150, 21, 90, 133)  # 7 prompts > 130 tokens
BACKENDS = ("sync", "tbo", "wave", "ll")
REBALANCE = PlacementConfig(policy="eplb", redundant_experts=4, rebalance_interval_steps=3, load_window_steps=8)


def _prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 512) for _ in range(LENGTHS[i % len(LENGTHS)])] for i in range(n)]


def _single_rank(ckpt, prompts: list[list[int]]) -> list[list[int]]:
    engine = LLMEngine(ckpt, CONFIG)
    for i, p in enumerate(prompts):
        engine.add_request(p, GREEDY, f"r{i}")
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for ro in engine.step():
            out.setdefault(ro.req_id, []).extend(ro.new_token_ids)
    return [out[f"r{i}"] for i in range(len(prompts))]


def _cases_4() -> list[tuple[str, str, PlacementConfig]]:
    return [(f"static-{b}", b, PlacementConfig()) for b in BACKENDS] + [("rebalance-wave", "wave", REBALANCE)]


def _rank_fn_4(rank: int, world: int, ckpt: str, prompts: list[list[int]]) -> dict:
    """Every case in the same 4-rank group: request i on rank i % 4."""
    from comm.placement import Placement

    results = {}
    try:
        EPEngine(ckpt, CONFIG, rank, world, placement=Placement.static(5, 8, world))
    except ValueError as e:
        results["bad_placement"] = str(e)
    for name, backend, pc in _cases_4():
        if backend == "tbo":  # another initial layout, through the keyword constructor
            engine = make_ep_engine(ckpt, CONFIG, rank=rank, world_size=world, backend=backend, placement_config=pc,
                                    placement=Placement.static(4, 8, world, redundant=4, policy="contiguous"))
        else:
            engine = EPEngine(ckpt, CONFIG, rank, world, backend=backend, placement_config=pc)
        initial = engine.placement.phy2log.clone()
        mine = [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts) if i % world == rank]
        outs = serve_until_idle(engine, mine)
        rebalances, mid_generation = engine.rebalances, engine.stats()["last_rebalance"]
        if pc.policy == "eplb" and rank == 2:
            engine.request_rebalance()  # one rank asks while the group is idle: all rebalance at the next step
        elif pc.policy == "static" and rank == 0:
            try:
                engine.request_rebalance()
            except ValueError as e:
                results[f"{name}-request"] = str(e)
        # The group is idle: a further step is collective but runs no forward; an abort is reported locally.
        if rank == 0:
            engine.add_request(prompts[0], GREEDY, "late")
            assert engine.abort_request("late") and not engine.idle()
        late = engine.step()
        assert [(o.req_id, o.finish_reason) for o in late] == ([("late", "abort")] if rank == 0 else [])
        assert engine.idle() and engine.step() == []
        results[name] = {
            "requested_rebalances": engine.rebalances - rebalances,
            "mid_generation": mid_generation,
            "tokens": {rid: o.token_ids for rid, o in outs.items()},
            "finish": {rid: o.finish_reason for rid, o in outs.items()},
            "stats": engine.stats(),
            "runner_reqs": len(engine.runner.reqs),
            "placement_changed": not bool((engine.placement.phy2log == initial).all()),
            "local_slots": [moe.experts.local_experts for moe in engine.model.moe_layers()],
            "slots_hold_placement": _slots_hold_placement(engine, ckpt),
        }
    return results


def _slots_hold_placement(engine: EPEngine, ckpt: str) -> bool:
    """Every local slot's weights equal its logical expert's weights in the checkpoint (after any moves)."""
    import torch

    from engine.weights.checkpoint import open_checkpoint

    want = {}
    experts = set(range(engine.model_config.n_routed_experts))
    for name, t in open_checkpoint(ckpt).iter_weights(torch.float32, experts=experts):
        if ".ffn.experts." in name and name.startswith("layers."):
            want[name] = t
    for layer, moe in enumerate(engine.model.moe_layers()):
        for slot, e in enumerate(engine.placement.local_logical(layer, engine.ep_rank)):
            assert moe.experts.local_experts[slot] == e
            for w in ("w1", "w2", "w3"):  # the slot's held bytes (+ scales, when native), dequantized
                if not torch.equal(moe.experts.expert_weight(w, slot, torch.float32),
                                   want[f"layers.{layer}.ffn.experts.{e}.{w}.weight"]):
                    return False
    return True


@pytest.fixture(scope="module")
def prompts():
    return _prompts()


@pytest.fixture(scope="module")
def reference(tiny_ckpt, prompts):
    return _single_rank(tiny_ckpt, prompts)


@pytest.fixture(scope="module")
def four_ranks(tiny_ckpt, prompts):
    return run_ranks(_rank_fn_4, 4, str(tiny_ckpt), prompts, timeout_s=300)


@pytest.mark.parametrize("case", [c[0] for c in _cases_4()])
def test_four_ranks_equal_single_rank(four_ranks, reference, case):
    got = {}
    for rank, res in enumerate(four_ranks):
        r = res[case]
        got.update(r["tokens"])
        assert set(r["tokens"]) == {f"r{i}" for i in range(len(reference)) if i % 4 == rank}
        assert set(r["finish"].values()) == {"length"}
        s = r["stats"]
        assert s["pages_free"] == s["num_pages"] and s["running"] == s["waiting"] == 0, s  # no leaked pages
        assert r["runner_reqs"] == 0
        assert s["steps"] == four_ranks[0][case]["stats"]["steps"]  # lock-step
        assert r["slots_hold_placement"]
        balance = s["expert_balance"]
        assert len(balance) == 4 and all(0 < row["balancedness"] <= 1 for row in balance)
        assert all(row["max_tokens_per_rank"] >= row["mean_tokens_per_rank"] > 0 for row in balance)
    assert [got[f"r{i}"] for i in range(len(reference))] == reference


def test_four_ranks_initial_placement(four_ranks):
    from comm.placement import Placement

    contiguous = Placement.static(4, 8, 4, redundant=4, policy="contiguous")
    for rank, res in enumerate(four_ranks):
        assert "ep_size=4, 4 layers (the main MoE layers)" in res["bad_placement"]
        assert res["static-tbo"]["local_slots"] == [contiguous.local_logical(layer, rank) for layer in range(4)]
        assert res["static-sync"]["local_slots"] == [[rank, rank + 4]] * 4  # the default: round-robin


def test_four_ranks_rebalance_moved_experts_mid_generation(four_ranks):
    for res in four_ranks:
        s, mid = res["rebalance-wave"]["stats"], res["rebalance-wave"]["mid_generation"]
        assert s["rebalances"] >= 3 and mid["step"] < s["steps"], s  # the last one before the request
        assert res["rebalance-wave"]["placement_changed"]
        assert mid["moved_slots"] > 0
        assert mid["balancedness_after"] >= mid["balancedness_before"]
        assert res["rebalance-wave"]["requested_rebalances"] == 1  # rank 2 asked, every rank did it
        assert res["static-sync"]["stats"]["rebalances"] == res["static-sync"]["requested_rebalances"] == 0
    assert "needs placement policy 'eplb'" in four_ranks[0]["static-sync-request"]


def test_two_ranks_one_busy_with_rebalance(tiny_ckpt, prompts, reference):
    """run_engine_group: every request (one of them text) on rank 0; rank 1 only joins the exchanges."""
    text = "Expert parallel ranks step in lock-step"
    tok = load_tokenizer(tiny_ckpt)
    text_ids = [0] + tok.encode(text, add_special_tokens=False).ids
    pc = PlacementConfig(policy="eplb", redundant_experts=2, rebalance_interval_steps=4, load_window_steps=16)
    res = run_engine_group(tiny_ckpt, 2, prompts[:8] + [text], GREEDY, backend="tbo", engine_config=CONFIG,
                           placement_config=pc, ranks=[0] * 9, timeout_s=300)
    want = reference[:8] + _single_rank(tiny_ckpt, [text_ids])
    assert [o.token_ids for o in res.outputs] == want
    assert all(o.rank == 0 and o.finish_reason == "length" for o in res.outputs)
    assert res.outputs[8].prompt_token_ids == text_ids and res.outputs[8].text == tok.decode(want[8])
    busy, idle = res.stats
    assert idle["dummy_steps"] == idle["steps"] == busy["steps"] > 0 and busy["dummy_steps"] == 0
    assert busy["rebalances"] == idle["rebalances"] >= 1
    assert idle["dispatch"]["tokens"] == 0 and idle["dispatch"]["assignments_recv"] > 0  # it ran experts for rank 0
    for s in res.stats:
        assert s["pages_free"] == s["num_pages"], s


def test_bad_arguments(tiny_ckpt):
    with pytest.raises(ValueError, match="policy"):
        PlacementConfig(policy="random")
    with pytest.raises(ValueError, match="only 'eplb' rebalances"):
        PlacementConfig(rebalance_interval_steps=5)
    from cluster.topology import PlacementSpec

    spec = PlacementSpec(policy="eplb", redundant_experts=8, rebalance_interval_steps=100, load_window_steps=64)
    assert PlacementConfig.from_spec(spec) == PlacementConfig("eplb", 8, 100, 64)
    with pytest.raises(RuntimeError, match="process group"):
        EPEngine(tiny_ckpt, CONFIG, 0, 1)
    with pytest.raises(ValueError, match="ranks"):
        run_engine_group(tiny_ckpt, 2, [[1, 2, 3]], ranks=[2])
