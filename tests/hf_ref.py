"""The transformers DeepSeek-V4 model as a test-only numerical oracle (notes: docs/hf-reference-notes.md).

`hf_config` maps our ModelConfig to a `DeepseekV4Config`; `build_hf_model` loads official-layout
dequantized weights into `DeepseekV4ForCausalLM` (eager attention and experts, strict load);
`hf_prefill_logits` / `hf_decode_logits` / `hf_chunked_logits` / `hf_greedy` run it on one sequence;
`random_official_state_dict` makes random official-layout weights from the manifest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.cache_utils import DynamicCache

from engine.model.config import ModelConfig, RopeScaling
from engine.weights.hf_names import official_to_hf_state_dict
from engine.weights.manifest import build_manifest

# A second small test config with other features than TINY: layer kinds in another order (HCA, CSA, SWA),
# one hash layer, window 16 (HF takes any window), 4 output groups, top-3 of 6 experts, an active SwiGLU
# clamp (0.75), top-4 of the CSA entries, another YaRN setting and eps. 16 indexer heads avoid top-k ties.
ALT = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=32,
    qk_rope_head_dim=8,
    q_lora_rank=32,
    o_groups=4,
    o_lora_rank=16,
    n_routed_experts=6,
    num_experts_per_tok=3,
    moe_intermediate_size=32,
    num_hash_layers=1,
    routed_scaling_factor=2.5,
    swiglu_limit=0.75,
    sliding_window=16,
    index_n_heads=16,
    index_head_dim=16,
    index_topk=4,
    compress_ratios=(128, 4, 0, 0),
    max_position_embeddings=1024,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=256),
    rms_norm_eps=1e-5,
)

_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


class NotExpressible(ValueError):
    """Our config uses a feature that transformers' DeepSeek-V4 cannot represent."""


def _check_expressible(cfg: ModelConfig) -> None:
    if cfg.n_shared_experts != 1:
        # HF always builds exactly one shared expert of width moe_intermediate_size.
        raise NotExpressible(f"n_shared_experts={cfg.n_shared_experts}: transformers supports only 1")
    if not cfg.norm_topk_prob:
        raise NotExpressible("norm_topk_prob=False: transformers always normalises the top-k weights")
    if cfg.swiglu_limit <= 0:
        # The reference skips the clamp for limit <= 0; HF clamps unconditionally.
        raise NotExpressible(f"swiglu_limit={cfg.swiglu_limit}: transformers always clamps")
    if cfg.tie_word_embeddings:
        raise NotExpressible("tie_word_embeddings=True: the official layout has a separate head")
    if cfg.qk_rope_head_dim == 0 or int(cfg.head_dim * (cfg.qk_rope_head_dim / cfg.head_dim)) != cfg.qk_rope_head_dim:
        # HF derives the rope dim as int(head_dim * partial_rotary_factor); 0 would rotate the whole head.
        raise NotExpressible(f"qk_rope_head_dim={cfg.qk_rope_head_dim} with head_dim={cfg.head_dim}")


def _rope_parameters(cfg: ModelConfig) -> dict:
    factor = cfg.qk_rope_head_dim / cfg.head_dim
    main = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor}
    compress: dict = {"rope_type": "default", "rope_theta": cfg.compress_rope_theta, "partial_rotary_factor": factor}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        compress.update(
            rope_type="yarn",
            factor=rs.factor,
            original_max_position_embeddings=rs.original_max_position_embeddings,
            beta_fast=rs.beta_fast,
            beta_slow=rs.beta_slow,
            attention_factor=1.0,  # the V4 reference applies no YaRN mscale
        )
    return {"main": main, "compress": compress}


def hf_config(cfg: ModelConfig) -> DeepseekV4Config:
    """Our config in transformers' terms: explicit layer types, MoE types, compress rates and nested RoPE."""
    _check_expressible(cfg)
    n = cfg.num_hidden_layers
    rope = _rope_parameters(cfg)
    hf = DeepseekV4Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts,
        scoring_func=cfg.scoring_func,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        # Only the main layers: HF has no MTP block and reads the rate per layer TYPE, not per layer.
        layer_types=[_LAYER_TYPE[r] for r in cfg.compress_ratios[:n]],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        compress_rope_theta=cfg.compress_rope_theta,
        hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps,
        mlp_layer_types=["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(n)],
        swiglu_limit=cfg.swiglu_limit,
        sliding_window=cfg.sliding_window,
        o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank,
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        num_nextn_predict_layers=cfg.num_nextn_predict_layers,
        hidden_act=cfg.hidden_act,
        rms_norm_eps=cfg.rms_norm_eps,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={k: dict(v) for k, v in rope.items()},
        partial_rotary_factor=cfg.qk_rope_head_dim / cfg.head_dim,
    )
    if hf.rope_parameters != rope or hf.qk_rope_head_dim != cfg.qk_rope_head_dim:
        raise AssertionError(f"transformers rewrote the RoPE parameters: {hf.rope_parameters} != {rope}")
    return hf


def build_hf_model(
    cfg: ModelConfig, sd: dict[str, Tensor], dtype: torch.dtype = torch.float32, experts_implementation: str = "eager"
) -> DeepseekV4ForCausalLM:
    """A `DeepseekV4ForCausalLM` (eager attention, eval mode) holding the official-layout `sd`; its routed experts
    run `experts_implementation` (tests: "eager", the per-expert loop; benchmarks: the fastest, see
    bench.common.fastest_hf_model).

    Every key must match: the only model entries not loaded are the non-persistent rotary buffers, which are
    not in `state_dict()` and are computed from the config.
    """
    model = DeepseekV4ForCausalLM._from_config(
        hf_config(cfg), dtype=dtype, attn_implementation="eager", experts_implementation=experts_implementation
    )
    hsd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in official_to_hf_state_dict(sd, cfg).items()}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(hsd)), sorted(set(hsd) - set(expected))
    if missing or unexpected:
        raise AssertionError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in hsd.items() if v.shape != expected[k].shape]
    if bad:
        raise AssertionError(f"HF state dict shape mismatch (name, got, want): {bad}")
    model.load_state_dict(hsd, strict=True)
    return model.eval()


def _ids(ids: list[int]) -> Tensor:
    return torch.tensor([ids], dtype=torch.long)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread: the oracle's ops are tiny, and on a busy 2-CPU box intra-op threads
    made a 150-step decode ~30x slower (88 s instead of 3 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def hf_prefill_logits(model: DeepseekV4ForCausalLM, ids: list[int]) -> Tensor:
    """Logits `[S, V]` of one full-sequence forward (no cache)."""
    with one_thread():
        return model(input_ids=_ids(ids), use_cache=False).logits[0]


@torch.no_grad()
def hf_chunked_logits(model: DeepseekV4ForCausalLM, ids: list[int], chunks: list[int]) -> Tensor:
    """Logits `[S, V]` of feeding `ids` in consecutive chunks of the given sizes through one cache."""
    if sum(chunks) != len(ids) or min(chunks, default=1) < 1:
        raise ValueError(f"chunk sizes {chunks} must be positive and sum to {len(ids)}")
    cache = DynamicCache(config=model.config)
    out, start = [], 0
    with one_thread():
        for n in chunks:
            out.append(model(input_ids=_ids(ids[start : start + n]), past_key_values=cache, use_cache=True).logits[0])
            start += n
    return torch.cat(out)


def hf_decode_logits(model: DeepseekV4ForCausalLM, ids: list[int], n_prefill: int) -> Tensor:
    """Logits `[S, V]`: prefill `ids[:n_prefill]`, then the rest one token at a time through the cache."""
    if not 1 <= n_prefill <= len(ids):
        raise ValueError(f"n_prefill={n_prefill} must be in [1, {len(ids)}]")
    return hf_chunked_logits(model, ids, [n_prefill] + [1] * (len(ids) - n_prefill))


@torch.no_grad()
def hf_greedy(
    model: DeepseekV4ForCausalLM, ids: list[int], max_new_tokens: int, eos_token_id: int | None = None
) -> list[int]:
    """The greedily generated tokens (prompt excluded); stops early only at `eos_token_id` if given (included)."""
    cache = DynamicCache(config=model.config)
    new: list[int] = []
    with one_thread():
        logits = model(input_ids=_ids(ids), past_key_values=cache, use_cache=True).logits[0, -1]
        while len(new) < max_new_tokens:
            tok = int(logits.argmax())
            new.append(tok)
            if tok == eos_token_id or len(new) == max_new_tokens:
                break
            logits = model(input_ids=_ids([tok]), past_key_values=cache, use_cache=True).logits[0, -1]
    return new


def _random_tensor(name: str, shape: tuple[int, ...], cfg: ModelConfig, g: torch.Generator) -> Tensor:
    def normal(std: float = 1.0) -> Tensor:
        return torch.randn(shape, generator=g) * std

    d = cfg.hidden_size
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("gate.tid2eid"):
        # Each row: num_experts_per_tok distinct expert ids.
        return torch.rand((shape[0], cfg.n_routed_experts), generator=g).argsort(dim=1)[:, : shape[1]].long()
    if name.endswith("norm.weight"):
        return 1 + normal(0.1)
    if name == "embed.weight":
        return normal()
    if name == "head.weight":
        return normal(1 / math.sqrt(d))
    if leaf == "attn_sink":
        return normal()
    if leaf == "ape":
        return normal(0.5)
    if leaf.startswith("hc_") and leaf.endswith("_fn"):
        return normal(0.5 / math.sqrt(shape[-1]))  # fan-in hc_mult * D
    if leaf.startswith("hc_") and leaf.endswith("_base"):
        return normal(0.5)
    if leaf.startswith("hc_") and leaf.endswith("_scale"):
        return torch.rand(shape, generator=g) + 0.5
    if name.endswith("gate.weight"):
        return normal(1 / math.sqrt(d))
    if name.endswith("gate.bias"):
        return normal(0.1)
    if leaf == "weight" and len(shape) == 2:
        return normal(1 / math.sqrt(shape[1]))
    raise ValueError(f"no init rule for {name} {shape}")


def random_official_state_dict(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random dequantized official-layout weights (manifest order and logical shapes; no `.scale` tensors)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for spec in build_manifest(cfg).tensors:
        if spec.kind == "scale":
            continue
        t = _random_tensor(spec.name, spec.logical_shape, cfg, g)
        out[spec.name] = t.to(dtype) if t.is_floating_point() else t
    return out
