"""The capacity planner (cluster/plan): memory agrees with the manifest and the cache accounting, the CLI prints
a table, and the performance model against published serving figures (run with -s to see the table).

The model's efficiency factors are global (cluster/plan/perf.py `Efficiency`, set from kernel benchmarks);
nothing here is tuned per row. A row the model misses by more than 1.5x is marked xfail(strict) with the
reason, so it is reported, not hidden, and the test says so if the model ever starts to agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.plan.hardware import HARDWARE_FILE, get_hardware, load_profiles
from cluster.plan.memory import KVSettings, rank_memory
from cluster.plan.perf import (
    Efficiency,
    Layout,
    _sum_floor,
    _sum_floor_capped,
    _sum_min,
    decode,
    max_batch_at_tpot,
    prefill,
)
from cluster.plan.planner import NodePlan, PlanInput, build_model, from_topology, make_plan
from cluster.plan.v3 import from_v3
from cluster.topology import load_topology
from engine import cache_accounting as ca
from engine.config import V4_PRO
from engine.manifest import build_manifest

ROOT = Path(__file__).resolve().parents[1]
EFF = Efficiency()


# ---- published figures ----------------------------------------------------------------------------------------
def _v3_phase(acc: str, world: int, backend: str, phase: str, isl: int, tokens: int = 16384, batch: float = 0.0,
              ctx: int = 0) -> float:
    """V3 on `world` GPUs (8 per node), 32 redundant experts with EPLB; tokens/s per NODE of one phase."""
    hw = get_hardware(acc)
    model = from_v3()
    lay = Layout(world, 8, 8, hw, backend, "eplb", 32)
    slots = (256 + 32) / world
    if phase == "prefill":
        return 8 * prefill(model, lay, EFF, slots, isl, tokens).tokens_per_s_per_gpu
    return 8 * decode(model, lay, EFF, slots, batch, ctx).tokens_per_s_per_gpu


def _lambda_b200() -> float:
    """V4-Pro on one 8xB200 node (vLLM DP8 + EP, FP8 KV), 32 concurrent, ISL 8192 / OSL 2048, colocated prefill
    and decode; vLLM's DBO is off below 32 tokens per rank, EPLB off by default -> sync, static."""
    inp = PlanInput(V4_PRO, "v4-pro", (NodePlan("b200", 8, "b200"),), ep_backend="sync", policy="static",
                    max_num_seqs=64, max_num_batched_tokens=8192, memory_fraction=0.9, kv_dtype="fp8")
    plan = make_plan(inp, isl=8192, osl=2048, concurrency=32)
    return plan.perf.output_tok_s_node


def _inferencex(acc: str) -> float:
    """V4-Pro FP4, ISL 8K / OSL 1K, disaggregated (Dynamo + vLLM) at 27 tok/s/user on an NVL72 rack.
    InferenceX's tok/s/GPU is (input + output) tokens per GPU over all GPUs (InferenceX issue #293). The layout
    is not published: we take decode EP 32 and prefill EP 32 with MegaMoE (wave) and EPLB (+32 redundant), the
    largest decode batch whose step fits 1/27 s (and the KV cache), and the ideal prefill:decode GPU ratio:
    total/GPU = (isl + osl) / (isl / prefill_rate + osl / decode_rate)."""
    hw = get_hardware(acc)
    inp = PlanInput(V4_PRO, "v4-pro", (NodePlan("rack", 32, acc),), ep_backend="wave", policy="eplb",
                    redundant_experts=32, max_num_seqs=1024, max_num_batched_tokens=8192, kv_dtype="fp8")
    model, _ = build_model(inp, hw)
    mem = rank_memory(model, hw, 32, 32, KVSettings(256, 1024, 8192, None, 0.9), 8192 + 1024)
    lay = Layout(32, hw.nvl_domain, 32, hw, "wave", "eplb", 32)
    p_rate = prefill(model, lay, EFF, mem.expert_slots, 8192, 8192).tokens_per_s_per_gpu
    b = max_batch_at_tpot(model, lay, EFF, mem.expert_slots, 8192 + 512, 1 / 27, min(mem.seqs_at_context, 1024))
    d_rate = decode(model, lay, EFF, mem.expert_slots, b, 8192 + 512).tokens_per_s_per_gpu
    return (8192 + 1024) / (8192 / p_rate + 1024 / d_rate)


@dataclass(frozen=True)
class Row:
    name: str
    unit: str
    published: float
    predict: Callable[[], float]
    miss: str = ""  # why the model misses this row by more than 1.5x (empty: it should agree)


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
    # vLLM, 32 concurrent, ISL 8192 / OSL 2048 (27 tok/s/user, TTFT 3.66 s).
    Row("V4-Pro, 8xB200, vLLM, 32 conc. 8K/2K (Lambda)", "output tok/s/node", 855, _lambda_b200,
        miss="day-0 vLLM decodes at 37 ms/token where the weight-bandwidth roofline (29 GB replicated weights + "
             "touched experts per step at 80% of 8 TB/s) gives ~21 ms; no MegaMoE/CUDA-graph-tuned V4 kernels yet"),
    # SemiAnalysis InferenceX blog "GB300 NVL72 vs GB200 NVL72 ... DeepSeek-V4-Pro 1.6T" (v4-model.md §6, S17):
    # FP4, ISL 8K / OSL 1K, Dynamo + vLLM disaggregated, 2,189 tok/s/GPU on GB200 at 27 tok/s/user.
    Row("V4-Pro, GB200 NVL72, disagg 8K/1K @27 tok/s/user (InferenceX)", "tok/s/GPU", 2_189,
        lambda: _inferencex("gb200"),
        miss="the published GB200 recipe is limited by HBM at narrow prefill shapes (the blog's own explanation); "
             "the roofline at 60% MFU prefills V4-Pro at ~21k tok/s/GPU, early V4 vLLM kernels far below that"),
    # Same blog: 6,182 tok/s/GPU on GB300 NVL72 at 27 tok/s/user (2.83x GB200 on the same bandwidth and FP8 rate).
    Row("V4-Pro, GB300 NVL72, disagg 8K/1K @27 tok/s/user (InferenceX)", "tok/s/GPU", 6_182,
        lambda: _inferencex("gb300"),
        miss="same as GB200: the model's prefill rate is ~3x what early V4 software reached; the model has GB300 "
             "~= GB200 (same HBM bandwidth and FP8 rate), the blog 2.83x, from a wider recipe that fits in 288 GB"),
]


_PREDICTED: dict[str, float] = {}


def _predicted(row: Row) -> float:
    """The model's figure for a row (computed once per test session)."""
    if row.name not in _PREDICTED:
        _PREDICTED[row.name] = row.predict()
    return _PREDICTED[row.name]


def published_table() -> str:
    """The predicted-vs-published table (also in the README)."""
    lines = [f"| {'configuration':<62} | {'unit':<17} | {'published':>9} | {'model':>9} | {'model/pub':>9} |",
             f"|{'-' * 64}|{'-' * 19}|{'-' * 11}|{'-' * 11}|{'-' * 11}|"]
    for row in ROWS:
        pred = _predicted(row)
        lines.append(f"| {row.name:<62} | {row.unit:<17} | {row.published:>9,.0f} | {pred:>9,.0f} | "
                     f"{pred / row.published:>8.2f}x |")
    return "\n".join(lines)


def test_print_published_table():
    table = published_table()
    print("\n" + table)
    assert table.count("\n") == len(ROWS) + 1


@pytest.mark.parametrize("row", [
    pytest.param(r, marks=pytest.mark.xfail(strict=True, reason=r.miss)) if r.miss else r for r in ROWS
], ids=[r.name for r in ROWS])
def test_model_within_1_5x_of_published(row: Row):
    pred = _predicted(row)
    assert 1 / 1.5 <= pred / row.published <= 1.5, f"{row.name}: model {pred:,.0f} vs published {row.published:,.0f}"


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
    assert plan.weight_bytes_model == manifest.bytes
    total_routed_held = 0
    for ranks, _node, m in plan.ranks:
        assert m.replicated_bytes == manifest.bytes - routed
        assert m.expert_slots == slots == topo.slots_per_rank()
        assert m.routed_total == routed * slots // e
        assert m.weight_bytes == manifest.bytes - routed + routed * slots // e
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
    assert "wave (MegaMoE) works only inside one NVLink domain" in out  # 16 B200s span two HGX boards


def test_cli_plan_json(capsys):
    path = ROOT / "examples" / "v4-flash-blackwell.yaml"
    assert main(["plan", str(path), "--isl", "2048", "--osl", "256", "--concurrency", "128", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["world_size"] == 8 and d["perf"]["batch_per_rank"] == 16
    assert d["perf"]["layout"]["ep_backend"] == "wave" and not d["problems"]
    assert d["ranks"][0]["expert_slots"] == 33


def test_cli_plan_bad_input(capsys, tmp_path):
    assert main(["plan", str(ROOT / "examples" / "local.yaml")]) == 2
    assert "accelerator" in capsys.readouterr().err
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
