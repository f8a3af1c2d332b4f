"""The model as the planner sees it: every weight tensor grouped by kind and layer, and the attention and
KV-cache shape of each layer. Built from the engine's checkpoint manifest for DeepSeek-V4 (so the planner's
weight bytes are the manifest's, to the byte) and from cluster/plan/v3.py for DeepSeek-V3 (MLA).

Weight kinds (`classify`): attention, compressor, indexer, router, routed_experts, shared_expert, dense_ffn,
mhc, norm, embedding, head, mtp_proj. Only `routed_experts` is split over the EP ranks; every other kind is
replicated on each rank (DP attention).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from engine.cache import accounting as ca
from engine.model.config import ModelConfig
from engine.weights.manifest import TensorSpec, iter_tensors

KINDS = ("attention", "compressor", "indexer", "router", "routed_experts", "shared_expert", "dense_ffn", "mhc",
         "norm", "embedding", "head", "mtp_proj")
# safetensors dtype -> the tensor-core rate a GEMM on it runs at. FP4 experts run FP8 x FP4 (MegaMoE,
# DeepGEMM m_grouped_fp8_fp4): on Blackwell the mixed-precision MMA kind runs at the FP8 rate.
COMPUTE_DTYPE = {"F8_E4M3": "fp8", "I8": "fp8", "BF16": "bf16", "F32": "bf16", "F16": "bf16"}


def classify(name: str) -> str:
    """The weight kind of a tensor name (V4 manifest names; v3.py uses the same scheme)."""
    if name == "embed.weight":
        return "embedding"
    if name == "head.weight":
        return "head"
    if ".ffn.experts." in name:
        return "routed_experts"
    if ".ffn.shared_experts." in name:
        return "shared_expert"
    if ".ffn.gate." in name:
        return "router"
    if ".ffn.dense." in name:
        return "dense_ffn"
    if ".attn.indexer." in name:
        return "indexer"
    if ".attn.compressor." in name:
        return "compressor"
    if ".attn." in name:
        return "attention"
    if "hc_" in name.rsplit(".", 1)[-1] or name.startswith("hc_"):
        return "mhc"
    if re.search(r"\.(e_proj|h_proj)\.", name):
        return "mtp_proj"
    if name.endswith("norm.weight"):
        return "norm"
    raise ValueError(f"cannot classify weight tensor {name!r}")


@dataclass(frozen=True)
class Group:
    """Tensors of one kind in one layer: bytes stored, and GEMM FLOPs per token by compute dtype."""

    bytes: int = 0
    params: int = 0
    flops_fp8: int = 0  # 2 * logical params of FP8/FP4 matrices (per token through them)
    flops_bf16: int = 0  # 2 * logical params of BF16/FP32 matrices

    def __add__(self, other: Group) -> Group:
        return Group(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass(frozen=True)
class LayerSpec:
    layer_id: int
    attn: str  # "swa" | "csa" | "hca" (V4) | "mla" (V3)
    moe: bool  # routed experts (False: a dense FFN, V3's first layers)
    mtp: bool
    groups: dict  # kind -> Group (routed_experts: all E experts of the layer)


class KVModel(Protocol):
    """Per-sequence cache sizes, in the engine's layout (pages of `page_tokens` plus a per-sequence slot)."""

    cache_dtype: str

    def seq_bytes(self, context_len: int) -> int: ...
    def slot_bytes(self) -> int: ...
    def page_bytes(self, page_tokens: int) -> int: ...
    def breakdown(self, context_len: int) -> dict[str, int]: ...


@dataclass(frozen=True)
class V4KV:
    """engine.cache.accounting for a V4 config (windows + compressed entries + compressor state)."""

    cfg: ModelConfig
    cache_dtype: str = "bfloat16"
    with_snapshot: bool = True

    def seq_bytes(self, context_len: int) -> int:
        return ca.sequence_cache_bytes(self.cfg, context_len, self.cache_dtype).total

    def slot_bytes(self) -> int:
        return ca.slot_bytes(self.cfg, self.cache_dtype)

    def page_bytes(self, page_tokens: int) -> int:
        return ca.page_bytes(self.cfg, page_tokens, self.cache_dtype, self.with_snapshot)

    def breakdown(self, context_len: int) -> dict[str, int]:
        return ca.sequence_cache_bytes(self.cfg, context_len, self.cache_dtype).to_dict()


@dataclass(frozen=True)
class PlanModel:
    name: str
    family: str  # "v4" | "v3"
    hidden: int
    vocab: int
    n_heads: int
    n_routed_experts: int
    top_k: int
    moe_inter: int
    n_main_layers: int
    layers: tuple[LayerSpec, ...]  # main layers, then MTP layers
    top_groups: dict  # kind -> Group for tensors outside layers (embedding, head, final norm, hc_head)
    bytes_by_dtype: dict  # kind -> {safetensors dtype: bytes}, whole model
    kv: KVModel
    # attention shape (V4: head_dim, rope, window, index heads/dim/topk; V3: MLA dims), read by perf.py
    attn_shape: dict
    expert_dtype: str  # storage of routed experts: "fp4" | "fp8"
    hc_mult: int = 1  # residual streams (mHC); 1 = a plain residual

    @property
    def weight_bytes(self) -> int:
        """Every weight byte of the checkpoint (MTP included)."""
        return sum(g.bytes for g in self.top_groups.values()) + sum(
            g.bytes for layer in self.layers for g in layer.groups.values())

    @property
    def moe_layers(self) -> tuple[LayerSpec, ...]:
        return tuple(layer for layer in self.layers if layer.moe)


# a dtype a checkpoint is dequantized to at load (the CPU path) -> (safetensors name, bytes per element)
DEQUANTIZED = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}


def group_tensors(tensors: Iterable[TensorSpec], n_main: int, dequantized_to: str | None = None
                  ) -> tuple[dict[int, dict[str, Group]], dict, dict]:
    """Sum tensors into {layer_id: {kind: Group}} (MTP layer i -> n_main + i), top-level {kind: Group} and
    {kind: {safetensors dtype: bytes}}. Keeps no tensor (V4-Pro has 145,116 of them).
    `dequantized_to` ("float32", "bfloat16"): bytes as a rank holds the weights after dequantizing them to that
    dtype at load (CPU ranks): every weight's logical elements in that dtype, no scales, the hash table as is."""
    acc: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    by_dtype: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t in tensors:
        name = t.name
        kind = "routed_experts" if ".ffn.experts." in name else classify(name)
        head, _, rest = name.partition(".")
        if head in ("layers", "mtp") and rest[:1].isdigit():
            lid = int(rest.partition(".")[0]) + (n_main if head == "mtp" else 0)
        else:
            lid = -1
        a = acc[(lid, kind)]
        shape = t.logical_shape or t.shape
        n = math.prod(shape)
        if dequantized_to is None or t.dtype == "I64":
            dtype, nbytes = t.dtype, t.nbytes
        elif t.kind == "scale":
            dtype, nbytes = t.dtype, 0  # folded into the weight at load
        else:
            dtype, nbytes = DEQUANTIZED[dequantized_to][0], n * DEQUANTIZED[dequantized_to][1]
        a[0] += nbytes
        if nbytes:
            by_dtype[kind][dtype] += nbytes
        if t.kind == "scale" or t.dtype == "I64":
            continue  # scales and the hash table: bytes, no parameters, no FLOPs
        a[1] += n
        if len(shape) == 2:
            a[2 if COMPUTE_DTYPE[t.dtype] == "fp8" else 3] += 2 * n
    per_layer: dict[int, dict[str, Group]] = defaultdict(dict)
    top: dict[str, Group] = {}
    for (lid, kind), a in acc.items():
        (top if lid < 0 else per_layer[lid])[kind] = Group(*a)
    return dict(per_layer), top, {k: dict(v) for k, v in by_dtype.items()}


_ATTN_KIND = {0: "swa", 4: "csa", 128: "hca"}


def from_v4(cfg: ModelConfig, name: str = "deepseek-v4", cache_dtype: str = "bfloat16",
            dequantized_to: str | None = None) -> PlanModel:
    """A V4 config through engine/weights/manifest.py (weights) and engine/cache/accounting.py (KV);
    `dequantized_to`: see `group_tensors` (CPU ranks)."""
    per_layer, top, by_dtype = group_tensors(iter_tensors(cfg), cfg.num_hidden_layers, dequantized_to)
    layers = tuple(
        LayerSpec(lid, _ATTN_KIND[cfg.compress_ratio(lid)], True, lid >= cfg.num_hidden_layers, per_layer[lid])
        for lid in range(cfg.n_layers_total))
    shape = {"head_dim": cfg.head_dim, "rope_dim": cfg.qk_rope_head_dim, "window": cfg.sliding_window,
             "index_heads": cfg.index_n_heads, "index_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
             "kv_entry_bytes": ca.kv_entry_bytes(cfg, cache_dtype),
             "index_entry_bytes": ca.indexer_entry_bytes(cfg, cache_dtype)}
    return PlanModel(
        name=name, family="v4", hidden=cfg.hidden_size, vocab=cfg.vocab_size, n_heads=cfg.num_attention_heads,
        n_routed_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok, moe_inter=cfg.moe_intermediate_size,
        n_main_layers=cfg.num_hidden_layers, layers=layers, top_groups=top, bytes_by_dtype=by_dtype,
        kv=V4KV(cfg, cache_dtype), attn_shape=shape, expert_dtype=cfg.expert_dtype, hc_mult=cfg.hc_mult)
