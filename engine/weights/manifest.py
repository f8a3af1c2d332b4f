"""The checkpoint manifest: every tensor of a V4 checkpoint (name, shape, dtype) from a config.

Names, shapes and dtypes follow the official layout (v4-model.md §4.3–§4.4). The loader checks a
checkpoint against this list before it loads anything; `megaserve manifest` prints it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from engine.model.config import UNQUANTIZED_EXPERT_DTYPES, ModelConfig

# safetensors dtype names and their sizes in bytes.
DTYPE_BYTES = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I64": 8, "F16": 2}

FP8_BLOCK = 128  # weight_block_size [128, 128], UE8M0 scales
FP4_BLOCK = 32  # one E8M0 scale per 32 values


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, as stored in the official checkpoint
    # How the tensor is stored: "plain", "fp8" (weight of a 128x128-block-scaled FP8 linear),
    # "fp4" (packed MXFP4 weight, shape [N, K/2]) or "scale" (the .scale of one of those).
    kind: str = "plain"
    # The dequantized ("logical") shape: [N, K] for fp4 weights, else `shape`.
    logical_shape: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]

    @property
    def numel_logical(self) -> int:
        return math.prod(self.logical_shape or self.shape)


@dataclass(frozen=True)
class Manifest:
    tensors: tuple[TensorSpec, ...]
    params_total: int  # every weight value (scales excluded; FP4 counts 2 per byte), MTP included
    params_main: int  # the same without the MTP block(s)
    params_active: int  # per token in the main model: routed experts counted top-k of E
    params_active_mtp: int  # params_active plus the active part of the MTP block(s)

    @property
    def bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    def to_json(self, with_tensors: bool = True) -> dict:
        out: dict = {
            "num_tensors": len(self.tensors),
            "bytes": self.bytes,
            "params_total": self.params_total,
            "params_main": self.params_main,
            "params_active": self.params_active,
            "params_active_mtp": self.params_active_mtp,
        }
        if with_tensors:
            out["tensors"] = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors]
        else:
            out["tensors"] = len(self.tensors)
        return out


def _linear_fp8(name: str, n: int, k: int) -> list[TensorSpec]:
    """An FP8 e4m3 linear `[N, K]` and its UE8M0 block scale `[ceil(N/128), ceil(K/128)]`."""
    return [
        TensorSpec(f"{name}.weight", (n, k), "F8_E4M3", "fp8", (n, k)),
        TensorSpec(f"{name}.scale", (math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK)), "F8_E8M0", "scale"),
    ]


def _linear_fp4(name: str, n: int, k: int) -> list[TensorSpec]:
    """A packed MXFP4 linear: int8 `[N, K/2]` and an E8M0 scale `[N, K/32]`."""
    return [
        TensorSpec(f"{name}.weight", (n, k // 2), "I8", "fp4", (n, k)),
        TensorSpec(f"{name}.scale", (n, k // FP4_BLOCK), "F8_E8M0", "scale"),
    ]


def _plain(name: str, shape: tuple[int, ...], dtype: str) -> TensorSpec:
    return TensorSpec(name, shape, dtype, "plain", shape)


def _expert(cfg: ModelConfig, prefix: str, routed: bool) -> list[TensorSpec]:
    """One SwiGLU MLP; the n_shared_experts shared experts form one MLP n_shared times as wide."""
    d = cfg.hidden_size
    inter = cfg.moe_intermediate_size * (1 if routed else cfg.n_shared_experts)
    if routed and cfg.expert_dtype in UNQUANTIZED_EXPERT_DTYPES:  # a checkpoint with unquantized experts
        dt = UNQUANTIZED_EXPERT_DTYPES[cfg.expert_dtype]
        return [_plain(f"{prefix}.{w}.weight", shape, dt)
                for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d)))]
    lin = _linear_fp4 if routed and cfg.expert_dtype == "fp4" else _linear_fp8
    return lin(f"{prefix}.w1", inter, d) + lin(f"{prefix}.w2", d, inter) + lin(f"{prefix}.w3", inter, d)


def _compressor(cfg: ModelConfig, prefix: str, ratio: int, head_dim: int) -> list[TensorSpec]:
    coff = 2 if ratio == 4 else 1  # CSA compresses overlapping windows: twice the width
    d = cfg.hidden_size
    return [
        _plain(f"{prefix}.ape", (ratio, coff * head_dim), "F32"),
        _plain(f"{prefix}.wkv.weight", (coff * head_dim, d), "BF16"),
        _plain(f"{prefix}.wgate.weight", (coff * head_dim, d), "BF16"),
        _plain(f"{prefix}.norm.weight", (head_dim,), "BF16"),
    ]


def block_tensors(cfg: ModelConfig, prefix: str, layer_id: int) -> list[TensorSpec]:
    """One transformer block (`layers.N.` or `mtp.i.`): mHC, attention, MoE."""
    d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    ratio = cfg.compress_ratio(layer_id)
    hc = cfg.hc_mult
    n_mix = (2 + hc) * hc
    out: list[TensorSpec] = [
        _plain(f"{prefix}.attn_norm.weight", (d,), "BF16"),
        _plain(f"{prefix}.ffn_norm.weight", (d,), "BF16"),
    ]
    for sub in ("attn", "ffn"):
        out += [
            _plain(f"{prefix}.hc_{sub}_fn", (n_mix, hc * d), "F32"),
            _plain(f"{prefix}.hc_{sub}_base", (n_mix,), "F32"),
            _plain(f"{prefix}.hc_{sub}_scale", (3,), "F32"),
        ]
    a = f"{prefix}.attn"
    out.append(_plain(f"{a}.attn_sink", (h,), "F32"))
    out += _linear_fp8(f"{a}.wq_a", cfg.q_lora_rank, d)
    out.append(_plain(f"{a}.q_norm.weight", (cfg.q_lora_rank,), "BF16"))
    out += _linear_fp8(f"{a}.wq_b", h * hd, cfg.q_lora_rank)
    out += _linear_fp8(f"{a}.wkv", hd, d)
    out.append(_plain(f"{a}.kv_norm.weight", (hd,), "BF16"))
    out += _linear_fp8(f"{a}.wo_a", cfg.o_groups * cfg.o_lora_rank, h * hd // cfg.o_groups)
    out += _linear_fp8(f"{a}.wo_b", d, cfg.o_groups * cfg.o_lora_rank)
    if ratio:
        out += _compressor(cfg, f"{a}.compressor", ratio, hd)
    if ratio == 4:
        i = f"{a}.indexer"
        out += _linear_fp8(f"{i}.wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
        out.append(_plain(f"{i}.weights_proj.weight", (cfg.index_n_heads, d), "BF16"))
        out += _compressor(cfg, f"{i}.compressor", ratio, cfg.index_head_dim)
    f = f"{prefix}.ffn"
    out.append(_plain(f"{f}.gate.weight", (cfg.n_routed_experts, d), "BF16"))
    if cfg.is_hash_layer(layer_id):
        out.append(_plain(f"{f}.gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), "I64"))
    else:
        out.append(_plain(f"{f}.gate.bias", (cfg.n_routed_experts,), "F32"))
    for e in range(cfg.n_routed_experts):
        out += _expert(cfg, f"{f}.experts.{e}", routed=True)
    if cfg.n_shared_experts:
        out += _expert(cfg, f"{f}.shared_experts", routed=False)
    return out


def _head_tensors(cfg: ModelConfig, prefix: str) -> list[TensorSpec]:
    d, hc = cfg.hidden_size, cfg.hc_mult
    return [
        _plain(f"{prefix}hc_head_fn", (hc, hc * d), "F32"),
        _plain(f"{prefix}hc_head_base", (hc,), "F32"),
        _plain(f"{prefix}hc_head_scale", (1,), "F32"),
    ]


def iter_tensors(cfg: ModelConfig) -> Iterator[TensorSpec]:
    d = cfg.hidden_size
    yield _plain("embed.weight", (cfg.vocab_size, d), "BF16")
    for layer_id in range(cfg.num_hidden_layers):
        yield from block_tensors(cfg, f"layers.{layer_id}", layer_id)
    yield _plain("norm.weight", (d,), "BF16")
    yield _plain("head.weight", (cfg.vocab_size, d), "BF16")
    yield from _head_tensors(cfg, "")
    for i in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{i}"
        yield from block_tensors(cfg, p, cfg.num_hidden_layers + i)
        yield from _linear_fp8(f"{p}.e_proj", d, d)
        yield from _linear_fp8(f"{p}.h_proj", d, d)
        yield _plain(f"{p}.enorm.weight", (d,), "BF16")
        yield _plain(f"{p}.hnorm.weight", (d,), "BF16")
        yield _plain(f"{p}.norm.weight", (d,), "BF16")
        yield from _head_tensors(cfg, f"{p}.")


def build_manifest(cfg: ModelConfig) -> Manifest:
    tensors = tuple(iter_tensors(cfg))
    total = main = routed_main = routed_mtp = 0
    for t in tensors:
        if t.kind == "scale" or t.dtype == "I64":
            continue  # scales and the hash table are not parameters
        n = t.numel_logical
        total += n
        is_mtp = t.name.startswith("mtp.")
        if not is_mtp:
            main += n
        if ".experts." in t.name:
            if is_mtp:
                routed_mtp += n
            else:
                routed_main += n
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts
    # The LM head is active for every token; the embedding is a lookup but counted, as usual.
    active = main - routed_main + round(routed_main * frac)
    mtp_total = total - main
    active_mtp = active + (mtp_total - routed_mtp) + round(routed_mtp * frac)
    return Manifest(tensors, total, main, active, active_mtp)
