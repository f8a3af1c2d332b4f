"""Roofline model of one engine step, for prefill and for decode, on an expert-parallel + DP-attention layout.

Per layer and rank, each kernel group takes max(FLOPs / (peak x compute_eff), bytes / (HBM BW x hbm_eff)):
attention projections (incl. V4 compressors and indexer projections), the attention core by layer kind (V4:
SWA window, CSA window + top-k compressed + lightning-indexer scores over all compressed keys, HCA window +
every compressed entry; V3: MLA, absorbed in decode, MHA in prefill; V3.2: DSA, the lightning indexer over every
previous token, then absorbed MLA over the top-k), mHC, router, routed experts (tokens
received x top-k x imbalance; only the weights of the experts that receive a token are read), shared expert,
V3's dense FFN, and the LM head once per step. Every kernel also costs a fixed launch/tail overhead.

All-to-all per MoE layer (dispatch in FP8 with a float32 scale per 128 values, combine in BF16, as DeepEP does):
decode, and every step of a fixed-capacity backend (`ll`), sends one copy per (token, remote expert) like
DeepEP's low-latency kernels; prefill otherwise sends one copy per (token, remote rank) inside the NVLink domain
and one per (token, remote domain) over the scale-out network, like DeepEP's normal kernels. NVLink and the
network run in parallel; each collective has a fixed latency.

Overlap by the backend's declared `overlap` (comm.backends.registry; any registered backend name is accepted):
`none` (sync, ll) layer = compute + comm; `micro_batches` (tbo) two micro-batches, comm of one hides behind
compute of the other up to `overlap` of the shorter, and every weight is read once per micro-batch;
`expert_waves` (wave, MegaMoE) hides comm behind the routed-expert GEMMs only, inside one NVLink domain.

The efficiency factors are global (one set for every GPU and model) and come from published kernel
measurements, not from the serving figures the model is tested against; see `Efficiency`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from cluster.plan.hardware import Hardware
from cluster.plan.model_spec import Group, LayerSpec, PlanModel
from comm.backends.registry import backend_capabilities, backend_names


@dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of the datasheet peaks, and fixed latencies. One global set.

    compute 0.6: DeepGEMM FP8 GEMMs reach ~1,550 of 1,979 TFLOPS on H800 (0.78) for large shapes; grouped
        MoE GEMMs and FlashMLA (660 of 989 BF16 TFLOPS, 0.67) are lower; MegaMoE at 32k tokens/rank on SM100
        reports 2,438 TFLOPS for Pro (0.54 of 4.5 PFLOPS FP8, comm included) -> 0.6.
    hbm 0.8: FlashMLA reaches 3,000 of 3,350 GB/s (0.9) in its best case; smaller decode kernels less -> 0.8.
    nvlink 0.75: DeepEP normal intranode 153-158 GB/s of H800's 200 GB/s per direction (0.78); DeepEP V2 on
        SM100 726-740 of 900 GB/s (0.81); low-latency kernels lower -> 0.75.
    scaleout 0.85: DeepEP internode 43-58 GB/s and low-latency 39-46 GB/s of a 50 GB/s CX7 port -> 0.85.
    overlap 0.85: fraction of the shorter of (compute, comm) hidden by TBO / MegaMoE waves (pipeline fill and
        the ~4 us NVLink barriers of MegaMoE are not hidden).
    kernel_s 4 us: launch gap + tail per kernel under CUDA graphs; `KERNELS_PER_LAYER` counts them.
    a2a_latency 10 us NVLink / 25 us scale-out per collective: DeepEP low-latency dispatch of a few tokens
        takes tens of us (V1 EP8: 77 us for 128 tokens, mostly bandwidth); a floor for small decode batches.
    imbalance: max/mean tokens per rank of the routed experts; EPLB with redundant experts 1.2, static 1.8
        (SGLang measured EPLB speed-ups of 1.49x prefill: 1.2 x 1.49 ~ 1.8).
    """

    compute: float = 0.6
    hbm: float = 0.8
    nvlink: float = 0.75
    scaleout: float = 0.85
    overlap: float = 0.85
    kernel_s: float = 4e-6
    a2a_latency_nvlink_s: float = 10e-6
    a2a_latency_scaleout_s: float = 25e-6
    imbalance_eplb: float = 1.2
    imbalance_static: float = 1.8


# Kernels per layer (attention + FFN sub-layer), by attention kind, as the reference/vLLM run them:
# swa: hc_pre x2 (prenorm GEMM, sinkhorn/apply), norms x2, wq_a, q_norm, wq_b, q head-norm+rope, wkv, kv
#   norm+rope+quant, cache write, sparse attention, inverse rope, wo_a, wo_b, hc_post x2, router GEMM, top-k,
#   dispatch, expert GEMMs x2 + activation, combine, shared expert x3 -> 26; hca adds the compressor (GEMM,
#   pool, norm+rope, write) -> 30; csa adds the indexer too (wq_b, rope+hadamard+quant, weights_proj, its
#   compressor x4, logits, top-k) -> 39; mla (V3): norm x2, q_a, q_norm, q_b, kv_a, kv_norm+rope, cache write,
#   absorb bmm x2, MLA, o_proj, router, top-k, dispatch, GEMMs x3, combine, shared x3, adds -> 24; dsa (V3.2)
#   adds the indexer (wq_b, wk, k LayerNorm + rope, key quant + cache write, weights_proj, logits, top-k) -> 31.
KERNELS_PER_LAYER = {"swa": 26, "hca": 30, "csa": 39, "mla": 24, "dsa": 31}
HEAD_KERNELS = 4  # final norm/hc head, LM head GEMM, sampling


@dataclass(frozen=True)
class Layout:
    """Where the EP ranks are: `world` ranks, `domain` of them per NVLink domain (8 on HGX, up to 72 on NVL72)."""

    world: int
    domain: int
    ranks_per_node: int
    hw: Hardware
    backend: str = "sync"
    policy: str = "eplb"
    redundant: int = 0

    def __post_init__(self) -> None:
        if self.backend not in backend_names():
            raise ValueError(f"ep_backend must be one of {backend_names()}, got {self.backend!r}")
        if self.world < 1 or self.domain < 1 or self.ranks_per_node < 1:
            raise ValueError("world, domain and ranks_per_node must be positive")

    @property
    def local(self) -> int:
        """Ranks in this rank's NVLink domain (itself included)."""
        return min(self.domain, self.world)

    @property
    def n_domains(self) -> int:
        return math.ceil(self.world / self.local)


@dataclass(frozen=True)
class Cost:
    """One kernel group: FLOPs by rate and bytes of HBM traffic."""

    fp8: float = 0.0
    bf16: float = 0.0
    bytes: float = 0.0
    kernels: int = 0

    def time(self, hw: Hardware, eff: Efficiency) -> float:
        flops_t = (self.fp8 / hw.flops("fp8") + self.bf16 / hw.flops("bf16")) / eff.compute
        return max(flops_t, self.bytes / (hw.hbm_bw * eff.hbm)) + self.kernels * eff.kernel_s


@dataclass(frozen=True)
class Queries:
    """`n_seqs` sequences (may be fractional: an average), each running the queries at positions
    [start, start + length) of its context in this step."""

    n_seqs: float
    start: int
    length: int

    @property
    def tokens(self) -> float:
        return self.n_seqs * self.length


# ---- closed-form sums over query positions p (a query at p sees m = p + 1 tokens) ---------------------------
def _sum_floor(n: int, r: int) -> int:
    """sum_{m=1..n} m // r."""
    if n <= 0:
        return 0
    q, rem = divmod(n, r)
    return r * q * (q - 1) // 2 + q * (rem + 1)


def _sum_floor_capped(n: int, r: int, cap: int) -> int:
    """sum_{m=1..n} min(cap, m // r)."""
    knee = cap * r - 1  # m // r < cap for m <= knee
    if n <= knee:
        return _sum_floor(n, r)
    return _sum_floor(knee, r) + cap * (n - knee)


def _sum_min(n: int, cap: int) -> int:
    """sum_{m=1..n} min(m, cap)."""
    if n <= cap:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


def _span(f, q: Queries) -> float:
    """sum of f over the queries of one sequence, times n_seqs (f(n) = sum over m = 1..n)."""
    return q.n_seqs * (f(q.start + q.length) - f(q.start))


def attention_core(model: PlanModel, layer: LayerSpec, qs: list[Queries]) -> tuple[Cost, Cost]:
    """(attention core, CSA indexer scores) of one layer for the step's queries."""
    s = model.attn_shape
    h = model.n_heads
    core = idx = Cost()
    for q in qs:
        decode = q.length == 1
        if layer.attn == "dsa":  # V3.2: indexer scores every previous token, absorbed MLA over the top-k of them
            topk = s["index_topk"]
            n_att = _span(lambda n, k=topk: _sum_min(n, k), q)
            n_i = _span(lambda n: n * (n + 1) // 2, q)
            ctx_end = q.start + q.length
            flops = 2 * h * n_att * (s["kv_lora"] + s["rope_dim"]) + 2 * h * n_att * s["kv_lora"]
            kv_read = n_att if decode else q.n_seqs * ctx_end
            i_read = n_i if decode else q.n_seqs * ctx_end
            core = dataclasses.replace(core, bf16=core.bf16 + flops, bytes=core.bytes + kv_read * s["kv_token_bytes"])
            idx = dataclasses.replace(idx, fp8=idx.fp8 + 2 * s["index_heads"] * s["index_dim"] * n_i,
                                      bytes=idx.bytes + i_read * s["index_entry_bytes"])
            continue
        if layer.attn == "mla":
            n_att = _span(lambda n: n * (n + 1) // 2, q)
            if decode:  # absorbed: q.kv over (kv_lora + rope), p.v over kv_lora
                flops = 2 * h * n_att * (s["kv_lora"] + s["rope_dim"]) + 2 * h * n_att * s["kv_lora"]
            else:  # MHA over the up-projected keys/values
                flops = 2 * h * n_att * (s["nope_dim"] + s["rope_dim"]) + 2 * h * n_att * s["v_dim"]
            ctx_end = q.start + q.length
            kv_bytes = (n_att if decode else q.n_seqs * ctx_end) * s["kv_token_bytes"]
            core = dataclasses.replace(core, bf16=core.bf16 + flops, bytes=core.bytes + kv_bytes)
            continue
        w, d, entry = s["window"], s["head_dim"], s["kv_entry_bytes"]
        n_att = _span(lambda n, w=w: _sum_min(n, w), q)
        n_read = n_att if decode else q.n_seqs * min(q.start + q.length, w)
        if layer.attn == "csa":
            n_c = _span(lambda n: _sum_floor_capped(n, 4, s["index_topk"]), q)
            n_i = _span(lambda n: _sum_floor(n, 4), q)
            n_att += n_c
            n_read += n_c if decode else q.n_seqs * ((q.start + q.length) // 4)
            i_read = n_i if decode else q.n_seqs * ((q.start + q.length) // 4)
            idx = dataclasses.replace(idx, fp8=idx.fp8 + 2 * s["index_heads"] * s["index_dim"] * n_i,
                                      bytes=idx.bytes + i_read * s["index_entry_bytes"])
        elif layer.attn == "hca":
            n_h = _span(lambda n: _sum_floor(n, 128), q)
            n_att += n_h
            n_read += n_h if decode else q.n_seqs * ((q.start + q.length) // 128)
        core = dataclasses.replace(core, bf16=core.bf16 + 4 * h * d * n_att, bytes=core.bytes + n_read * entry)
    return core, idx


def _g(layer: LayerSpec, kind: str) -> Group:
    return layer.groups.get(kind, Group())


def layer_costs(model: PlanModel, layer: LayerSpec, qs: list[Queries], lay: Layout, eff: Efficiency,
                slots_per_rank: float, expert_share: float = 1.0) -> dict[str, Cost]:
    """Kernel groups of one layer on one rank; weights are read once (a micro-batch multiplies them).
    `expert_share`: the routed-expert tokens each rank receives, as a fraction of what it would receive if every
    rank ran `qs` (1.0); a step in which ONE rank of the EP group prefills and the others have (almost) nothing
    spreads that rank's tokens over all the experts: 1 / world."""
    t = sum(q.tokens for q in qs)
    dm = model.hidden
    attn = _g(layer, "attention") + _g(layer, "compressor") + _g(layer, "indexer") + _g(layer, "norm")
    out: dict[str, Cost] = {}
    out["attn_proj"] = Cost(fp8=t * attn.flops_fp8, bf16=t * attn.flops_bf16, bytes=attn.bytes + 4 * t * dm,
                            kernels=KERNELS_PER_LAYER[layer.attn] - 12)
    core, idx = attention_core(model, layer, qs)
    out["attn_core"] = dataclasses.replace(core, kernels=1)
    if idx.fp8:
        out["indexer_scores"] = dataclasses.replace(idx, kernels=2)
    mhc = _g(layer, "mhc")
    if mhc.bytes:  # 2 sub-layers x (read for pre; read + write for post) of hc_mult x D BF16 values
        out["mhc"] = Cost(bf16=t * (mhc.flops_bf16 + mhc.flops_fp8), bytes=mhc.bytes + 12 * t * model.hc_mult * dm,
                          kernels=4)
    if layer.moe:
        router = _g(layer, "router")
        out["router"] = Cost(bf16=t * router.flops_bf16, bytes=router.bytes + 2 * t * dm, kernels=2)
        recv = t * model.top_k * _imbalance(lay, eff) * expert_share
        per_expert = _g(layer, "routed_experts")
        e = model.n_routed_experts
        flops_per_copy = per_expert.flops_fp8 / e
        phys = e + lay.redundant
        copies_total = t * lay.world * model.top_k * expert_share
        touched = slots_per_rank * (1.0 - math.exp(-copies_total / phys))
        out["experts"] = Cost(fp8=recv * flops_per_copy, bytes=touched * per_expert.bytes / e + 3 * recv * dm,
                              kernels=3)
        shared = _g(layer, "shared_expert")
        if shared.bytes:
            out["shared_expert"] = Cost(fp8=t * shared.flops_fp8, bytes=shared.bytes + 4 * t * dm, kernels=3)
    else:
        dense = _g(layer, "dense_ffn")
        out["dense_ffn"] = Cost(fp8=t * dense.flops_fp8, bytes=dense.bytes + 4 * t * dm, kernels=3)
    return out


def _imbalance(lay: Layout, eff: Efficiency) -> float:
    if lay.world == 1:
        return 1.0
    return eff.imbalance_eplb if lay.policy == "eplb" else eff.imbalance_static


@dataclass(frozen=True)
class Comm:
    intra_bytes: float  # per rank, per direction, NVLink (dispatch + combine)
    inter_bytes: float  # per rank, per direction, scale-out (dispatch + combine)
    time_s: float
    dispatch_bytes: float = 0.0  # intra + inter of the FP8 dispatch
    combine_bytes: float = 0.0  # intra + inter of the BF16 combine


def a2a(model: PlanModel, tokens: float, decode: bool, lay: Layout, eff: Efficiency) -> Comm:
    """Dispatch + combine of one MoE layer on one rank."""
    w, k = lay.world, model.top_k
    if w == 1:
        return Comm(0.0, 0.0, 0.0)
    imb = _imbalance(lay, eff)
    local = lay.local
    if decode or backend_capabilities(lay.backend).fixed_capacity:  # one copy per (token, expert) on another rank
        intra_copies = tokens * k * (local - 1) / w
        inter_copies = tokens * k * (w - local) / w
    else:  # one copy per (token, destination rank) in the domain, per (token, remote domain) outside
        p_rank = 1.0 - (1.0 - 1.0 / w) ** k
        intra_copies = tokens * (local - 1) * p_rank
        p_dom = 1.0 - (1.0 - local / w) ** k
        inter_copies = tokens * (lay.n_domains - 1) * p_dom
    dispatch_copy = model.hidden * (1 + 4 / 128)  # FP8 values + a float32 scale per 128
    combine_copy = model.hidden * 2  # BF16
    per_copy = dispatch_copy + combine_copy
    intra = intra_copies * per_copy * imb
    inter = inter_copies * per_copy * imb
    t = _lat(lay, eff) + max(intra / (lay.hw.nvlink_bw * eff.nvlink), inter / (lay.hw.scaleout_bw * eff.scaleout))
    copies = (intra_copies + inter_copies) * imb
    return Comm(intra, inter, t, copies * dispatch_copy, copies * combine_copy)


@dataclass(frozen=True)
class StepResult:
    tokens_per_rank: float
    time_s: float
    compute_s: float  # sum of kernel times (both micro-batches for a micro_batches backend such as tbo)
    comm_s: float  # all-to-all time of every MoE layer
    exposed_comm_s: float
    by_component_s: dict  # component -> seconds summed over layers (compute only)
    a2a_bytes_intra: float  # per rank per step, all MoE layers, dispatch + combine
    a2a_bytes_inter: float
    a2a_dispatch_bytes: float  # per rank per step, all MoE layers, NVLink + scale-out
    a2a_combine_bytes: float
    backend: str
    # one layer of each kind ("csa/moe", "mla/dense", ...): component -> {fp8_flops, bf16_flops, bytes, time_s},
    # plus "all_to_all": {dispatch_bytes, combine_bytes, time_s}; for the whole step (both micro-batches)
    per_layer: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def step_time(model: PlanModel, qs: list[Queries], lay: Layout, eff: Efficiency, slots_per_rank: float,
              logits_rows: float, expert_share: float = 1.0) -> StepResult:
    """One engine step on one rank: every main layer (MTP blocks are not run), then the LM head.
    `expert_share` as in `layer_costs` (the all-to-all is the sending rank's, unchanged)."""
    decode = all(q.length == 1 for q in qs)
    backend = lay.backend
    overlap = backend_capabilities(backend).overlap
    micro = 2 if overlap == "micro_batches" else 1
    mqs = [dataclasses.replace(q, n_seqs=q.n_seqs / micro) for q in qs]
    tokens = sum(q.tokens for q in qs)
    total = compute_all = comm_all = exposed = 0.0
    by_comp: dict[str, float] = {}
    intra_b = inter_b = disp_b = comb_b = 0.0
    per_layer: dict[str, dict] = {}
    for layer in model.layers[: model.n_main_layers]:
        costs = layer_costs(model, layer, mqs, lay, eff, slots_per_rank, expert_share)
        times = {name: micro * c.time(lay.hw, eff) for name, c in costs.items()}
        for name, v in times.items():
            by_comp[name] = by_comp.get(name, 0.0) + v
        comp = sum(times.values())
        comm = a2a(model, tokens, decode, lay, eff) if layer.moe else Comm(0.0, 0.0, 0.0)
        m = comm.time_s + (micro - 1) * _lat(lay, eff) if comm.time_s else 0.0
        intra_b += comm.intra_bytes
        inter_b += comm.inter_bytes
        disp_b += comm.dispatch_bytes
        comb_b += comm.combine_bytes
        key = f"{layer.attn}/{'moe' if layer.moe else 'dense'}"
        if key not in per_layer:
            per_layer[key] = {name: {"fp8_flops": micro * c.fp8, "bf16_flops": micro * c.bf16,
                                     "bytes": micro * c.bytes, "time_s": times[name]} for name, c in costs.items()}
            if layer.moe:
                per_layer[key]["all_to_all"] = {"dispatch_bytes": comm.dispatch_bytes,
                                                "combine_bytes": comm.combine_bytes, "time_s": m}
        if overlap == "none" or m == 0:
            t_layer = comp + m
        elif overlap == "micro_batches":
            t_layer = max(comp, m) + (1 - eff.overlap) * min(comp, m)
        else:  # expert_waves: only the routed-expert GEMMs hide the all-to-all
            ex = times.get("experts", 0.0)
            t_layer = comp - ex + max(ex, m) + (1 - eff.overlap) * min(ex, m)
        compute_all += comp
        comm_all += m
        exposed += t_layer - comp
        total += t_layer
    head = model.top_groups.get("head", Group())
    hcost = Cost(bf16=logits_rows * head.flops_bf16, bytes=head.bytes + 4 * logits_rows * model.vocab,
                 kernels=HEAD_KERNELS)
    ht = hcost.time(lay.hw, eff)
    by_comp["head"] = ht
    total += ht
    compute_all += ht
    return StepResult(tokens, total, compute_all, comm_all, exposed, by_comp, intra_b, inter_b, disp_b, comb_b,
                      backend, per_layer)


def _lat(lay: Layout, eff: Efficiency) -> float:
    """Latency part of one layer's dispatch + combine (a second micro-batch pays it again, not the bytes)."""
    return 2 * (eff.a2a_latency_scaleout_s if lay.n_domains > 1 else eff.a2a_latency_nvlink_s)


def token_flops(model: PlanModel, position: int, hw: Hardware) -> dict[str, float]:
    """FLOPs of generating ONE token whose query sits at `position` (it sees position + 1 tokens): every main
    layer's kernel groups as `layer_costs` counts them for a decode step of one sequence on one GPU (no expert
    imbalance, no all-to-all), plus the LM head. Returns FLOPs by component and their `total`; `hw` only sets
    the Layout (FLOPs do not depend on it)."""
    if not isinstance(position, int) or position < 0:
        raise ValueError(f"position must be a non-negative integer, got {position!r}")
    lay = Layout(1, 1, 1, hw)
    eff = Efficiency()
    qs = [Queries(1.0, position, 1)]
    out: dict[str, float] = {}
    for layer in model.layers[: model.n_main_layers]:
        for name, c in layer_costs(model, layer, qs, lay, eff, float(model.n_routed_experts)).items():
            out[name] = out.get(name, 0.0) + c.fp8 + c.bf16
    out["head"] = float(model.top_groups.get("head", Group()).flops_bf16)
    out["total"] = sum(out.values())
    return out


# ---- phases ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    tokens_per_s_per_gpu: float
    step: StepResult


def prefill(model: PlanModel, lay: Layout, eff: Efficiency, slots: float, isl: int, tokens_per_rank: int,
            alone: bool = False) -> Phase:
    """Prefill throughput with `tokens_per_rank` prompt tokens per step (whole prompts of `isl`, or one chunk
    of a longer prompt at its average position). `alone`: only this rank of the EP group prefills in the step
    (colocated serving, where prefills of different ranks rarely coincide): the experts of every rank share
    its tokens (expert_share 1 / world)."""
    if isl <= tokens_per_rank:
        qs = [Queries(tokens_per_rank / isl, 0, isl)]
        rows = tokens_per_rank / isl
    else:  # a chunk of a long prompt: average over the chunks of the prompt
        n_chunks = math.ceil(isl / tokens_per_rank)
        qs = [Queries(1.0 / n_chunks, c * tokens_per_rank, min(tokens_per_rank, isl - c * tokens_per_rank))
              for c in range(n_chunks)]
        rows = 1.0 / n_chunks
    st = step_time(model, qs, lay, eff, slots, rows, 1.0 / lay.world if alone else 1.0)
    return Phase(st.tokens_per_rank / st.time_s, st)


def decode(model: PlanModel, lay: Layout, eff: Efficiency, slots: float, batch_per_rank: float, context: int) -> Phase:
    """Decode throughput with `batch_per_rank` sequences per rank at `context` tokens."""
    if batch_per_rank <= 0:
        raise ValueError(f"decode batch per rank must be positive, got {batch_per_rank}")
    st = step_time(model, [Queries(batch_per_rank, context, 1)], lay, eff, slots, batch_per_rank)
    return Phase(batch_per_rank / st.time_s, st)


def max_batch_at_tpot(model: PlanModel, lay: Layout, eff: Efficiency, slots: float, context: int,
                      tpot_s: float, batch_cap: int) -> int:
    """The largest decode batch per rank (<= batch_cap) whose step time is at most `tpot_s`; 0 if none."""
    lo, hi = 0, batch_cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if decode(model, lay, eff, slots, mid, context).step.time_s <= tpot_s:
            lo = mid
        else:
            hi = mid - 1
    return lo
