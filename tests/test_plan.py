"""The capacity planner (cluster/plan): memory agrees with the manifest and the cache accounting, the CLI prints
a table, and the performance model against published serving figures (run with -s to see the table).

The model's efficiency factors are global (cluster/plan/perf.py `Efficiency`, set from kernel benchmarks);
nothing here is tuned per row. Each row compares like with like (same load, same layout, same counting of
tokens and GPUs). Rows the model still misses by more than 1.5x are in KNOWN_MISSES, with the reason: strict
expected failures of the same 1.5x assertion, so the test fails when the model comes within 1.5x of one (or
lands on the other side of the published figure).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.plan.disagg import DisaggPoint, fixed_layout, ideal_split
from cluster.plan.hardware import HARDWARE_FILE, Hardware, get_hardware, load_profiles
from cluster.plan.memory import KVSettings, rank_memory
from cluster.plan.model_spec import PlanModel, from_v4
from cluster.plan.perf import (
    Efficiency,
    Layout,
    _sum_floor,
    _sum_floor_capped,
    _sum_min,
    decode,
    max_batch_at_tpot,
    prefill,
    token_flops,
)
from cluster.plan.planner import NodePlan, Perf, PlanInput, build_model, colocated_step, from_topology, make_plan
from cluster.plan.v3 import V32, from_v3
from cluster.topology import load_topology
from engine.cache import accounting as ca
from engine.model.config import V4_FLASH, V4_PRO
from engine.weights.manifest import build_manifest

ROOT = Path(__file__).resolve().parents[1]
EFF = Efficiency()


# ---- published figures ----------------------------------------------------------------------------------------
def _v3_phase(acc: str, world: int, backend: str, phase: str, isl: int, tokens: int = 16384, batch: float = 0.0,
              ctx: int = 0) -> float:
    """V3 on `world` GPUs (8 per node), 32 redundant experts with EPLB; tokens/s per NODE of one phase."""
    hw = get_hardware(acc)
    model = _v3_model()
    lay = Layout(world, 8, 8, hw, backend, "eplb", 32)
    slots = (256 + 32) / world
    if phase == "prefill":
        return 8 * prefill(model, lay, EFF, slots, isl, tokens).tokens_per_s_per_gpu
    return 8 * decode(model, lay, EFF, slots, batch, ctx).tokens_per_s_per_gpu


@cache
def _v3_model() -> PlanModel:
    return from_v3()


@cache
def _v4_pro(acc: str) -> tuple[PlanModel, Hardware]:
    """V4-Pro as the planner builds it for `acc` (FP4 experts on Blackwell, FP8 KV as vLLM runs it)."""
    hw = get_hardware(acc)
    model, _ = build_model(PlanInput(V4_PRO, "v4-pro", (NodePlan("n", 8, acc),), kv_dtype="fp8"), hw)
    return model, hw


@cache
def _lambda_perf() -> Perf:
    """V4-Pro on one 8xB200 node (vLLM DP8 + EP, FP8 KV), 32 concurrent, ISL 8192 / OSL 2048, colocated prefill
    and decode; vLLM's DBO is off below 32 tokens per rank, EPLB off by default -> sync, static. make_plan's
    colocated cycle: the DP ranks step in lockstep, so each rank's prefills stall the whole EP group."""
    inp = PlanInput(V4_PRO, "v4-pro", (NodePlan("b200", 8, "b200"),), ep_backend="sync", policy="static",
                    max_num_seqs=64, max_num_batched_tokens=8192, memory_fraction=0.9, kv_dtype="fp8")
    perf = make_plan(inp, isl=8192, osl=2048, concurrency=32).perf
    assert perf is not None and perf.batch_per_rank == 4
    return perf


@cache
def _inferencex_frontier(acc: str) -> DisaggPoint:
    """The model's own Pareto point at 27 tok/s/user for V4-Pro FP4, ISL 8K / OSL 1K, disaggregated: decode EP 32
    with MegaMoE (wave) and EPLB (+32 redundant) at the largest batch whose step fits 1/27 s (and the KV cache),
    prefill EP 32 likewise, and as many prefill GPUs per decode GPU as 8K prompts need at the model's prefill
    rate (`disagg.ideal_split`); (input + output) tokens/s over prefill AND decode GPUs, as InferenceX counts."""
    model, hw = _v4_pro(acc)
    mem = rank_memory(model, hw, 32, 32, KVSettings(256, 1024, 8192, None, 0.9), 8192 + 1024)
    lay = Layout(32, hw.nvl_domain, 32, hw, "wave", "eplb", 32)
    p_rate = prefill(model, lay, EFF, mem.expert_slots, 8192, 8192).tokens_per_s_per_gpu
    b = max_batch_at_tpot(model, lay, EFF, mem.expert_slots, 8192 + 512, 1 / 27, min(mem.seqs_at_context, 1024))
    tpot = decode(model, lay, EFF, mem.expert_slots, b, 8192 + 512).step.time_s
    return ideal_split(8192, 1024, p_rate, b, tpot)


@cache
def _inferencex_recipe(acc: str, prefill_gpus: int, decode_gpus: int, decode_ep: int, conc: int) -> DisaggPoint:
    """A measured InferenceX recipe with its published layout (V4-Pro FP4, 8K/1K, Dynamo + vLLM): prefill workers
    of TP 8 (the planner has no TP: modelled as EP 8 in the NVLink domain, sync, with the EPLB imbalance, the
    closest of the global set to TP's even split of every expert), decode workers of DP-attention EP `decode_ep`
    with vLLM's MegaMoE path (wave) and its default static placement; closed loop at `conc` (`fixed_layout`)."""
    model, hw = _v4_pro(acc)
    pre_lay = Layout(8, hw.nvl_domain, 8, hw, "sync", "eplb", 0)
    p_rate = prefill(model, pre_lay, EFF, 384 / 8, 8192, 8192).tokens_per_s_per_gpu
    dec_lay = Layout(decode_ep, hw.nvl_domain, decode_ep, hw, "wave", "static", 0)
    slots = 384 / decode_ep
    mem = rank_memory(model, hw, decode_ep, 0, KVSettings(256, 1024, 8192, None, 0.9), 8192 + 1024)
    assert conc / decode_gpus <= mem.seqs_at_context  # the recipe's batch fits the model's KV cache

    def tpot_at(b: float) -> float:
        return decode(model, dec_lay, EFF, slots, b, 8192 + 512).step.time_s

    return fixed_layout(8192, 1024, p_rate, tpot_at, prefill_gpus, decode_gpus, conc, iterations=8)


@cache
def _v32_model() -> PlanModel:
    return from_v3(V32)


@cache
def _v4_claims() -> dict[str, float]:
    """Per-token FLOPs (perf.token_flops: the planner's own kernel-group counts for one decode token) of a query
    at position 2^20 - 1 (it sees 1M tokens) and KV bytes of one 1M-token sequence (the planner's KV models:
    engine/cache/accounting.py for V4 in BF16, MLA BF16 latent + FP8 indexer keys for V3.2, as the reference
    inference code caches them) for V4-Pro, V4-Flash and V3.2."""
    hw = get_hardware("b200")
    ctx = 2**20
    models = {"pro": from_v4(V4_PRO), "flash": from_v4(V4_FLASH), "v32": _v32_model()}
    out: dict[str, float] = {}
    for k, m in models.items():
        out[f"{k}_flops"] = token_flops(m, ctx - 1, hw)["total"]
        out[f"{k}_kv"] = m.kv.breakdown(ctx)["kv"]
    return out


@dataclass(frozen=True)
class Row:
    name: str
    unit: str
    published: float
    predict: Callable[[], float]
    miss: str = ""  # known misses only: why the model misses this row by more than 1.5x
    model_high: bool = True  # known misses only: the model is above the published figure (False: below)


ROWS = [
    # DeepSeek "Day 6: One More Thing, DeepSeek-V3/R1 Inference System Overview" (deepseek-ai/open-infra-index,
    # 202502OpenSourceWeek/day_6_...md): 24-hour average per H800 node, prefill EP32 over 4 nodes, 32 redundant
    # experts, dual micro-batch overlap; 73.7k input tok/s per node INCLUDING on-disk cache hits (56.3%).
    # Prompt length not published; DeepSeek's profile data uses 4096-token prompts, 16,384 tokens per GPU.
    Row("DeepSeek V3 prefill, H800, EP32 (DeepSeek day 6)", "input tok/s/node", 73_700,
        lambda: _v3_phase("h800", 32, "tbo", "prefill", 4096)),
    # Same source: decode EP144 over 18 nodes, 14.8k output tok/s per node at 20-22 tok/s/user, average KV length
    # 4,989 -> 14,800 / 8 GPUs / 21 tok/s = 88 sequences per GPU.
    Row("DeepSeek V3 decode, H800, EP144 (DeepSeek day 6)", "output tok/s/node", 14_800,
        lambda: _v3_phase("h800", 144, "tbo", "decode", 0, batch=14_800 / 8 / 21, ctx=4989)),
    # LMSYS blog 2025-05-05 "Deploying DeepSeek with PD Disaggregation and Large-scale Expert Parallelism on 96
    # H100 GPUs": prefill 4 nodes EP32, 52.3k input tok/s per node at 2K prompts, 16,384 tokens per device, TBO.
    Row("SGLang V3 prefill, H100, EP32 (LMSYS 96xH100)", "input tok/s/node", 52_300,
        lambda: _v3_phase("h100", 32, "tbo", "prefill", 2000)),
    # Same blog: decode 9 nodes EP72, 22.3k output tok/s per node, batch 256 per GPU at 2K input (KV ~2,000).
    Row("SGLang V3 decode, H100, EP72 (LMSYS 96xH100)", "output tok/s/node", 22_300,
        lambda: _v3_phase("h100", 72, "tbo", "decode", 0, batch=256, ctx=2000)),
    # lambda.ai model page deepseek-ai/deepseek-v4-pro (v4-model.md §6, S19): 855 tok/s generation on 8xB200 with
    # vLLM, 32 concurrent, ISL 8192 / OSL 2048, 27 tok/s/user, TTFT 3.66 s. Compared at the stated concurrency.
    Row("V4-Pro, 8xB200, vLLM, 32 conc. 8K/2K (Lambda)", "output tok/s/node", 855,
        lambda: _lambda_perf().output_tok_s_node),
    Row("  same, per-user decode rate (Lambda)", "tok/s/user", 27, lambda: 1 / _lambda_perf().user_tpot_s),
    # HF model card of deepseek-ai/DeepSeek-V4-Pro as quoted in v4-model.md §6 (S15): at 1M context V4-Pro needs
    # 27% of DeepSeek-V3.2's single-token FLOPs and 10% of its KV cache; V4-Flash 10% and 7%.
    Row("V4-Pro / V3.2 single-token FLOPs at 1M (DeepSeek)", "ratio", 0.27,
        lambda: _v4_claims()["pro_flops"] / _v4_claims()["v32_flops"]),
    Row("V4-Flash / V3.2 single-token FLOPs at 1M (DeepSeek)", "ratio", 0.10,
        lambda: _v4_claims()["flash_flops"] / _v4_claims()["v32_flops"]),
    Row("V4-Pro / V3.2 KV cache at 1M (DeepSeek)", "ratio", 0.10,
        lambda: _v4_claims()["pro_kv"] / _v4_claims()["v32_kv"]),
    Row("V4-Flash / V3.2 KV cache at 1M (DeepSeek)", "ratio", 0.07,
        lambda: _v4_claims()["flash_kv"] / _v4_claims()["v32_kv"]),
    # vLLM blog "DeepSeek V4 in vLLM: Efficient Long-context Attention" (v4-model.md §6, S13): V4-Pro's KV is 8.7x
    # smaller than V3.2's at 1M; ~9.62 GiB per sequence in BF16.
    Row("V3.2 / V4-Pro KV cache at 1M (vLLM blog)", "ratio", 8.7,
        lambda: _v4_claims()["v32_kv"] / _v4_claims()["pro_kv"]),
    Row("V4-Pro KV per sequence at 1M, BF16 (vLLM blog)", "GiB", 9.62, lambda: _v4_claims()["pro_kv"] / 2**30),
    # SemiAnalysis InferenceX blog "GB300 NVL72 vs GB200 NVL72 ... DeepSeek-V4-Pro 1.6T" (2026-05-26; v4-model.md
    # §6, S17), its tables of measured recipes: V4-Pro FP4, ISL 8K / OSL 1K, Dynamo + vLLM disaggregated, no MTP.
    # tok/s/GPU is InferenceX's tput_per_gpu: (input + output) tokens over prefill + decode GPUs
    # (SemiAnalysisAI/InferenceX utils/process_result.py, multinode branch); tok/s/user = 1000 / TPOT ms.
    # GB300, conc 3072, 28 prefill GPUs (TP 8) + 32 decode GPUs (EP 16): 6,812 tok/s/GPU at 25.9 tok/s/user
    # (TPOT 38.8 ms); the knot that sets the GB300 frontier at 27 tok/s/user. Its tok/s/user is a known miss.
    Row("V4-Pro, GB300, 28P TP8 + 32D EP16, conc 3072 (InferenceX)", "tok/s/GPU", 6_812,
        lambda: _inferencex_recipe("gb300", 28, 32, 16, 3072).tok_s_per_gpu),
    # GB200, conc 256, 8 prefill GPUs (TP 8) + 8 decode GPUs (EP 8): 3,148 tok/s/GPU at 24.4 tok/s/user (TPOT
    # 41.2 ms). Its tok/s/GPU is a known miss.
    Row("V4-Pro, GB200, 8P TP8 + 8D EP8, conc 256, per user (InferenceX)", "tok/s/user", 24.42,
        lambda: _inferencex_recipe("gb200", 8, 8, 8, 256).tok_s_per_user),
]

# Rows the model still misses by more than 1.5x after like-for-like modelling, with the reason (the README shows
# them too): strict expected failures (test_known_miss_is_still_missed).
KNOWN_MISSES = [
    # Lambda (above): TTFT 3.66 s at 32 concurrent for 8,192-token prompts.
    Row("V4-Pro, 8xB200, vLLM, 32 conc. 8K/2K, TTFT (Lambda)", "s", 3.66, lambda: _lambda_perf().ttft_s,
        miss="the model prefills one 8K prompt in ~0.4 s (21k tok/s on the prefilling rank); 3.66 s means ~2.2k "
             "tok/s, or queueing behind other prefills that the model (no queue) does not see", model_high=False),
    # InferenceX (above): the headline figures, GB200 2,189 and GB300 6,182 tok/s/GPU at 27 tok/s/user, are read
    # off the measured Pareto frontier (interpolated between recipes: the blog's iso-interactivity table); the
    # model's analogue is its own frontier at TPOT = 1/27 s with the prefill GPUs that frontier needs.
    Row("V4-Pro, GB200 NVL72, disagg 8K/1K @27 tok/s/user (InferenceX)", "tok/s/GPU", 2_189,
        lambda: _inferencex_frontier("gb200").tok_s_per_gpu,
        miss="frontier vs frontier: the model's decode step is nearly flat in batch (~19 ms from 32 to 128 seqs/GPU, "
             "reading weights), so at 37 ms it runs the KV-limited batch, 352 seqs/GPU, with 4.9 prefill GPUs per "
             "decode GPU; vLLM's recipes reach 27 tok/s/user only at a few dozen seqs/GPU"),
    Row("V4-Pro, GB300 NVL72, disagg 8K/1K @27 tok/s/user (InferenceX)", "tok/s/GPU", 6_182,
        lambda: _inferencex_frontier("gb300").tok_s_per_gpu,
        miss="as GB200: the model reaches 27 tok/s/user at 535 seqs/GPU; the measured knot next to it decodes ~55 "
             "seqs/GPU at 38.8 ms"),
    Row("V4-Pro, GB300, 28P TP8 + 32D EP16, conc 3072, per user (InferenceX)", "tok/s/user", 25.91,
        lambda: _inferencex_recipe("gb300", 28, 32, 16, 3072).tok_s_per_user,
        miss="the model's decode step at the ~44 seqs/GPU its prefill pool feeds is 22 ms; vLLM's was 38.8 ms at "
             "~55 seqs/GPU (its prefill ran at ~13k tok/s/GPU, the model's at 18k)"),
    Row("V4-Pro, GB200, 8P TP8 + 8D EP8, conc 256 (InferenceX)", "tok/s/GPU", 3_148,
        lambda: _inferencex_recipe("gb200", 8, 8, 8, 256).tok_s_per_gpu,
        miss="decode-bound in both: 32 seqs/GPU at the model's 29.6 ms step vs vLLM's 41.2 ms (1.39x), plus the "
             "prefill wait the model's faster prefill (18k vs ~5.6k tok/s/GPU measured) does not have"),
]


_PREDICTED: dict[str, float] = {}


def _predicted(row: Row) -> float:
    """The model's figure for a row (computed once per test session)."""
    if row.name not in _PREDICTED:
        _PREDICTED[row.name] = row.predict()
    return _PREDICTED[row.name]


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def published_table(rows: list[Row] = ROWS) -> str:
    """The predicted-vs-published table (also in the README)."""
    lines = [f"| {'configuration':<68} | {'unit':<17} | {'published':>9} | {'model':>9} | {'model/pub':>9} |",
             f"|{'-' * 70}|{'-' * 19}|{'-' * 11}|{'-' * 11}|{'-' * 11}|"]
    for row in rows:
        pred = _predicted(row)
        lines.append(f"| {row.name:<68} | {row.unit:<17} | {_num(row.published):>9} | {_num(pred):>9} | "
                     f"{pred / row.published:>8.2f}x |")
    return "\n".join(lines)


def test_print_published_table():
    table = published_table()
    print("\n" + table)
    print("\nKnown misses (strict expected failures):\n" + published_table(KNOWN_MISSES))
    for row in KNOWN_MISSES:
        print(f"- {row.name.strip()}: model/published {_predicted(row) / row.published:.2f}x: {row.miss}")
    assert table.count("\n") == len(ROWS) + 1
    assert sum(r.name.startswith("V4") for r in ROWS) >= 2  # issue 8: at least two V4 figures, asserted


@pytest.mark.parametrize("row", ROWS, ids=[r.name.strip() for r in ROWS])
def test_model_within_1_5x_of_published(row: Row):
    assert not row.miss
    pred = _predicted(row)
    assert 1 / 1.5 <= pred / row.published <= 1.5, f"{row.name}: model {pred:,.4g} vs published {row.published:,.4g}"


@pytest.mark.parametrize("row", [
    pytest.param(r, id=r.name.strip(), marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=r.miss))
    for r in KNOWN_MISSES])
def test_known_miss_is_still_missed(row: Row):
    """The 1.5x assertion of test_model_within_1_5x_of_published, expected to fail: a model that comes within 1.5x
    passes it and the strict xfail fails the run (move the row to ROWS). A model that crosses to the other side
    of the published figure fails with a different error than the expected AssertionError: the reason is stale."""
    assert row.miss
    pred = _predicted(row)
    if not math.isfinite(pred) or (pred > row.published) != row.model_high:
        pytest.fail(f"{row.name}: model {pred:,.4g} is now {'below' if row.model_high else 'above'} the published "
                    f"{row.published:,.4g}; the known miss's reason no longer holds: {row.miss}")
    assert 1 / 1.5 <= pred / row.published <= 1.5, f"{row.name}: model {pred:,.4g} vs published {row.published:,.4g}"


def test_disaggregation_counts_prefill_gpus():
    # 8K/1K at the model's rates: one decode GPU finishes b / (osl x TPOT) requests/s, whose prompts need
    # that x isl / prefill_rate prefill GPUs; tok/s/GPU = (isl + osl) x requests/s over both pools
    pt = ideal_split(8192, 1024, prefill_rate=20_000.0, batch=100, tpot_s=0.037)
    req_s = 100 / (1024 * 0.037)
    assert pt.prefill_gpus == pytest.approx(req_s * 8192 / 20_000)
    assert pt.tok_s_per_gpu == pytest.approx(req_s * 9216 / (1 + pt.prefill_gpus))
    assert pt.output_tok_s_per_gpu == pytest.approx(pt.tok_s_per_gpu * 1024 / 9216)
    # a fixed layout: prefill-bound (4 prefill GPUs feed 4 x 20k / 8192 requests/s) vs decode-bound
    flat = lambda b: 0.02 + 1e-5 * b  # noqa: E731
    pb = fixed_layout(8192, 1024, 20_000.0, flat, 4, 8, 4096)
    assert pb.prefill_bound and pb.requests_per_s == pytest.approx(4 * 20_000 / 8192)
    assert pb.batch_per_decode_gpu == pytest.approx(pb.requests_per_s * 1024 * flat(pb.batch_per_decode_gpu) / 8,
                                                    rel=1e-6)
    db = fixed_layout(8192, 1024, 20_000.0, flat, 16, 8, 64)
    assert not db.prefill_bound and db.batch_per_decode_gpu == 8
    assert db.requests_per_s == pytest.approx(64 / (8192 / 20_000 + 1024 * flat(8)))
    with pytest.raises(ValueError, match="prefill_gpus"):
        fixed_layout(8192, 1024, 20_000.0, flat, 0, 8, 64)


def test_colocated_step_lockstep():
    # one rank, 4 requests of 1 prefill step + 99 decode steps: 4 % of its steps prefill
    step, q = colocated_step(1, 4, 1, 0.5, 0.02, 99)
    assert q == pytest.approx(0.04) and step == pytest.approx(0.02 + 0.04 * 0.48)
    # eight ranks in lockstep: a step waits for whichever rank prefills
    step8, q8 = colocated_step(8, 4, 1, 0.5, 0.02, 99)
    assert q8 == pytest.approx(1 - 0.96**8) and step8 > step
    # prompts sharing a prefill step (isl < max_num_batched_tokens) count as a fraction of a step each
    assert colocated_step(1, 4, 0.25, 0.5, 0.02, 99)[1] == pytest.approx(4 * 0.25 / 99.25)
    with pytest.raises(ValueError):
        colocated_step(0, 4, 1, 0.5, 0.02, 99)
    # the Lambda row: 4 sequences per rank on 8 ranks; TTFT is the lone rank's prefill step
    perf = _lambda_perf()
    assert perf.stall_fraction == pytest.approx(1 - (1 - 4 / 2049) ** 8)
    assert perf.cycle_s == pytest.approx(2049 * perf.user_tpot_s)
    assert perf.output_tok_s_node == pytest.approx(8 * 4 * 2048 / perf.cycle_s)


def test_token_flops_and_kv_of_v32_vs_v4():
    claims = _v4_claims()
    # V3.2 at 1M: the lightning indexer scores every previous token in all 61 layers (64 heads x 128 dims)
    idx = 61 * 2 * 64 * 128 * 2**20
    v32 = token_flops(_v32_model(), 2**20 - 1, get_hardware("b200"))
    assert v32["indexer_scores"] == pytest.approx(idx)
    assert claims["v32_flops"] == pytest.approx(v32["total"])
    assert v32["indexer_scores"] > 1000 * token_flops(_v32_model(), 1023, get_hardware("b200"))["indexer_scores"]
    # V3.2 KV: 62 layers (MTP included) x (576 BF16 latent values + 128 FP8 indexer values + one float32 scale)
    assert claims["v32_kv"] == 62 * 2**20 * (2 * 576 + 128 + 4)
    # DSA attends to 2,048 tokens whatever the context: core attention FLOPs stop growing
    short = token_flops(_v32_model(), 2047, get_hardware("b200"))["attn_core"]
    assert v32["attn_core"] == pytest.approx(short)


# ---- memory against the manifest and the cache accounting ------------------------------------------------------
@pytest.mark.parametrize("example", ["v4-pro-blackwell.yaml", "v4-flash-blackwell.yaml"])
def test_memory_matches_manifest_and_cache_accounting(example: str):
    topo = load_topology(ROOT / "examples" / example)
    inp = from_topology(topo)
    cfg = topo.model_config()
    plan = make_plan(inp, isl=4096, osl=1024, concurrency=64)
    manifest = build_manifest(cfg)
    routed = sum(t.nbytes for t in manifest.tensors if ".ffn.experts." in t.name)
    e, w, red = cfg.n_routed_experts, topo.world_size, topo.parallel.placement.redundant_experts
    slots = (e + red) // w
    # an EP rank builds no MTP block (engine.weights.resident.rank_builds_mtp): its weights leave those tensors out
    mtp = sum(t.nbytes for t in manifest.tensors if t.name.startswith("mtp."))
    mtp_routed = sum(t.nbytes for t in manifest.tensors if t.name.startswith("mtp.") and ".ffn.experts." in t.name)
    assert w > 1 and mtp > 0
    assert plan.weight_bytes_model == manifest.bytes
    total_routed_held = 0
    for ranks, _node, m in plan.ranks:
        assert m.replicated_bytes == manifest.bytes - routed
        assert m.expert_slots == slots == topo.slots_per_rank()
        assert m.routed_total == routed * slots // e
        assert m.weight_bytes == manifest.bytes - mtp - (routed - mtp_routed) + (routed - mtp_routed) * slots // e
        assert m.redundant_bytes == pytest.approx(routed * red / w / e)
        total_routed_held += len(ranks) * m.routed_total
        # KV: the engine's own plan_cache over the same budget, and sequences of isl + osl tokens
        cache_dtype = {"fp8": "fp8_ds_mla"}.get(topo.kv_cache.dtype, topo.kv_cache.dtype)
        s = topo.scheduler
        cp = ca.plan_cache(cfg, m.kv_budget_bytes, s.page_tokens, s.max_num_seqs, cache_dtype)
        assert m.kv_tokens_capacity == cp.tokens_capacity and m.kv_pages == cp.num_pages
        hw = get_hardware(topo.nodes[0].accelerator)
        frac = topo.kv_cache.memory_fraction
        assert m.kv_budget_bytes == int(frac * hw.hbm_bytes) - m.weight_bytes - m.activation_bytes
        seq = ca.slot_bytes(cfg, cache_dtype) + math.ceil(5120 / s.page_tokens) * ca.page_bytes(cfg, s.page_tokens,
                                                                                                 cache_dtype)
        assert m.seq_bytes_at_context == seq
        assert m.seqs_at_context * seq <= m.kv_budget_bytes < (m.seqs_at_context + 1) * seq
        assert ca.sequence_cache_bytes(cfg, 5120, cache_dtype).total <= seq  # pages round the context up
    # every logical expert once, plus the redundant replicas
    assert total_routed_held == routed * (e + red) // e


def test_fp8_kv_cache_is_planned_with_the_engines_bytes():
    """kv_dtype fp8 (issue 15): the plan states the fp8_ds_mla sizes (584 B per entry, 136 B per indexer key) and
    sizes the KV with them: more tokens fit the same budget than in bfloat16."""
    nodes = tuple(NodePlan(f"b{i}", 8, "b200") for i in range(2))
    plans = {kv: make_plan(PlanInput(V4_PRO, "v4-pro", nodes, kv_dtype=kv), isl=4096, osl=1024, concurrency=64)
             for kv in ("bfloat16", "fp8")}
    bpt = ca.bytes_per_token(V4_PRO, "fp8_ds_mla")["compressed"]
    note = f"KV cache fp8 (fp8_ds_mla): 584 B per 512-value entry, 136 B per indexer key, {bpt:.1f} B per context"
    assert any(n.startswith(note) for n in plans["fp8"].notes), plans["fp8"].notes
    assert any("KV cache bfloat16 (bfloat16): 1024 B per 512-value entry" in n for n in plans["bfloat16"].notes)
    fp8, bf16 = plans["fp8"].ranks[0][2], plans["bfloat16"].ranks[0][2]
    assert fp8.kv_tokens_capacity > bf16.kv_tokens_capacity


def test_hopper_plans_fp4_experts_as_fp8():
    inp = PlanInput(V4_PRO, "v4-pro", tuple(NodePlan(f"h{i}", 8, "h200") for i in range(4)), ep_backend="wave")
    plan = make_plan(inp, isl=1024, osl=256, concurrency=64)
    m = plan.ranks[0][2]
    assert "F8_E4M3" in m.routed_bytes and "I8" not in m.routed_bytes
    assert any("no FP4 tensor cores" in n for n in plan.notes)
    assert any("needs SM100" in p for p in plan.problems)
    assert plan.perf.layout["ep_backend"] == "sync"


def test_what_does_not_fit_is_reported():
    # V4-Pro on one 8xH100 node: FP8 experts alone are ~200 GB per GPU
    inp = PlanInput(V4_PRO, "v4-pro", (NodePlan("h", 8, "h100"),))
    plan = make_plan(inp, isl=1024, osl=256, concurrency=8)
    assert any("no room for a KV cache" in p for p in plan.problems)
    assert plan.perf is None
    # more concurrency than max_num_seqs per rank
    inp = PlanInput(V4_PRO, "v4-pro", (NodePlan("g", 64, "gb300"),), ep_backend="wave", max_num_seqs=4,
                    max_num_batched_tokens=4096)
    plan = make_plan(inp, isl=1024, osl=256, concurrency=64 * 10)
    assert plan.perf.batch_per_rank == 4
    assert any("max_num_seqs is 4" in p for p in plan.problems)


# ---- performance model pieces ----------------------------------------------------------------------------------
def test_every_tensor_has_a_kind():
    from cluster.plan.model_spec import KINDS, classify

    assert {classify(t.name) for t in build_manifest(V4_PRO).tensors} <= set(KINDS)
    with pytest.raises(ValueError, match="cannot classify"):
        classify("layers.0.mystery.weight")


def test_closed_form_sums():
    for n in (0, 1, 3, 4, 5, 127, 128, 129, 1000, 4099):
        assert _sum_floor(n, 4) == sum(m // 4 for m in range(1, n + 1))
        assert _sum_floor(n, 128) == sum(m // 128 for m in range(1, n + 1))
        assert _sum_floor_capped(n, 4, 100) == sum(min(100, m // 4) for m in range(1, n + 1))
        assert _sum_min(n, 128) == sum(min(m, 128) for m in range(1, n + 1))


def test_decode_step_grows_with_batch_and_overlap_helps():
    model = from_v3()
    hw = get_hardware("h100")
    slots = 288 / 72
    sync = Layout(72, 8, 8, hw, "sync", "eplb", 32)
    tbo = Layout(72, 8, 8, hw, "tbo", "eplb", 32)
    t = [decode(model, sync, EFF, slots, b, 2000).step.time_s for b in (1, 16, 128, 256)]
    assert t == sorted(t)
    big_sync = decode(model, sync, EFF, slots, 256, 2000).step
    big_tbo = decode(model, tbo, EFF, slots, 256, 2000).step
    assert big_tbo.time_s < big_sync.time_s  # comm-heavy: TBO hides it
    small_sync = decode(model, sync, EFF, slots, 2, 2000).step
    small_tbo = decode(model, tbo, EFF, slots, 2, 2000).step
    assert small_tbo.time_s > small_sync.time_s  # weight-bound: two micro-batches read the weights twice
    # all-to-all: FP8 dispatch (+ a float32 scale per 128) and BF16 combine, 58 MoE layers x 256 tokens x 8 copies
    st = big_sync
    assert st.a2a_dispatch_bytes + st.a2a_combine_bytes == pytest.approx(st.a2a_bytes_intra + st.a2a_bytes_inter)
    assert st.a2a_dispatch_bytes / st.a2a_combine_bytes == pytest.approx((1 + 4 / 128) / 2)
    remote = 58 * 256 * 8 * 71 / 72 * EFF.imbalance_eplb
    assert st.a2a_combine_bytes == pytest.approx(remote * 7168 * 2)
    assert set(st.per_layer) == {"mla/dense", "mla/moe"} and "all_to_all" in st.per_layer["mla/moe"]


def test_backends_from_the_registry_and_their_overlap():
    """Any registered name is a layout backend; its declared overlap picks the model, and a fixed-capacity backend
    (ll) sends one copy per (token, expert) in prefill too, where sync sends one per (token, rank)."""
    model = from_v3()
    hw = get_hardware("h100")
    slots = 288 / 72
    sync, ll = (Layout(72, 8, 8, hw, b, "eplb", 32) for b in ("sync", "ll"))
    assert decode(model, ll, EFF, slots, 64, 2000).step.time_s == decode(model, sync, EFF, slots, 64, 2000).step.time_s
    pre_sync, pre_ll = (prefill(model, lay, EFF, slots, 2000, 8192).step for lay in (sync, ll))
    assert pre_ll.a2a_combine_bytes == pytest.approx(58 * 8192 * 8 * 71 / 72 * EFF.imbalance_eplb * 7168 * 2)
    assert pre_ll.a2a_combine_bytes > 1.3 * pre_sync.a2a_combine_bytes
    assert pre_ll.compute_s == pytest.approx(pre_sync.compute_s) and pre_ll.time_s > pre_sync.time_s
    with pytest.raises(ValueError, match=r"ep_backend must be one of \(.*'ll'.*\), got 'deepep'"):
        Layout(72, 8, 8, hw, "deepep")


def test_hardware_profiles_have_sources():
    profiles = load_profiles()
    assert {"h100", "h800", "h200", "b200", "gb200", "gb300"} <= set(profiles)
    for hw in profiles.values():
        assert len(hw.sources) == 8 and all(src for _, src in hw.sources)
    assert not profiles["h100"].has_fp4 and profiles["gb300"].has_fp4
    assert HARDWARE_FILE.name == "hardware.yaml"


# ---- the CLI ---------------------------------------------------------------------------------------------------
def test_cli_plan_prints_a_table(capsys):
    assert main(["plan", str(ROOT / "examples" / "v4-pro-blackwell.yaml")]) == 0
    out = capsys.readouterr().out
    assert "Memory per rank (GB)" in out and "KV tokens" in out
    assert "0-7" in out and "8-15" in out
    assert "TTFT" in out and "TPOT" in out and "tok/s/node" in out
    assert "backend tbo" in out and "Everything fits." in out  # tbo: 16 B200s span two NVLink domains


def test_v4_pro_example_runs_tbo_because_wave_stays_in_one_nvlink_domain():
    """The README's planner example: examples/v4-pro-blackwell.yaml runs tbo; set wave there and the plan says
    MegaMoE works only inside one NVLink domain (16 ranks span two 8-GPU boards) and models sync."""
    import dataclasses

    inp = from_topology(load_topology(ROOT / "examples" / "v4-pro-blackwell.yaml"))
    assert inp.ep_backend == "tbo" and inp.world_size == 16
    plan = make_plan(inp)
    assert not plan.problems and plan.perf.layout["ep_backend"] == "tbo"
    wave = make_plan(dataclasses.replace(inp, ep_backend="wave"))
    assert any("works only inside one NVLink domain; 16 ranks span 2 domains of 8" in p for p in wave.problems)
    assert wave.perf.layout["ep_backend"] == "sync"


def test_cli_plan_json(capsys):
    path = ROOT / "examples" / "v4-flash-blackwell.yaml"
    assert main(["plan", str(path), "--isl", "2048", "--osl", "256", "--concurrency", "128", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["world_size"] == 8 and d["perf"]["batch_per_rank"] == 16
    assert d["perf"]["layout"]["ep_backend"] == "wave" and not d["problems"]
    assert d["ranks"][0]["expert_slots"] == 33


def test_cli_plan_cpu_topology(capsys):
    """examples/local.yaml (CPU ranks) is planned for memory, and says why there is no performance model."""
    assert main(["plan", str(ROOT / "examples" / "local.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model tiny: 2.1 MB of weights; EP size 4; ranks hold them native") \
        and "Memory per rank (MB)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0-1 ", "2-3 "))]
    assert [r[:3] for r in rows] == [["0-1", "a", "cpu"], ["2-3", "b", "cpu"]]
    assert all(r[6] == "2" and r[8] == "1.4" and r[10] == "67.1" for r in rows)  # slots, weights (no MTP), KV (MB)
    assert "Performance: not modelled (the performance model covers the GPU profiles" in out
    assert "shared by the topology's 4 CPU ranks" in out and "in checkpoint precision (weights: native)" in out
    assert "Everything fits." in out


def test_cpu_rank_memory_is_what_a_cpu_rank_holds(tiny_ckpt):
    """A CPU rank's planned weight bytes equal its loaded model's: parameters dequantized to float32, its two
    expert slots per MoE layer, and the int64 hash-routing tables."""
    import torch

    from engine.model.config import TINY
    from engine.weights.loader import load_model

    model = load_model(tiny_ckpt, dtype=torch.float32, experts=[0, 4])
    # an EP rank (world 4 here) builds no MTP block (engine.weights.resident.rank_builds_mtp)
    held = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("mtp.")) + sum(
        b.numel() * b.element_size() for name, b in model.named_buffers()
        if name.endswith("tid2eid") and not name.startswith("mtp."))
    plan = make_plan(PlanInput(TINY, "tiny", (NodePlan("a", 4, "cpu", 10**9),), weight_dtype="float32",
                               kv_budget_bytes=2**26, kv_dtype="float32"))
    assert plan.ranks[0][2].weight_bytes == held and plan.perf is None
    small = make_plan(PlanInput(TINY, "tiny", (NodePlan("a", 4, "cpu", 2**20),), weight_dtype="float32",
                                kv_budget_bytes=2**26, kv_dtype="float32"))
    assert [p for p in small.problems if "exceed the 0 GB of RAM per CPU rank" in p], small.problems
    with pytest.raises(ValueError, match="memory_bytes_per_rank is for"):
        NodePlan("a", 4, "cpu")


def test_cli_plan_bad_input(capsys, tmp_path):
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    assert main(["plan", str(ROOT / "examples" / "v4-flash-blackwell.yaml"), "--isl", "0"]) == 2
    assert "--isl" in capsys.readouterr().err


def test_kv_per_sequence_matches_published_v4_figure():
    # vLLM blog "DeepSeek V4 in vLLM: Efficient Long-context Attention" (v4-model.md §6, S13): ~9.62 GiB per
    # V4-Pro sequence at 1M tokens in BF16 (windows + compressed entries + indexer keys).
    inp = PlanInput(V4_PRO, "v4-pro", (NodePlan("g", 32, "gb300"),), redundant_experts=0)
    model, _ = build_model(inp, get_hardware("gb300"))
    kv = model.kv.breakdown(2**20)["kv"]
    assert kv / 2**30 == pytest.approx(9.62, rel=0.005)
