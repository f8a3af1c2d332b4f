"""Memory of one rank: weight bytes by kind and dtype (from the checkpoint manifest), an activation estimate,
and the KV cache the rest holds (engine/cache/accounting.py for V4), in tokens and in sequences at a context.

Every kind except `routed_experts` is replicated on each rank. A rank holds `slots = (E + redundant) / ep_size`
expert slots in every MoE layer (MTP block included), each the bytes of one expert of that layer; on average
`redundant / ep_size` of them are redundant replicas.

For DeepSeek-V4 the weights a rank holds (`weight_bytes`, which sizes the KV budget) come from the engine's own
accounting, engine/weights/resident.py, under the topology's `weights` mode; the breakdowns by kind and dtype
are the checkpoint's bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.plan.hardware import Hardware
from cluster.plan.model_spec import PlanModel

DEFAULT_MEMORY_FRACTION = 0.9  # of HBM for weights + activations + KV, when the topology gives neither knob


@dataclass(frozen=True)
class KVSettings:
    page_tokens: int = 256
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    budget_bytes: int | None = None  # the KV budget per rank, as given
    memory_fraction: float | None = None  # else: fraction of HBM for everything; KV gets what is left


@dataclass(frozen=True)
class RankMemory:
    accelerator: str
    hbm_bytes: int
    replicated: dict  # kind -> {dtype: bytes}
    expert_slots: int  # per MoE layer
    redundant_slots: float  # average per MoE layer
    routed_bytes: dict  # dtype -> bytes of this rank's expert slots (all MoE layers)
    redundant_bytes: float  # the part of routed_bytes that is redundant replicas (average)
    activation_bytes: int
    kv_budget_bytes: int
    kv_pages: int
    kv_tokens_capacity: int  # pages x page_tokens, with max_num_seqs slots reserved (the engine's plan_cache)
    context_len: int
    seq_bytes_at_context: int  # one sequence's slot + pages at context_len
    seqs_at_context: int  # sequences of context_len that fit the budget (scheduler cap not applied)
    problems: tuple[str, ...] = field(default_factory=tuple)
    resident_bytes: int | None = None  # the engine's accounting of this rank's weights (V4), else None
    weights_mode: str = "native"

    @property
    def replicated_bytes(self) -> int:
        return sum(sum(d.values()) for d in self.replicated.values())

    @property
    def routed_total(self) -> int:
        return sum(self.routed_bytes.values())

    @property
    def weight_bytes(self) -> int:
        """What the rank holds: the engine's accounting when known, else the checkpoint bytes of its tensors."""
        if self.resident_bytes is not None:
            return self.resident_bytes
        return self.replicated_bytes + self.routed_total

    def to_dict(self) -> dict:
        return {
            "accelerator": self.accelerator, "hbm_bytes": self.hbm_bytes, "replicated": self.replicated,
            "replicated_bytes": self.replicated_bytes, "expert_slots": self.expert_slots,
            "redundant_slots": self.redundant_slots, "routed_bytes": self.routed_bytes,
            "routed_total": self.routed_total, "redundant_bytes": self.redundant_bytes,
            "weight_bytes": self.weight_bytes, "weights_mode": self.weights_mode,
            "activation_bytes": self.activation_bytes,
            "kv_budget_bytes": self.kv_budget_bytes, "kv_pages": self.kv_pages,
            "kv_tokens_capacity": self.kv_tokens_capacity, "context_len": self.context_len,
            "seq_bytes_at_context": self.seq_bytes_at_context, "seqs_at_context": self.seqs_at_context,
            "problems": list(self.problems),
        }


def activation_bytes(model: PlanModel, kv: KVSettings) -> int:
    """Peak activations of one step of `max_num_batched_tokens` tokens (an estimate, stated term by term):
    the residual streams (hc_mult x D, BF16) in, out and one temporary; the queries and attention output
    (heads x head dim, BF16); the routed tokens received (top-k copies: FP8 in, BF16 gate/up pair and BF16 out)
    plus the all-to-all send buffers (FP8 dispatch, BF16 combine); float32 logits for max_num_seqs rows."""
    t = kv.max_num_batched_tokens
    d = model.hidden
    head_dim = model.attn_shape.get("head_dim") or (model.attn_shape["nope_dim"] + model.attn_shape["rope_dim"])
    stream = 3 * t * model.hc_mult * d * 2
    attn = 2 * t * model.n_heads * head_dim * 2
    recv = t * model.top_k * (d * 1 + 2 * model.moe_inter * 2 + d * 2)
    send = t * model.top_k * (d * 1 + d * 2)
    logits = kv.max_num_seqs * model.vocab * 4
    return stream + attn + recv + send + logits


def rank_memory(model: PlanModel, hw: Hardware, ep_size: int, redundant: int, kv: KVSettings,
                context_len: int, resident_bytes: int | None = None, weights_mode: str = "native") -> RankMemory:
    """The memory of one rank of an EP group of `ep_size` on `hw`; `resident_bytes`: the engine's accounting of
    its weights (engine.weights.resident), when the model has one."""
    problems: list[str] = []
    e = model.n_routed_experts
    if (e + redundant) % ep_size:
        raise ValueError(f"{e} routed experts + {redundant} redundant = {e + redundant} slots is not a multiple of "
                         f"the EP size {ep_size}")
    slots = (e + redundant) // ep_size
    replicated = {k: dict(v) for k, v in model.bytes_by_dtype.items() if k != "routed_experts"}
    routed_all = model.bytes_by_dtype.get("routed_experts", {})
    routed = {dt: b * slots // e for dt, b in routed_all.items()}  # every expert of a layer is the same size
    red_slots = redundant / ep_size
    red_bytes = sum(routed_all.values()) * red_slots / e
    act = activation_bytes(model, kv)
    weights = sum(sum(d.values()) for d in replicated.values()) + sum(routed.values())
    if resident_bytes is not None:
        weights = resident_bytes
    hbm = int(hw.hbm_bytes)
    if kv.budget_bytes is not None:
        budget = kv.budget_bytes
        if weights + act + budget > hbm:
            problems.append(f"weights {weights / 1e9:.1f} GB + activations {act / 1e9:.1f} GB + KV budget "
                            f"{budget / 1e9:.1f} GB exceed the {hbm / 1e9:.0f} GB of {hw.memory_name}")
    else:
        frac = kv.memory_fraction if kv.memory_fraction is not None else DEFAULT_MEMORY_FRACTION
        budget = int(frac * hbm) - weights - act
        if budget <= 0:
            problems.append(f"weights {weights / 1e9:.1f} GB + activations {act / 1e9:.1f} GB exceed "
                            f"{frac:g} x {hbm / 1e9:.0f} GB of {hw.memory_name}: no room for a KV cache; "
                            f"add ranks (fewer expert slots each) or use a larger GPU")
            budget = 0
    slot = model.kv.slot_bytes()
    page = model.kv.page_bytes(kv.page_tokens)
    reserved = kv.max_num_seqs * slot
    pages = max(0, (budget - reserved) // page)
    if budget > 0 and pages < 1:
        problems.append(f"KV budget {budget / 1e9:.2f} GB cannot hold max_num_seqs={kv.max_num_seqs} slots x "
                        f"{slot / 1e6:.1f} MB plus one page of {page / 1e6:.1f} MB")
    seq = slot + math.ceil(context_len / kv.page_tokens) * page
    seqs = budget // seq if seq else 0
    if budget > 0 and seqs < 1:
        problems.append(f"one sequence of {context_len} tokens needs {seq / 1e9:.2f} GB of KV cache; the budget per "
                        f"rank is {budget / 1e9:.2f} GB")
    return RankMemory(
        accelerator=hw.key, hbm_bytes=hbm, replicated=replicated, expert_slots=slots, redundant_slots=red_slots,
        routed_bytes=routed, redundant_bytes=red_bytes, activation_bytes=act, kv_budget_bytes=budget,
        kv_pages=pages, kv_tokens_capacity=pages * kv.page_tokens, context_len=context_len,
        seq_bytes_at_context=seq, seqs_at_context=seqs, problems=tuple(problems), resident_bytes=resident_bytes,
        weights_mode=weights_mode)
