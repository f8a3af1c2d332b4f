"""The one weight accounting: the bytes a rank holds in memory, from the manifest, the weights mode and the
placement. The planner (`megaserve plan`), `megaserve up`'s preflight and the rank's KV budget all call it.

What a `Transformer` holds, tensor by tensor (its parameters and persistent buffers; `model_resident_bytes`):

- `native`: every tensor as the checkpoint stores it (manifest dtypes and shapes: FP8 e4m3 + E8M0 block
  scales, packed MXFP4 + E8M0 scales, BF16 and F32 as they are), so the bytes are the manifest's.
- `dequantized`: FP8/FP4 weights in the model dtype at their logical shape, no scales; norm weights and the
  router, compressor and indexer-weights projections in float32 (the reference runs them in fp32); the
  embedding and head in the model dtype; F32 and I64 tensors as they are.

A rank holds every replicated tensor of the layers it builds (the main layers, plus the MTP block(s) when its
placement covers them) and, per MoE layer, one copy of an expert's tensors per slot (redundant replicas
included; all experts of a layer have the same size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.model.config import ModelConfig
from engine.model.weight_format import check_mode
from engine.weights.checkpoint_check import routed_expert_id
from engine.weights.manifest import TensorSpec, iter_tensors

_FP32_IN_REFERENCE = (".compressor.wkv.weight", ".compressor.wgate.weight", ".weights_proj.weight",
                      ".ffn.gate.weight")


@dataclass(frozen=True)
class RankWeights:
    """Resident weight bytes of one rank: replicated tensors and routed-expert slots."""

    replicated: int
    routed: int

    @property
    def total(self) -> int:
        return self.replicated + self.routed


def tensor_resident_bytes(spec: TensorSpec, weights: str, dtype: torch.dtype) -> int:
    """Bytes one manifest tensor takes in memory under `weights` ("native" | "dequantized") and model dtype."""
    if check_mode(weights) == "native":
        return spec.nbytes
    if spec.kind == "scale":
        return 0
    item = torch.empty(0, dtype=dtype).element_size()
    numel = spec.numel_logical
    if spec.kind in ("fp8", "fp4"):
        return numel * item
    if spec.dtype in ("F32", "I64"):
        return spec.nbytes
    if spec.name.endswith("norm.weight") or spec.name.endswith(_FP32_IN_REFERENCE):
        return numel * 4
    return numel * item


def _layer_of(name: str, n_main: int) -> int | None:
    """MoE layer id of a block tensor (main layers, then MTP blocks); None outside the blocks."""
    head, _, rest = name.partition(".")
    if head in ("layers", "mtp") and rest[:1].isdigit():
        return int(rest.partition(".")[0]) + (n_main if head == "mtp" else 0)
    return None


def rank_resident_bytes(cfg: ModelConfig, weights: str, dtype: torch.dtype, slots_per_layer: Sequence[int],
                        with_mtp: bool) -> RankWeights:
    """The resident bytes of a rank holding `slots_per_layer[l]` expert slots in MoE layer l (main layers, then
    the MTP blocks when `with_mtp`; entries beyond the built layers are ignored)."""
    n_main = cfg.num_hidden_layers
    n_layers = n_main + (cfg.num_nextn_predict_layers if with_mtp else 0)
    if len(slots_per_layer) < n_layers:
        raise ValueError(f"slots_per_layer has {len(slots_per_layer)} entries; the rank builds {n_layers} MoE layers")
    replicated = routed = 0
    for spec in iter_tensors(cfg):
        layer = _layer_of(spec.name, n_main)
        if layer is not None and layer >= n_layers:
            continue
        eid = routed_expert_id(spec.name)
        if eid is None:
            replicated += tensor_resident_bytes(spec, weights, dtype)
        elif eid == 0:  # every expert of a layer has expert 0's size
            routed += slots_per_layer[layer] * tensor_resident_bytes(spec, weights, dtype)
    return RankWeights(replicated, routed)


def uniform_rank_bytes(cfg: ModelConfig, weights: str, dtype: torch.dtype, slots: int,
                       with_mtp: bool = True) -> RankWeights:
    """`rank_resident_bytes` with the same number of slots in every MoE layer (static/EPLB placements)."""
    return rank_resident_bytes(cfg, weights, dtype, [slots] * cfg.n_layers_total, with_mtp)


def topology_rank_bytes(cfg: ModelConfig, weights: str, dtype: torch.dtype, world_size: int,
                        redundant_experts: int = 0) -> RankWeights:
    """A rank of an EP group of `world_size` as the planner lays it out and the rank builds it: (E + redundant) /
    world_size slots in every MoE layer; the MTP block(s) only on a single rank (`rank_builds_mtp`). `megaserve
    plan` prints it, `megaserve up` checks it, and a rank's KV budget subtracts it."""
    slots, rem = divmod(cfg.n_routed_experts + redundant_experts, world_size)
    if rem:
        raise ValueError(f"{cfg.n_routed_experts} routed experts + {redundant_experts} redundant = "
                         f"{cfg.n_routed_experts + redundant_experts} slots is not a multiple of the EP size "
                         f"{world_size}")
    return uniform_rank_bytes(cfg, weights, dtype, slots, with_mtp=rank_builds_mtp(world_size))


def rank_builds_mtp(world_size: int) -> bool:
    """Whether a rank of a group of `world_size` builds the MTP block(s): a single rank loads the whole model
    (LLMEngine); an EP rank's placement covers the main MoE layers only (engine/core/ep/engine.py), so it builds
    no MTP block and loads none of its tensors."""
    return world_size == 1


def model_resident_bytes(model: nn.Module) -> int:
    """What a built model holds: its parameters and persistent buffers (works on the meta device)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for mod in model.modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                total += buf.numel() * buf.element_size()
    return total


def format_bytes(n: int) -> str:
    """Bytes for people: GB above 0.1 GB, else MB, else B (decimal units, as the planner prints)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} B"
