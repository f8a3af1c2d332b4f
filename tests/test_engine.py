"""The engine: continuous batching over the paged hybrid cache (issue: continuous batching on one rank).

Greedy outputs must not depend on what else is in the batch, on chunking, on preemption or on
prefix-cache hits: each is checked token for token against the model run alone.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.core.engine import EngineConfig, LLMEngine
from engine.model.generate import greedy_generate

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompts(n: int, seed: int, lengths=(3, 17, 64, 127, 128, 129, 200, 301, 350, 420)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 512) for _ in range(lengths[i % len(lengths)] + rng.randrange(0, 5))]
            for i in range(n)]


def _run(engine: LLMEngine, prompts, params, arrive_every: int = 2, per_arrival: int = 3,
         abort_at: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
    """Feed prompts a few at a time over many steps; returns index -> generated tokens."""
    pending = list(enumerate(prompts))
    ids: dict[str, int] = {}
    out: dict[int, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished():
        if step % arrive_every == 0:
            for i, p in pending[:per_arrival]:
                ids[engine.add_request(p, params, req_id=f"r{i}")] = i
            pending = pending[per_arrival:]
        for i in (abort_at or {}).get(step, []):
            assert engine.abort_request(f"r{i}"), f"r{i} was not in flight at step {step}"
        for ro in engine.step():
            out.setdefault(ids[ro.req_id], []).extend(ro.new_token_ids)
        step += 1
        assert step < 5000
    return out


@pytest.fixture(scope="module")
def alone(tiny_model):
    """Greedy continuations of each prompt run alone on the bare model (the reference)."""
    prompts = _prompts(32, seed=0)
    return prompts, [greedy_generate(tiny_model, [p], GREEDY.max_tokens)[0] for p in prompts]


def _engine(tiny_ckpt, **kw) -> LLMEngine:
    base = dict(max_num_seqs=32, max_num_batched_tokens=256, page_tokens=128, num_pages=256)
    return LLMEngine(tiny_ckpt, EngineConfig(**{**base, **kw}))


def _assert_all_pages_free(engine: LLMEngine) -> None:
    s = engine.stats()
    assert not engine.has_unfinished()
    assert s["pages_free"] == engine.cache.num_pages, s
    assert not engine.runner.reqs


def test_32_concurrent_requests_equal_each_alone(tiny_ckpt, alone):
    prompts, want = alone
    engine = _engine(tiny_ckpt)
    got = _run(engine, prompts, GREEDY)
    assert [got[i] for i in range(len(prompts))] == want
    _assert_all_pages_free(engine)


def test_greedy_equals_transformers(tiny_ckpt, alone):
    """The engine's greedy outputs equal transformers' generate on the same checkpoint (tie-aware)."""
    from engine.model.config import TINY
    from engine.weights.checkpoint import open_checkpoint
    from tests.hf_ref import build_hf_model, hf_greedy, hf_prefill_logits

    hf = build_hf_model(TINY, open_checkpoint(tiny_ckpt).state_dict(torch.float32))
    prompts, _ = alone
    engine = _engine(tiny_ckpt)
    got = _run(engine, prompts, GREEDY)
    for i in range(len(prompts)):
        want = hf_greedy(hf, prompts[i], GREEDY.max_tokens)
        if got[i] != want:
            k = next(j for j, (a, b) in enumerate(zip(got[i], want)) if a != b)
            top2 = hf_prefill_logits(hf, prompts[i] + want[:k])[-1].topk(2).values
            assert (top2[0] - top2[1]).item() < 1e-4, f"prompt {i}: divergence at step {k} without a near-tie"


def test_preemption_keeps_outputs_and_frees_pages(tiny_ckpt, alone):
    prompts, want = alone
    engine = _engine(tiny_ckpt, num_pages=12, enable_prefix_caching=False)  # 32 requests of up to 4 pages each
    got = _run(engine, prompts, GREEDY, arrive_every=1, per_arrival=8)
    assert engine.stats()["preemptions"] > 0
    assert [got[i] for i in range(len(prompts))] == want
    _assert_all_pages_free(engine)


def test_abort_mid_flight_frees_everything(tiny_ckpt, alone):
    prompts, want = alone
    engine = _engine(tiny_ckpt, num_pages=40)
    aborted = {3, 7, 8, 20, 31}  # request i arrives at step 2 * (i // 3); aborted a few steps later
    got = _run(engine, prompts, GREEDY, abort_at={5: [3, 7], 8: [8], 14: [20], 22: [31]})
    for i in range(len(prompts)):
        if i not in aborted:
            assert got[i] == want[i]
        else:
            assert len(got.get(i, [])) < GREEDY.max_tokens
    _assert_all_pages_free(engine)


def test_prefix_cache_hits_equal_misses(tiny_ckpt, tiny_model):
    rng = random.Random(5)
    system = [rng.randrange(2, 512) for _ in range(200)]  # a shared 200-token system prompt
    prompts = [system + [rng.randrange(2, 512) for _ in range(rng.randrange(1, 90))] for _ in range(10)]
    want = [greedy_generate(tiny_model, [p], GREEDY.max_tokens)[0] for p in prompts]
    engine = _engine(tiny_ckpt, page_tokens=128)
    got = _run(engine, prompts, GREEDY, arrive_every=3, per_arrival=1)
    assert [got[i] for i in range(len(prompts))] == want
    s = engine.stats()
    assert s["prefix_hit_tokens"] >= 128 * 8, s  # every request after the first reuses the full first page
    assert 0 < s["prefix_hit_rate"] <= 1
    _assert_all_pages_free(engine)


def test_llm_offline_api(tiny_ckpt, tiny_model):
    llm = LLM(tiny_ckpt, page_tokens=128)
    outs = llm.generate(["Hello world", [0, 5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5, 5]
    assert all(o.finish_reason == "length" for o in outs)
    assert isinstance(outs[0].text, str) and outs[0].prompt == "Hello world"
    assert outs[1].token_ids == greedy_generate(tiny_model, [[0, 5, 6, 7, 8]], 5)[0]
    one = llm.generate([0, 5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True))
    assert len(one) == 1 and len(one[0].logprobs) == 3
    lp, top = one[0].logprobs[0]
    assert lp <= 0 and len(top) == 2 and one[0].token_ids[0] in top


def test_seeded_sampling_is_reproducible_across_batches(tiny_ckpt):
    llm = LLM(tiny_ckpt, page_tokens=128)
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=8, seed=1234, ignore_eos=True)
    alone = llm.generate([[0, 9, 10, 11]], p)[0].token_ids
    crowd = llm.generate([[0, 3] * 40, [0, 9, 10, 11], [0, 7] * 100], [SamplingParams(temperature=1.0, max_tokens=8), p,
                                                                      SamplingParams(temperature=0.5, max_tokens=8)])
    assert crowd[1].token_ids == alone


def test_stop_conditions(tiny_ckpt, tiny_model):
    llm = LLM(tiny_ckpt, page_tokens=128)
    prompt = [0, 5, 6, 7, 8]
    ref = greedy_generate(tiny_model, [prompt], 8)[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(ref[3],),
                                              ignore_eos=True))[0]
    assert out.token_ids == ref[:ref.index(ref[3]) + 1] and out.finish_reason == "stop"
