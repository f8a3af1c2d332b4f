"""Parity with transformers' DeepseekV4ForCausalLM on the same dequantized weights (float32, <= 1e-4).

Two configs that together cover SWA-only, CSA and HCA layers, hash and learned routing:
`tiny` (SWA, CSA, HCA, CSA; 2 hash layers; window 128) and `ALT` (HCA, CSA, SWA; 1 hash layer;
window 16; an active SwiGLU clamp). Both use 16 indexer heads (v4-model.md §7, top-k ties).
"""

from __future__ import annotations

import pytest
import torch

from engine.model.config import TINY
from engine.model.generate import greedy_generate
from engine.model.model import Transformer
from engine.model.rope import inv_freq
from tests.hf_ref import (
    ALT,
    build_hf_model,
    hf_decode_logits,
    hf_greedy,
    hf_prefill_logits,
    random_official_state_dict,
)

TOL = 1e-4
CONFIGS = {"tiny": TINY, "alt": ALT}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    cfg = CONFIGS[request.param]
    sd = random_official_state_dict(cfg, seed=7)
    ours = Transformer(cfg, dtype=torch.float32)
    ours.load_weights(sd.items())
    return cfg, ours.eval(), build_hf_model(cfg, sd)


def _ids(cfg, n: int, seed: int) -> list[int]:
    return torch.randint(2, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_rope_frequencies_match(pair):
    cfg, _, hf = pair
    rot = hf.model.rotary_emb
    assert torch.allclose(inv_freq(cfg, compressed=False), rot.main_inv_freq.float(), rtol=1e-6, atol=0)
    assert torch.allclose(inv_freq(cfg, compressed=True), rot.compress_inv_freq.float(), rtol=1e-6, atol=0)


def test_prefill_parity_packed_batch(pair):
    """A batch of prompts of different lengths, packed into one forward, against HF one prompt at a time."""
    cfg, ours, hf = pair
    prompts = [_ids(cfg, n, seed=n) for n in (300, 137, 64, 5)]
    with torch.inference_mode():
        states = [ours.new_state() for _ in prompts]
        got = ours.compute_logits(ours(torch.tensor(sum(prompts, [])), states, [len(p) for p in prompts]))
    want = torch.cat([hf_prefill_logits(hf, p) for p in prompts])
    assert got.shape == want.shape
    assert (got - want.float()).abs().max().item() <= TOL


def test_decode_parity_token_by_token(pair):
    """Prefill a prefix, then one token per step (several sequences decoding together) vs HF's cache decode."""
    cfg, ours, hf = pair
    # decode steps cross positions 127/128 and 255/256 (window, HCA) and every multiple of 4 (CSA)
    prompts = [_ids(cfg, 270, seed=1), _ids(cfg, 140, seed=2)]
    n0 = [100, 40]
    want = [hf_decode_logits(hf, p, n) for p, n in zip(prompts, n0)]
    with torch.inference_mode():
        states = [ours.new_state() for _ in prompts]
        first = ours.compute_logits(ours(torch.tensor(prompts[0][:n0[0]] + prompts[1][:n0[1]]), states, n0))
        got = [[first[:n0[0]]], [first[n0[0]:]]]
        for t in range(max(len(p) - n for p, n in zip(prompts, n0))):
            live = [i for i in range(2) if n0[i] + t < len(prompts[i])]
            ids = torch.tensor([prompts[i][n0[i] + t] for i in live])
            logits = ours.compute_logits(ours(ids, [states[i] for i in live], [1] * len(live)))
            for j, i in enumerate(live):
                got[i].append(logits[j:j + 1])
    for g, w in zip(got, want):
        assert (torch.cat(g) - w.float()).abs().max().item() <= TOL


def test_greedy_parity(pair):
    """Greedy generation equals HF's token for token; a divergence is allowed only at a near-tie (< 1e-4)."""
    cfg, ours, hf = pair
    prompts = [_ids(cfg, n, seed=100 + n) for n in (3, 125, 131)]
    got = greedy_generate(ours, prompts, max_new_tokens=16)
    for p, g in zip(prompts, got):
        w = hf_greedy(hf, p, max_new_tokens=16)
        if g != w:
            k = next(i for i, (a, b) in enumerate(zip(g, w)) if a != b)
            top2 = hf_prefill_logits(hf, p + w[:k])[-1].topk(2).values
            assert (top2[0] - top2[1]).item() < 1e-4, f"divergence at step {k} without a near-tie"


def test_parity_through_quantized_checkpoint(tiny_ckpt):
    """The official FP8/FP4 checkpoint, dequantized by our reader, drives both models to the same logits."""
    from engine.weights.checkpoint import open_checkpoint
    from engine.weights.loader import load_model

    ours = load_model(tiny_ckpt, dtype=torch.float32)
    hf = build_hf_model(TINY, dict(open_checkpoint(tiny_ckpt).iter_weights(dtype=torch.float32)))
    ids = _ids(TINY, 270, seed=5)
    with torch.inference_mode():
        got = ours.compute_logits(ours(torch.tensor(ids), [ours.new_state()], [len(ids)]))
    assert (got - hf_prefill_logits(hf, ids).float()).abs().max().item() <= TOL
