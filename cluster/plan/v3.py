"""DeepSeek-V3 for the planner (MLA attention, 3 dense layers then MoE with 256 experts, top-8, FP8 weights),
so the performance model can be checked against the published V3 serving numbers (anchors.md §2), and
DeepSeek-V3.2 (`V32`: V3's shape plus DeepSeek Sparse Attention), the baseline of DeepSeek's V4 efficiency
claims (v4-model.md §6).

Shapes are those of deepseek-ai/DeepSeek-V3 `config.json` (hidden 7168, 61 layers, first_k_dense_replace 3,
intermediate 18432, moe_intermediate 2048, 128 heads, q_lora 1536, kv_lora 512, qk_nope 128, qk_rope 64,
v_head 128, vocab 129280, 1 MTP layer) and its FP8 checkpoint layout (e4m3 weights with float32 128x128
block scales `weight_scale_inv`; BF16 embeddings, head, norms and router). Tensor names follow the planner's
scheme (model_spec.classify), not the HF names; the MTP block shares the main model's embedding and head.

DeepSeek-V3.2 (-Exp) keeps every V3 shape and adds, in every layer, a lightning indexer (config.json of
deepseek-ai/DeepSeek-V3.2-Exp: index_n_heads 64, index_head_dim 128, index_topk 2048; the same values in
third-party ports, e.g. mlx-lm `deepseek_v32.py` ModelArgs). From the official `inference/model.py` (`Indexer`;
read through GitHub copies such as fredericowieser/DS-V3.2-Indexer-Viz): `wq_b` [64*128, q_lora] on the query
latent, `wk` [128, hidden], `k_norm` a LayerNorm(128) with weight and bias, `weights_proj` [64, hidden]; its key
cache is FP8 [S, 128] plus a float32 scale per 128 values (`k_cache`, `k_scale_cache`), 132 bytes per token per
layer. Each query scores every previous token (ReLU(q.k) weighted per head) and attends, with MLA in its
absorbed (MQA) form, to the top-2048 tokens only. Indexer `wq_b`/`wk` are FP8 with 128x128 block scales and
`weights_proj` BF16, like the rest of the checkpoint's projections and gates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.plan.model_spec import LayerSpec, PlanModel, group_tensors
from engine.weights.manifest import TensorSpec


@dataclass(frozen=True)
class V3Config:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    num_nextn_predict_layers: int = 1
    # DeepSeek Sparse Attention (V3.2); 0 = dense MLA (V3)
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0

    def __post_init__(self) -> None:
        idx = (self.index_n_heads, self.index_head_dim, self.index_topk)
        if any(v < 0 for v in idx) or (any(idx) and not all(idx)):
            raise ValueError(f"index_n_heads, index_head_dim and index_topk must all be positive (V3.2) or all 0 "
                             f"(V3), got {idx}")

    @property
    def sparse(self) -> bool:
        return self.index_topk > 0


V32 = V3Config(index_n_heads=64, index_head_dim=128, index_topk=2048)


def _fp8(name: str, n: int, k: int) -> list[TensorSpec]:
    return [TensorSpec(f"{name}.weight", (n, k), "F8_E4M3", "fp8", (n, k)),
            TensorSpec(f"{name}.scale", (math.ceil(n / 128), math.ceil(k / 128)), "F32", "scale")]


def _plain(name: str, shape: tuple[int, ...], dtype: str = "BF16") -> TensorSpec:
    return TensorSpec(name, shape, dtype, "plain", shape)


def _block(c: V3Config, p: str, dense: bool) -> list[TensorSpec]:
    d, h = c.hidden_size, c.num_attention_heads
    out = [_plain(f"{p}.attn_norm.weight", (d,)), _plain(f"{p}.ffn_norm.weight", (d,))]
    a = f"{p}.attn"
    out += _fp8(f"{a}.wq_a", c.q_lora_rank, d) + [_plain(f"{a}.q_norm.weight", (c.q_lora_rank,))]
    out += _fp8(f"{a}.wq_b", h * (c.qk_nope_head_dim + c.qk_rope_head_dim), c.q_lora_rank)
    out += _fp8(f"{a}.wkv_a", c.kv_lora_rank + c.qk_rope_head_dim, d)
    out += [_plain(f"{a}.kv_norm.weight", (c.kv_lora_rank,))]
    out += _fp8(f"{a}.wkv_b", h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
    out += _fp8(f"{a}.wo", d, h * c.v_head_dim)
    if c.sparse:
        ix = f"{a}.indexer"
        out += _fp8(f"{ix}.wq_b", c.index_n_heads * c.index_head_dim, c.q_lora_rank)
        out += _fp8(f"{ix}.wk", c.index_head_dim, d)
        out += [_plain(f"{ix}.k_norm.weight", (c.index_head_dim,)), _plain(f"{ix}.k_norm.bias", (c.index_head_dim,)),
                _plain(f"{ix}.weights_proj.weight", (c.index_n_heads, d))]
    f = f"{p}.ffn"
    if dense:
        i = c.intermediate_size
        return out + _fp8(f"{f}.dense.w1", i, d) + _fp8(f"{f}.dense.w2", d, i) + _fp8(f"{f}.dense.w3", i, d)
    out += [_plain(f"{f}.gate.weight", (c.n_routed_experts, d)), _plain(f"{f}.gate.bias", (c.n_routed_experts,), "F32")]
    i = c.moe_intermediate_size
    for e in range(c.n_routed_experts):
        out += _fp8(f"{f}.experts.{e}.w1", i, d) + _fp8(f"{f}.experts.{e}.w2", d, i) + _fp8(f"{f}.experts.{e}.w3", i, d)
    si = i * c.n_shared_experts
    return out + _fp8(f"{f}.shared_experts.w1", si, d) + _fp8(f"{f}.shared_experts.w2", d, si) + \
        _fp8(f"{f}.shared_experts.w3", si, d)


def v3_tensors(c: V3Config) -> tuple[TensorSpec, ...]:
    d = c.hidden_size
    out = [_plain("embed.weight", (c.vocab_size, d))]
    for lid in range(c.num_hidden_layers):
        out += _block(c, f"layers.{lid}", lid < c.first_k_dense_replace)
    out += [_plain("norm.weight", (d,)), _plain("head.weight", (c.vocab_size, d))]
    for i in range(c.num_nextn_predict_layers):
        p = f"mtp.{i}"
        out += _block(c, p, False)
        out += _fp8(f"{p}.e_proj", d, d) + _fp8(f"{p}.h_proj", d, d)
        out += [_plain(f"{p}.enorm.weight", (d,)), _plain(f"{p}.hnorm.weight", (d,)), _plain(f"{p}.norm.weight", (d,))]
    return tuple(out)


@dataclass(frozen=True)
class MLAKV:
    """MLA cache: one (kv_lora + rope)-value latent per token per layer, in pages; no per-sequence slot.
    bfloat16: 2 bytes per value (1,152 B at 576); fp8_ds_mla: FlashMLA's FP8 layout, 512 FP8 + 4 float32
    scales + 64 BF16 RoPE values = 656 B. V3.2 adds the indexer key of every token: FP8 with a float32 scale
    per 128 values (132 B at 128) whatever the latent's dtype, as the reference and vLLM store it."""

    cfg: V3Config
    cache_dtype: str = "bfloat16"
    include_mtp: bool = True

    @property
    def n_layers(self) -> int:
        return self.cfg.num_hidden_layers + (self.cfg.num_nextn_predict_layers if self.include_mtp else 0)

    @property
    def index_token_bytes(self) -> int:
        """Bytes of one token's indexer key per layer (0 without DSA)."""
        dim = self.cfg.index_head_dim
        return dim + 4 * math.ceil(dim / 128) if dim else 0

    @property
    def token_bytes(self) -> int:
        """Bytes per token per layer: the MLA latent plus (V3.2) the indexer key."""
        return self.latent_bytes + self.index_token_bytes

    @property
    def latent_bytes(self) -> int:
        """Bytes of one token's MLA latent per layer."""
        c = self.cfg
        if self.cache_dtype == "bfloat16":
            return 2 * (c.kv_lora_rank + c.qk_rope_head_dim)
        if self.cache_dtype == "float32":
            return 4 * (c.kv_lora_rank + c.qk_rope_head_dim)
        if self.cache_dtype == "fp8_ds_mla":
            return c.kv_lora_rank + 4 * (c.kv_lora_rank // 128) + 2 * c.qk_rope_head_dim
        raise ValueError(f"cache_dtype must be bfloat16, float32 or fp8_ds_mla, got {self.cache_dtype!r}")

    def seq_bytes(self, context_len: int) -> int:
        return self.n_layers * context_len * self.token_bytes

    def slot_bytes(self) -> int:
        return 0

    def page_bytes(self, page_tokens: int) -> int:
        return self.n_layers * page_tokens * self.token_bytes

    def breakdown(self, context_len: int) -> dict[str, int]:
        kv = self.seq_bytes(context_len)
        latent = self.n_layers * context_len * self.latent_bytes
        return {"latent": latent, "indexer": kv - latent, "kv": kv, "total": kv}


def from_v3(c: V3Config | None = None, name: str | None = None, cache_dtype: str = "bfloat16") -> PlanModel:
    """The planner's model of DeepSeek-V3 (default) or, with `V32`, DeepSeek-V3.2 (attention kind "dsa")."""
    c = c or V3Config()
    name = name or ("deepseek-v3.2" if c.sparse else "deepseek-v3")
    attn = "dsa" if c.sparse else "mla"
    tensors = v3_tensors(c)
    per_layer, top, by_dtype = group_tensors(tensors, c.num_hidden_layers)
    n_total = c.num_hidden_layers + c.num_nextn_predict_layers
    layers = tuple(LayerSpec(lid, attn, lid >= c.first_k_dense_replace, lid >= c.num_hidden_layers, per_layer[lid])
                   for lid in range(n_total))
    kv = MLAKV(c, cache_dtype)
    shape = {"kv_lora": c.kv_lora_rank, "rope_dim": c.qk_rope_head_dim, "nope_dim": c.qk_nope_head_dim,
             "v_dim": c.v_head_dim, "kv_token_bytes": kv.latent_bytes}
    if c.sparse:
        shape.update(index_heads=c.index_n_heads, index_dim=c.index_head_dim, index_topk=c.index_topk,
                     index_entry_bytes=kv.index_token_bytes)
    return PlanModel(
        name=name, family="v3", hidden=c.hidden_size, vocab=c.vocab_size, n_heads=c.num_attention_heads,
        n_routed_experts=c.n_routed_experts, top_k=c.num_experts_per_tok, moe_inter=c.moe_intermediate_size,
        n_main_layers=c.num_hidden_layers, layers=layers, top_groups=top, bytes_by_dtype=by_dtype, kv=kv,
        attn_shape=shape, expert_dtype="fp8", hc_mult=1)
