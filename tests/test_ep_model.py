"""Expert-parallel model on 2 and 4 gloo ranks == the single-process model (float32, 1e-5), every backend.

One spawn per world size runs every case inside: backends x placements (round-robin, contiguous with
redundant replicas, a per-layer random placement with uneven replica counts) x scenarios (tokens on every
rank / on one rank only), each a packed prefill followed by decode steps and an MTP step. The tiny preset
has hash-routed and learned MoE layers, so both routing kinds go through the exchange. ``tbo`` runs the
model-level two-micro-batch path (sequences split in two) in forward and the MoE-level split in the MTP step.
"""

from __future__ import annotations

import pytest
import torch

from comm.launch import run_ranks
from comm.placement import Placement
from engine.model.config import TINY
from engine.model.moe import EPContext
from engine.weights.loader import load_model

TOL = 1e-5
BACKENDS = ("sync", "tbo", "wave")  # set_backend without ll's max_tokens_per_rank; ll: test_ep_engine
DECODE_STEPS = 2


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def _workload(scenario: str, rank: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """(prompts, decode tokens per step) this rank serves; empty lists when it has no tokens."""
    if scenario == "one_rank" and rank != 0:
        return [], [[] for _ in range(DECODE_STEPS)]
    lens = [6 + 3 * rank, 11] if scenario == "all_ranks" else [9, 4, 13]
    base = 100 * rank + (0 if scenario == "all_ranks" else 50)
    prompts = [_ids(n, base + i) for i, n in enumerate(lens)]
    decode = [[_ids(1, base + 10 * (s + 1) + i) for i in range(len(lens))] for s in range(DECODE_STEPS)]
    return prompts, decode


def _placements(world: int) -> dict[str, Placement]:
    n_layers = TINY.n_layers_total  # main layers + the MTP block
    e = TINY.n_routed_experts
    g = torch.Generator().manual_seed(world)
    rows = []
    for _ in range(n_layers):  # each layer: every expert once + 2 extra per rank, shuffled
        extra = torch.randint(0, e, (2 * world,), generator=g)
        row = torch.cat([torch.arange(e), extra])
        rows.append(row[torch.randperm(row.numel(), generator=g)])
    return {
        "round_robin": Placement.static(n_layers, e, world),
        "contiguous_redundant": Placement.static(n_layers, e, world, redundant=world, policy="contiguous"),
        "random_per_layer": Placement.from_phy2log(torch.stack(rows), world, num_experts=e),
    }


@torch.inference_mode()
def _serve(model, prompts, decode) -> list[torch.Tensor]:
    """Packed prefill, decode steps, one MTP step; returns the logits of each forward (maybe 0 rows)."""
    states = [model.new_state() for _ in prompts]
    out = []
    ids = torch.cat(prompts) if prompts else torch.zeros(0, dtype=torch.int64)
    h = model(ids, states, [len(p) for p in prompts])
    out.append(model.compute_logits(h))
    for step in decode:
        ids = torch.cat(step) if step else torch.zeros(0, dtype=torch.int64)
        h = model(ids, states, [1] * len(step))
        out.append(model.compute_logits(h))
    nxt = torch.cat([d[0] for d in zip(*decode, strict=True)]) if prompts else torch.zeros(0, dtype=torch.int64)
    _, mtp_logits = model.mtp_forward(h, nxt, states, [1] * len(prompts))
    out.append(mtp_logits)
    return out


class _Counter:
    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}

    def record(self, layer: int, topk_idx: torch.Tensor) -> None:
        c = torch.bincount(topk_idx.flatten(), minlength=TINY.n_routed_experts)
        self.counts[layer] = self.counts.get(layer, torch.zeros_like(c)) + c


def _rank_main(rank: int, world: int, ckpt: str) -> dict:
    results: dict = {"logits": {}, "slots": {}, "stats": {}, "load": {}}
    for pname, placement in _placements(world).items():
        model = load_model(ckpt, dtype=torch.float32, ep=EPContext(rank, world, placement))
        for backend in BACKENDS:
            model.set_backend(backend, num_waves=2)
            assert model.dispatcher.backend == backend
            if backend == "sync":
                results["slots"][pname] = {
                    "w1_layer2": model.layers[2].ffn.experts.w1.clone(),
                    "local_experts": model.local_experts,
                    "mtp": len(model.mtp),
                }
            counter = _Counter()
            model.set_load_recorder(counter)
            for scenario in ("all_ranks", "one_rank"):
                model.dispatcher.reset_stats()
                prompts, decode = _workload(scenario, rank)
                results["logits"][pname, backend, scenario] = _serve(model, prompts, decode)
                results["stats"][pname, backend, scenario] = model.dispatcher.totals.as_dict()
            results["load"][pname, backend] = {k: v.clone() for k, v in counter.counts.items()}
    return results


@pytest.fixture(scope="module")
def references(tiny_model):
    """Single-process logits for every (scenario, rank) of up to 4 ranks."""
    return {(sc, r): _serve(tiny_model, *_workload(sc, r)) for sc in ("all_ranks", "one_rank") for r in range(4)}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ep_model_equals_single_process(world, tiny_ckpt, tiny_model, references):
    assert any(TINY.is_hash_layer(i) for i in range(TINY.num_hidden_layers))
    assert not all(TINY.is_hash_layer(i) for i in range(TINY.num_hidden_layers))
    out = run_ranks(_rank_main, world, str(tiny_ckpt), timeout_s=300)
    placements = _placements(world)
    full_w1 = tiny_model.layers[2].ffn.experts.w1
    for rank, res in enumerate(out):
        for pname, placement in placements.items():
            slots = res["slots"][pname]
            assert slots["mtp"] == 1
            assert slots["local_experts"] == placement.local_experts(rank)
            logical = placement.local_logical(2, rank)
            assert slots["w1_layer2"].shape[0] == placement.slots_per_rank
            assert torch.equal(slots["w1_layer2"], full_w1[logical])  # each slot holds its logical expert
        for (pname, backend, scenario), got in res["logits"].items():
            ref = references[scenario, rank]
            assert len(got) == len(ref)
            for step, (a, b) in enumerate(zip(got, ref, strict=True)):
                assert a.shape == b.shape, (pname, backend, scenario, step)
                if a.numel():
                    err = (a - b).abs().max().item()
                    assert err <= TOL, (rank, pname, backend, scenario, step, err)
            stats = res["stats"][pname, backend, scenario]
            # main layers x (prefill + decode steps) forwards (tbo: two micro-batches each) + 1 MTP call
            per_forward = TINY.num_hidden_layers * (2 if backend == "tbo" else 1)
            assert stats["calls"] == per_forward * (1 + DECODE_STEPS) + 1
            if scenario == "one_rank" and rank != 0:
                assert stats["tokens"] == 0 and stats["bytes_recv_remote"] > 0  # served rank 0's tokens
        for (_, _), counts in res["load"].items():
            prompts, decode = _workload("all_ranks", rank)
            one_p, one_d = _workload("one_rank", rank)
            tokens = sum(map(len, prompts)) + len(prompts) * DECODE_STEPS
            tokens += sum(map(len, one_p)) + len(one_p) * DECODE_STEPS
            for layer in range(TINY.num_hidden_layers):
                assert int(counts[layer].sum()) == tokens * TINY.num_experts_per_tok


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.compute_logits(model(ids, [model.new_state()], [len(ids)]))


def test_single_rank_ep_and_set_placement(tiny_ckpt, tiny_model):
    """ep_size 1 (no process group: loopback exchange) equals the plain model, before and after a placement
    switch in which the slot weights are moved by hand, as a rebalance does."""
    n_layers = TINY.n_layers_total
    first = Placement.static(n_layers, TINY.n_routed_experts, 1, redundant=2)
    model = load_model(tiny_ckpt, dtype=torch.float32, ep=EPContext(0, 1, first, backend="wave"))
    ids = _ids(23, 5)
    ref = _logits(tiny_model, ids)
    assert (_logits(model, ids) - ref).abs().max().item() <= TOL
    g = torch.Generator().manual_seed(9)
    rows = [torch.cat([torch.arange(8), torch.randint(0, 8, (2,), generator=g)])[torch.randperm(10, generator=g)]
            for _ in range(n_layers)]
    second = Placement.from_phy2log(torch.stack(rows), 1, num_experts=TINY.n_routed_experts)
    full = tiny_model.moe_layers()
    for layer, moe in enumerate(model.moe_layers()):
        src = full[layer].experts.slot_tensors()  # the weights and, when held native, their scales
        for name, t in moe.experts.slot_tensors().items():
            t.data.copy_(src[name][second.phy2log[layer]])
    model.set_placement(second)
    assert model.moe_layers()[3].experts.local_experts == second.local_logical(3, 0)
    assert (_logits(model, ids) - ref).abs().max().item() <= TOL
    # model-level tbo cuts a lone prefill in two chunks (chunked prefill inside one step), still exact
    model.set_backend("tbo")
    sizes = []

    class _Sizes:
        def record(self, layer, topk_idx):
            if layer == 0:
                sizes.append(topk_idx.shape[0])

    model.set_load_recorder(_Sizes())
    assert (_logits(model, ids) - ref).abs().max().item() <= TOL
    assert sizes == [12, 11]
    model.set_load_recorder(None)
    with pytest.raises(ValueError, match="slots per rank"):
        model.set_placement(Placement.static(n_layers, TINY.n_routed_experts, 1))
    with pytest.raises(ValueError, match="not both"):
        load_model(tiny_ckpt, experts=[0, 1], ep=EPContext(0, 1, first))
    with pytest.raises(ValueError, match="placement has 6 logical experts"):
        load_model(tiny_ckpt, ep=EPContext(0, 1, Placement.static(n_layers, 6, 1)))
    with pytest.raises(RuntimeError, match="replicated slots"):
        model.moe_layers()[0].experts(torch.zeros(1, TINY.hidden_size), torch.ones(1, 2), torch.zeros(1, 2).long())
