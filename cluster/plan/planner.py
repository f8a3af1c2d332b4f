"""What a plan needs (`PlanInput`, built from a topology by `from_topology`) and the plan itself (`make_plan`):
per-rank memory, the prefill and decode step model at the given load, and what does not fit, with reasons.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from cluster.plan.hardware import Hardware, cpu_host, get_hardware, host_memory_bytes
from cluster.plan.memory import KVSettings, RankMemory, rank_memory
from cluster.plan.model_spec import PlanModel, from_v4
from cluster.plan.perf import Efficiency, Layout, decode, prefill
from cluster.plan.v3 import V3Config, from_v3
from engine.cache.accounting import KV_CACHE_DTYPES, bytes_per_token, indexer_entry_bytes, kv_entry_bytes
from engine.model.config import ModelConfig
from engine.weights.resident import topology_rank_bytes

# topology kv_cache.dtype -> engine/cache/accounting.py name


@dataclass(frozen=True)
class NodePlan:
    name: str
    ranks: int
    accelerator: str  # a hardware.yaml profile, or "cpu"
    memory_bytes_per_rank: int | None = None  # "cpu": the RAM each rank may use

    def __post_init__(self) -> None:
        if (self.accelerator == "cpu") != (self.memory_bytes_per_rank is not None):
            raise ValueError(f"node {self.name!r}: memory_bytes_per_rank is for (and needed by) cpu nodes only")

    def hardware(self) -> Hardware:
        if self.accelerator == "cpu":
            return cpu_host(self.memory_bytes_per_rank or 0)
        return get_hardware(self.accelerator)


@dataclass(frozen=True)
class PlanInput:
    model: ModelConfig | V3Config
    model_name: str
    nodes: tuple[NodePlan, ...]
    ep_backend: str = "sync"
    policy: str = "static"
    redundant_experts: int = 0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    page_tokens: int = 256
    max_model_len: int | None = None
    kv_budget_bytes: int | None = None
    memory_fraction: float | None = None
    kv_dtype: str = "bfloat16"  # topology names: bfloat16, float32, fp8
    weight_dtype: str = "bfloat16"  # model.dtype: what CPU ranks dequantize the checkpoint to at load
    notes: tuple[str, ...] = ()  # what building the input assumed; the plan repeats them
    weights: str = "native"  # the topology's model.weights: how ranks hold the weights (engine.weights.resident)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a plan needs at least one node")
        if self.kv_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {self.kv_dtype!r}")

    @property
    def world_size(self) -> int:
        return sum(n.ranks for n in self.nodes)


def from_topology(topo, host_memory: int | None = None) -> PlanInput:
    """A PlanInput from cluster.topology.Topology (its `notes` say what it assumed). A cuda node plans on its
    `accelerator` profile; a cpu node on this machine's RAM (`host_memory`, default: measured), shared by every
    CPU rank of the topology under an embedded Ray (all nodes run here), else by the node's ranks (a node of a
    joined Ray is taken to have as much RAM as this machine)."""
    nodes = []
    notes = []
    cpu_ranks = [n.ranks for n in topo.nodes if n.device == "cpu"]
    if cpu_ranks:
        ram = host_memory if host_memory is not None else host_memory_bytes()
        embedded = topo.ray.address == ""
        share = sum(cpu_ranks) if embedded else None
        notes.append(f"CPU ranks: memory per rank is this machine's {ram / 1e9:.1f} GB of RAM shared by "
                     + (f"the topology's {share} CPU ranks (an embedded Ray runs every node here)" if embedded else
                        "each node's ranks (a node is taken to have as much RAM as this machine)")
                     + "; weights as CPU ranks hold them, "
                     + (f"dequantized to {topo.model.dtype}" if topo.model.weights == "dequantized"
                        else "in checkpoint precision (weights: native)"))
    for n in topo.nodes:
        if n.device == "cpu":
            nodes.append(NodePlan(n.name, n.ranks, "cpu", ram // (share or n.ranks)))
        elif n.accelerator is None:
            raise ValueError(f"{topo.source}: node {n.name!r} has no accelerator (device {n.device}); the planner "
                             f"needs a GPU hardware profile for every cuda node")
        else:
            nodes.append(NodePlan(n.name, n.ranks, n.accelerator))
    p = topo.parallel
    s = topo.scheduler
    kv = topo.kv_cache
    name = topo.model.config or (topo.model.path.name if topo.model.path else "model")
    return PlanInput(
        model=topo.model_config(), model_name=name, nodes=tuple(nodes), ep_backend=p.ep_backend,
        policy=p.placement.policy, redundant_experts=p.placement.redundant_experts, max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens, page_tokens=s.page_tokens, max_model_len=s.max_model_len,
        kv_budget_bytes=kv.budget_bytes, memory_fraction=kv.memory_fraction,
        kv_dtype=kv.dtype or topo.model.dtype, weights=topo.model.weights,
        weight_dtype=topo.model.dtype, notes=tuple(notes))


def rank_weight_bytes(inp: PlanInput) -> int | None:
    """A rank's weights by the engine's accounting (engine.weights.resident), every rank holding
    (E + redundant) / world expert slots in every MoE layer, the MTP block's included; None for V3."""
    if isinstance(inp.model, V3Config):
        return None
    return topology_rank_bytes(inp.model, inp.weights, getattr(torch, inp.weight_dtype), inp.world_size,
                               inp.redundant_experts).total


def kv_note(inp: PlanInput) -> str | None:
    """The KV cache's sizes for the plan's notes (V4; None for V3): bytes per entry, per indexer key, per token."""
    if isinstance(inp.model, V3Config):
        return None
    cfg, cache_dtype = inp.model, KV_CACHE_DTYPES[inp.kv_dtype]
    bpt = bytes_per_token(cfg, cache_dtype)
    return (f"KV cache {inp.kv_dtype} ({cache_dtype}): {kv_entry_bytes(cfg, cache_dtype)} B per {cfg.head_dim}-value "
            f"entry, {indexer_entry_bytes(cfg, cache_dtype)} B per indexer key, {bpt['compressed']:.1f} B per context "
            f"token in compressed entries (engine.cache.accounting: what the engine's page pools hold)")


def build_model(inp: PlanInput, hw: Hardware) -> tuple[PlanModel, list[str]]:
    """The planner's model for `inp` on `hw`; FP4 experts become FP8 on a GPU without FP4 (Hopper); a CPU rank
    holds the checkpoint's bytes (weights native) or every weight dequantized to `inp.weight_dtype`."""
    notes: list[str] = []
    cache_dtype = KV_CACHE_DTYPES[inp.kv_dtype]
    if isinstance(inp.model, V3Config):
        if hw.device == "cpu":
            raise ValueError("DeepSeek-V3 is planned on GPUs only (CPU ranks serve V4 checkpoints)")
        return from_v3(inp.model, inp.model_name, cache_dtype), notes
    cfg = inp.model
    if hw.device == "cpu":
        dequantized_to = inp.weight_dtype if inp.weights == "dequantized" else None
        return from_v4(cfg, inp.model_name, cache_dtype, dequantized_to=dequantized_to), notes
    if cfg.expert_dtype == "fp4" and not hw.has_fp4:
        cfg = dataclasses.replace(cfg, expert_dtype="fp8")
        notes.append(f"{hw.key} has no FP4 tensor cores: routed experts planned as FP8 (the lossless FP4->FP8 "
                     f"conversion of v4-model.md §4.3), about twice the FP4 expert bytes")
    return from_v4(cfg, inp.model_name, cache_dtype), notes


@dataclass(frozen=True)
class Perf:
    isl: int
    osl: int
    concurrency: int
    batch_per_rank: float  # decode sequences per rank at this load (capped by what fits)
    decode_context: int
    prefill_tokens_per_step: int
    prefill_tok_s_gpu: float
    decode_tok_s_gpu: float
    ttft_s: float
    tpot_s: float  # one decode step
    output_tok_s_gpu: float  # colocated serving: see `colocated_step`
    output_tok_s_node: float
    prefill_step: dict
    decode_step: dict
    efficiency: dict
    layout: dict
    cycle_s: float = 0.0  # one request's life: its prefill steps + osl decode steps (`colocated_step`)
    user_tpot_s: float = 0.0  # what a user measures: the mean step, prefill steps of other ranks included
    stall_fraction: float = 0.0  # of the steps, those in which some rank of the EP group prefills


@dataclass(frozen=True)
class Plan:
    model_name: str
    world_size: int
    ranks: tuple[tuple[tuple[int, ...], str, RankMemory], ...]  # (global ranks, node, memory) per distinct node
    perf: Perf | None
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    weight_bytes_model: int = 0
    replicated_by_kind: dict = field(default_factory=dict)
    no_perf_reason: str | None = None  # why `perf` is None

    def to_dict(self) -> dict:
        return {
            "model": self.model_name, "world_size": self.world_size, "weight_bytes_model": self.weight_bytes_model,
            "ranks": [{"ranks": list(r), "node": node, **m.to_dict()} for r, node, m in self.ranks],
            "perf": dataclasses.asdict(self.perf) if self.perf else None, "no_perf_reason": self.no_perf_reason,
            "problems": list(self.problems), "notes": list(self.notes),
        }


def colocated_step(world: int, batch: float, prefill_steps: float, prefill_step_s: float, decode_step_s: float,
                   osl: int) -> tuple[float, float]:
    """(mean step time, fraction of steps that carry a prefill) in colocated serving on an EP group of `world`
    ranks, each holding `batch` requests in a closed loop (every finished request is replaced). A request takes
    `prefill_steps` steps of prefill (fractional when several prompts share one step) and then `osl` decode
    steps. The group runs in lockstep (each MoE layer waits for every rank), so a step in which ANY rank
    prefills takes `prefill_step_s` for all of them; decode tokens ride along in it (chunked prefill), one per
    decoding sequence per step as in any step. One rank prefills in a fraction r = batch x prefill_steps /
    (prefill_steps + osl) of the steps; ranks are independent, so 1 - (1 - r)^world of the steps prefill."""
    if world < 1 or batch <= 0 or prefill_steps <= 0 or osl < 1:
        raise ValueError(f"need world >= 1, batch > 0, prefill_steps > 0, osl >= 1; got {world}, {batch}, "
                         f"{prefill_steps}, {osl}")
    if prefill_step_s < decode_step_s or decode_step_s <= 0:
        raise ValueError(f"need 0 < decode_step_s <= prefill_step_s, got {decode_step_s}, {prefill_step_s}")
    r = min(1.0, batch * prefill_steps / (prefill_steps + osl))
    q = 1.0 - (1.0 - r) ** world
    return decode_step_s + q * (prefill_step_s - decode_step_s), q


def domain_size(hw: Hardware, ranks_per_node: int) -> int:
    """Ranks per NVLink domain: the rack (NVL72) when it is larger than a node, else the node."""
    return hw.nvl_domain if hw.nvl_domain > ranks_per_node else ranks_per_node


def make_plan(inp: PlanInput, isl: int = 1024, osl: int = 1024, concurrency: int | None = None,
              eff: Efficiency | None = None) -> Plan:
    for name, v in (("isl", isl), ("osl", osl)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name} must be a positive integer, got {v!r}")
    eff = eff or Efficiency()
    world = inp.world_size
    if concurrency is None:
        concurrency = inp.max_num_seqs * world
    if concurrency < 1:
        raise ValueError(f"--concurrency must be a positive integer, got {concurrency!r}")
    problems: list[str] = []
    notes: list[str] = list(inp.notes)
    if kv_note(inp) is not None:
        notes.append(kv_note(inp))
    context = isl + osl
    if inp.max_model_len is not None and context > inp.max_model_len:
        problems.append(f"isl + osl = {context} tokens exceeds scheduler.max_model_len {inp.max_model_len}")
    kv = KVSettings(inp.page_tokens, inp.max_num_seqs, inp.max_num_batched_tokens, inp.kv_budget_bytes,
                    inp.memory_fraction)
    rows = []
    models: dict[str, PlanModel] = {}
    start = 0
    for node in inp.nodes:
        hw = node.hardware()
        if hw.key not in models:
            models[hw.key], n = build_model(inp, hw)
            notes += n
        mem = rank_memory(models[hw.key], hw, world, inp.redundant_experts, kv, context,
                          resident_bytes=rank_weight_bytes(inp), weights_mode=inp.weights)
        problems += [f"node {node.name} (ranks {start}-{start + node.ranks - 1}): {p}" for p in mem.problems]
        rows.append((tuple(range(start, start + node.ranks)), node.name, mem))
        start += node.ranks
    if any(n.accelerator == "cpu" for n in inp.nodes):
        return Plan(inp.model_name, world, tuple(rows), None, tuple(problems), tuple(notes),
                    next(iter(models.values())).weight_bytes,
                    no_perf_reason="the performance model covers the GPU profiles of cluster/plan/hardware.yaml, not "
                                   "CPU ranks; measure a CPU cluster with `megaserve bench serve`")
    # the performance model runs on the slowest GPU of the group (every MoE layer waits for every rank)
    hws = {n.accelerator: get_hardware(n.accelerator) for n in inp.nodes}
    hw = min(hws.values(), key=lambda h: (h.hbm_bw, h.fp8_flops))
    if len(hws) > 1:
        notes.append(f"mixed accelerators {sorted(hws)}: every step waits for the slowest, {hw.key}")
    model = models[hw.key]
    rpn = max(n.ranks for n in inp.nodes)
    dom = domain_size(hw, rpn)
    backend = inp.ep_backend
    if backend == "wave" and not hw.has_fp4:
        problems.append(f"ep_backend wave (DeepGEMM MegaMoE) needs SM100 (Blackwell); {hw.key} is Hopper: "
                        f"modelled as sync")
        backend = "sync"
    elif backend == "wave" and world > dom:
        problems.append(f"ep_backend wave (MegaMoE) works only inside one NVLink domain; {world} ranks span "
                        f"{math.ceil(world / dom)} domains of {dom} ({hw.key}): modelled as sync; use tbo, or keep "
                        f"the EP group within {dom} GPUs")
        backend = "sync"
    lay = Layout(world, dom, rpn, hw, backend, inp.policy, inp.redundant_experts)
    mem_min = min((m for _, _, m in rows), key=lambda m: m.seqs_at_context)
    slots = mem_min.expert_slots
    want = concurrency / world
    fit = min(mem_min.seqs_at_context, inp.max_num_seqs)
    batch = min(want, fit)
    if want > fit:
        why = (f"the KV budget holds {mem_min.seqs_at_context} sequences of {context} tokens"
               if mem_min.seqs_at_context < inp.max_num_seqs else f"scheduler.max_num_seqs is {inp.max_num_seqs}")
        problems.append(f"concurrency {concurrency} = {want:.1f} sequences per rank, but {why} per rank: "
                        f"decode modelled at {batch} per rank")
    perf = None
    if batch > 0:
        t_pre = inp.max_num_batched_tokens
        pre = prefill(model, lay, eff, slots, isl, t_pre)  # every rank prefilling: the prefill throughput
        alone = prefill(model, lay, eff, slots, isl, t_pre, alone=True)  # one rank prefilling: its TTFT and stalls
        ctx = isl + osl // 2
        dec = decode(model, lay, eff, slots, batch, ctx)
        tpot = dec.step.time_s
        ttft = math.ceil(isl / t_pre) * alone.step.time_s if isl > t_pre else alone.step.time_s
        k = math.ceil(isl / t_pre) if isl > t_pre else isl / t_pre  # prefill steps per request
        step, stall = colocated_step(world, batch, k, max(alone.step.time_s, tpot), tpot, osl)
        cycle = (k + osl) * step
        out_gpu = batch * osl / cycle
        perf = Perf(isl, osl, concurrency, batch, ctx, t_pre, pre.tokens_per_s_per_gpu, dec.tokens_per_s_per_gpu,
                    ttft, tpot, out_gpu, out_gpu * rpn, pre.step.to_dict(), dec.step.to_dict(),
                    dataclasses.asdict(eff), {"world": world, "nvl_domain": dom, "ranks_per_node": rpn,
                                              "accelerator": hw.key, "ep_backend": backend, "policy": inp.policy,
                                              "redundant_experts": inp.redundant_experts, "expert_slots": slots},
                    cycle, step, stall)
    return Plan(inp.model_name, world, tuple(rows), perf, tuple(problems), tuple(notes), model.weight_bytes,
                no_perf_reason=None if perf is not None else "no sequence fits; see below")
