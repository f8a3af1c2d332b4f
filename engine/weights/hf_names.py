"""Official checkpoint names <-> transformers `DeepseekV4ForCausalLM` names (v4-model.md §4.4).

Works on dequantized tensors only (no `.scale`). The official layout keeps one tensor per routed expert
(`layers.N.ffn.experts.E.w{1,2,3}.weight`); transformers merges them into `mlp.experts.gate_up_proj [E, 2I, D]`
(w1 rows first, then w3) and `mlp.experts.down_proj [E, D, I]`. The MTP block (`mtp.*`) has no transformers
counterpart. Verified name by name against a transformers model built from the config (tests/test_hf_names.py).
This module must not import transformers: the checkpoint loader uses it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor

from engine.model.config import ModelConfig

# Top-level tensors.
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}


def _compressor(official: str, hf: str) -> dict[str, str]:
    return {
        f"{official}.ape": f"{hf}.position_bias",
        f"{official}.wkv.weight": f"{hf}.kv_proj.weight",
        f"{official}.wgate.weight": f"{hf}.gate_proj.weight",
        f"{official}.norm.weight": f"{hf}.kv_norm.weight",
    }


# Per-block tensors: the suffix after `layers.N.` (routed experts are handled separately).
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn",
    "hc_attn_base": "attn_hc.base",
    "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn",
    "hc_ffn_base": "ffn_hc.base",
    "hc_ffn_scale": "ffn_hc.scale",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    **_compressor("attn.compressor", "self_attn.compressor"),
    # The indexer lives under the compressor in transformers.
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    **_compressor("attn.indexer.compressor", "self_attn.compressor.indexer"),
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}

_OFF_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_OFF_EXPERT = re.compile(r"ffn\.experts\.(\d+)\.w([123])\.weight")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_GATE_UP, _DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


def official_to_hf_name(name: str) -> str:
    """The transformers name of one non-routed-expert official tensor (KeyError if it has none)."""
    if name in _TOP:
        return _TOP[name]
    m = _OFF_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise KeyError(f"tensor {name!r} has no transformers name")


def official_to_hf_state_dict(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename a dequantized official-layout state dict to `DeepseekV4ForCausalLM.state_dict()` names.

    Routed experts are stacked (every expert of a layer must be present); `mtp.*` tensors are dropped.
    """
    out: dict[str, Tensor] = {}
    # layer -> which ("w1"/"w2"/"w3") -> expert id -> tensor
    experts: dict[int, dict[str, dict[int, Tensor]]] = {}
    for name, t in sd.items():
        if name.startswith("mtp."):
            continue
        if name.endswith(".scale"):
            raise ValueError(f"{name}: official_to_hf_state_dict needs dequantized weights (no .scale tensors)")
        m = _OFF_LAYER.fullmatch(name)
        if m:
            layer = int(m.group(1))
            if layer >= cfg.num_hidden_layers:
                raise ValueError(f"{name}: layer {layer} >= num_hidden_layers={cfg.num_hidden_layers}")
            e = _OFF_EXPERT.fullmatch(m.group(2))
            if e:
                experts.setdefault(layer, {}).setdefault(f"w{e.group(2)}", {})[int(e.group(1))] = t
                continue
        out[official_to_hf_name(name)] = t
    n_exp, inter, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    for layer, ws in sorted(experts.items()):
        stacked = {}
        for w, shape in (("w1", (inter, d)), ("w3", (inter, d)), ("w2", (d, inter))):
            got = ws.get(w, {})
            missing = sorted(set(range(n_exp)) - set(got))
            extra = sorted(set(got) - set(range(n_exp)))
            if missing or extra:
                raise ValueError(f"layers.{layer}.ffn.experts.*.{w}: missing experts {missing}, unexpected {extra}")
            for i, t in got.items():
                if tuple(t.shape) != shape:
                    raise ValueError(f"layers.{layer}.ffn.experts.{i}.{w}.weight: shape {tuple(t.shape)}, "
                                     f"expected {shape}")
            stacked[w] = torch.stack([got[i] for i in range(n_exp)])
        prefix = f"model.layers.{layer}."
        out[prefix + _GATE_UP] = torch.cat([stacked["w1"], stacked["w3"]], dim=1)
        out[prefix + _DOWN] = stacked["w2"]
    return out


def hf_to_official(name: str, tensor: Tensor, cfg: ModelConfig) -> list[tuple[str, Tensor]]:
    """The official tensors held by ONE transformers tensor (a merged expert tensor yields one per expert).

    Non-persistent rotary buffers (`*.rotary_emb.*`) map to nothing. Expert outputs are views of `tensor`.
    """
    if name in _TOP_INV:
        return [(_TOP_INV[name], tensor)]
    if ".rotary_emb." in name:
        return []
    m = _HF_LAYER.fullmatch(name)
    if not m:
        raise KeyError(f"tensor {name!r} is not a DeepseekV4ForCausalLM tensor")
    layer, rest = m.group(1), m.group(2)
    prefix = f"layers.{layer}."
    if rest in _LAYER_INV:
        return [(prefix + _LAYER_INV[rest], tensor)]
    n_exp, inter, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    if rest == _GATE_UP:
        if tuple(tensor.shape) != (n_exp, 2 * inter, d):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {(n_exp, 2 * inter, d)}")
        out = []
        for e in range(n_exp):
            out.append((f"{prefix}ffn.experts.{e}.w1.weight", tensor[e, :inter]))
            out.append((f"{prefix}ffn.experts.{e}.w3.weight", tensor[e, inter:]))
        return out
    if rest == _DOWN:
        if tuple(tensor.shape) != (n_exp, d, inter):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {(n_exp, d, inter)}")
        return [(f"{prefix}ffn.experts.{e}.w2.weight", tensor[e]) for e in range(n_exp)]
    raise KeyError(f"tensor {name!r} has no official name")


def is_hf_layout(names: Iterable[str]) -> bool:
    """True if the tensor names are transformers names (`model.*`, `lm_head.weight`), not official ones."""
    return any(n.startswith("model.") or n == "lm_head.weight" for n in names)
