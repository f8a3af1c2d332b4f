"""tests/hf_ref.py: the transformers oracle is built faithfully from our config and is self-consistent."""

import dataclasses
import math

import pytest
import torch

from engine.model.config import TINY
from engine.weights.manifest import build_manifest
from tests.hf_ref import (
    ALT,
    NotExpressible,
    build_hf_model,
    hf_chunked_logits,
    hf_config,
    hf_decode_logits,
    hf_greedy,
    hf_prefill_logits,
    one_thread,
    random_official_state_dict,
)

CONFIGS = {"tiny": TINY, "alt": ALT}


@pytest.fixture(scope="module", params=list(CONFIGS))
def cfg_model(request):
    cfg = CONFIGS[request.param]
    return cfg, build_hf_model(cfg, random_official_state_dict(cfg, seed=0))


def _ids(cfg, n, seed=1):
    return torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _official_yarn_inv_freq(dim, base, factor, original, beta_fast, beta_slow):
    """The DeepSeek reference's YaRN frequencies (v4-model.md §2.1), written independently of transformers."""
    def corr_dim(rot):
        return dim * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr_dim(beta_fast)), 0), min(math.ceil(corr_dim(beta_slow)), dim - 1)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    smooth = 1 - ramp
    return freqs / factor * (1 - smooth) + freqs * smooth


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_config_reproduces_ours(name):
    cfg = CONFIGS[name]
    hf = hf_config(cfg)
    kinds = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    assert hf.layer_types == [kinds[r] for r in cfg.compress_ratios[: cfg.num_hidden_layers]]
    n = cfg.num_hidden_layers
    assert hf.mlp_layer_types == ["hash_moe" if i < cfg.num_hash_layers else "moe" for i in range(n)]
    assert hf.compress_rates == {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    assert hf.qk_rope_head_dim == cfg.qk_rope_head_dim
    for key in ("sliding_window", "index_topk", "index_n_heads", "o_groups", "swiglu_limit", "routed_scaling_factor",
                "rms_norm_eps", "hc_eps", "hc_sinkhorn_iters", "hc_mult"):
        assert getattr(hf, key) == getattr(cfg, key), key

    model = build_hf_model(cfg, random_official_state_dict(cfg, seed=0))
    rot = model.model.rotary_emb
    r, rs = cfg.qk_rope_head_dim, cfg.rope_scaling
    main = 1.0 / (cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    torch.testing.assert_close(rot.main_inv_freq, main, rtol=0, atol=0)
    want = _official_yarn_inv_freq(r, cfg.compress_rope_theta, rs.factor, rs.original_max_position_embeddings,
                                   rs.beta_fast, rs.beta_slow)
    torch.testing.assert_close(rot.compress_inv_freq, want, rtol=1e-6, atol=0)
    assert rot.main_attention_scaling == 1.0 and rot.compress_attention_scaling == 1.0  # no YaRN mscale
    # Per layer: SWA-only layers use the "main" rope, compressed layers the "compress" (YaRN) rope.
    for i, layer in enumerate(model.model.layers):
        assert layer.self_attn.rope_layer_type == ("main" if cfg.compress_ratios[i] == 0 else "compress")


def test_not_expressible():
    for bad in (dict(n_shared_experts=2), dict(norm_topk_prob=False), dict(swiglu_limit=0.0)):
        with pytest.raises(NotExpressible):
            hf_config(dataclasses.replace(TINY, **bad))


def test_random_state_dict():
    a = random_official_state_dict(TINY, seed=5)
    b = random_official_state_dict(TINY, seed=5)
    specs = {s.name: s for s in build_manifest(TINY).tensors if s.kind != "scale"}
    assert sorted(a) == sorted(specs)
    for name, t in a.items():
        assert tuple(t.shape) == specs[name].logical_shape, name
        assert torch.equal(t, b[name])
        assert t.dtype == (torch.int64 if name.endswith("tid2eid") else torch.float32)
    t2e = a["layers.0.ffn.gate.tid2eid"]
    assert t2e.min() >= 0 and t2e.max() < TINY.n_routed_experts
    assert all(len(set(row)) == TINY.num_experts_per_tok for row in t2e.tolist())
    scale = a["layers.1.hc_attn_scale"]
    assert scale.min() >= 0.5 and scale.max() <= 1.5
    assert not torch.equal(a["embed.weight"], random_official_state_dict(TINY, seed=6)["embed.weight"])
    assert random_official_state_dict(TINY, seed=5, dtype=torch.bfloat16)["head.weight"].dtype == torch.bfloat16


def test_strict_load_and_finite_logits(cfg_model):
    cfg, model = cfg_model
    sd = random_official_state_dict(cfg, seed=0)
    assert torch.equal(model.lm_head.weight, sd["head.weight"])
    assert torch.equal(model.model.layers[0].self_attn.sinks, sd["layers.0.attn.attn_sink"])
    logits = hf_prefill_logits(model, _ids(cfg, 40))
    assert logits.shape == (40, cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1


def test_prefill_vs_incremental_decode(cfg_model):
    # 300 tokens: past the 128 window, 2 HCA entries (the second one emitted during decode), 75 CSA entries.
    cfg, model = cfg_model
    ids = _ids(cfg, 300)
    full = hf_prefill_logits(model, ids)
    inc = hf_decode_logits(model, ids, n_prefill=150)
    assert inc.shape == full.shape
    assert (full - inc).abs().max().item() <= 1e-4
    # Chunked prefill with chunk boundaries off the 4/128 grid.
    assert (full - hf_chunked_logits(model, ids, [37, 101, 5, 157])).abs().max().item() <= 1e-4
    # Causality: a prefix's logits do not depend on later tokens.
    assert (full[:150] - hf_prefill_logits(model, ids[:150])).abs().max().item() <= 1e-4


def test_greedy_matches_generate(cfg_model):
    cfg, model = cfg_model
    ids = _ids(cfg, 20, seed=2)
    got = hf_greedy(model, ids, max_new_tokens=8)
    with one_thread():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert got == out[0, len(ids):].tolist()
    assert hf_greedy(model, ids, max_new_tokens=8, eos_token_id=got[2]) == got[:3]
