"""The one GPU benchmark (issues 14 and 19): CUDA only, random weights built in place, at most ~7 minutes on an H200.

    PYTHONPATH=. python bench/gpu.py --out out/gpu.json            # on the GPU machine
    PYTHONPATH=. python bench/gpu.py --out /tmp/gpu.json --dry-run-cpu   # tiny shapes on CPU: proves the script

Sections (each in its own try/except: an error is recorded in the JSON and the next section runs; the JSON is
rewritten after every measurement, so a timeout still leaves everything measured so far):
  machine  device, versions, achievable HBM bandwidth (a large device-to-device copy) next to the nominal 4.8 TB/s.
  moe      (issue 14) one MoE layer's routed experts at V4-Flash dims (hidden 4096, 256 experts, top-6, width 2048)
           at 1, 64 and 256 tokens: dequantized bf16 through torch._grouped_mm vs native MXFP4 through the Triton
           grouped GEMM (and the Triton kernel on the bf16 weights); both also captured in a CUDA graph and
           replayed (`*_graph`: the layer is sync-free); time per call (CUDA events, median), bytes of the
           experts touched, achieved bandwidth and its fraction of the measured and nominal HBM bandwidth,
           relative error of each against the bf16 path; the w1 projection alone.
  fp8      FP8 block-scaled linear (Triton, W8A16) vs a bf16 matmul on the dequantized weight, at V4-Flash attention
           shapes and 1, 64, 256 tokens.
  e2e      the `small` preset end to end (engine.LLM on cuda, bf16, a random checkpoint in a temp dir) vs
           transformers' DeepseekV4ForCausalLM.generate with its fastest routed-expert implementation that loads
           (grouped_mm, else batched_mm, else eager) at 32 x 128 -> 64 and 256 x 512 -> 128: output tok/s, ratio.
  decode   (issue 19) the engine (LLMEngine over a Transformer of the V4_FLASH preset with 4 layers: CSA, HCA, CSA,
           HCA; random weights) decoding at batch 1, 64 and 256 with 8K tokens of context; per-step and per-layer
           time, the bytes a step must read (weights touched + ideal sparse KV reads) and the fraction of the HBM
           roofline; host syncs, memcpys and kernel launches per step (torch.profiler). The context is filled
           through the public API: one request prefills the 8K prefix, every measured request hits it in the
           prefix cache (so the batch's KV pages are shared: L2 may serve some KV reads). Every CUDA-graph switch
           found in EngineConfig (`cuda_graphs` / `enforce_eager`) is measured both ways; weights "native" too when
           the Transformer takes a `weights` argument. `--decode-layers 4,2` (default) also gives the marginal
           per-layer time (the difference of the step times: no embedding, head or sampling in it).
  tune     a few TileConfigs of the fused w1/w3 MXFP4 GEMM and of the FP8 linear (the defaults are untuned), best
           per case in the summary; last, so it only uses what the budget leaves.
`--budget-s` (default 360) bounds the whole run: a step that would start past it is recorded as skipped.
"""

from __future__ import annotations

import os
import sys

if "--dry-run-cpu" in sys.argv:  # the Triton interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.kernels.triton import TileConfig  # noqa: E402  (no triton import: that happens at the first kernel)

TILES_DEFAULT = TileConfig()

NOMINAL_HBM_TB_S = 4.8  # H200 (HBM3e)


# ---- what to run ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run: `gpu()` the real one, `dry_run_cpu()` tiny shapes that exercise every code path on CPU."""

    device: str
    act_dtype: torch.dtype  # activations of the Triton kernels (fp32 under the interpreter: its bf16 dot is wrong)
    input_precision: str | None  # tl.dot's, for fp32 activations ("ieee" under the interpreter)
    warmup: int
    iters: int
    copy_bytes: int
    moe_dims: tuple[int, int, int, int]  # hidden, experts, top-k, expert width
    moe_tokens: tuple[int, ...]
    linear_shapes: dict[str, tuple[int, int]]  # name -> (N, K)
    linear_tokens: tuple[int, ...]
    decode_preset: str
    decode_layers: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_context: int
    decode_page_tokens: int
    decode_prefill_chunk: int
    decode_steps: tuple[int, int, int]  # warm-up, timed, profiled decode steps per batch
    e2e_preset: str
    e2e_dtype: str
    e2e_workloads: tuple[tuple[int, int, int], ...]  # (prompts, prompt tokens, new tokens)
    tune_moe: tuple  # TileConfigs tried for the fused w1/w3 MXFP4 grouped GEMM
    tune_fp8: tuple  # TileConfigs tried for the FP8 linear
    tune_fp8_shapes: tuple[str, ...]

    @staticmethod
    def gpu(layers: tuple[int, ...]) -> Plan:
        return Plan(
            device="cuda", act_dtype=torch.bfloat16, input_precision=None, warmup=5, iters=30,
            copy_bytes=4 << 30,
            moe_dims=(4096, 256, 6, 2048), moe_tokens=(1, 64, 256),
            # V4-Flash: wq_a, wq_b (64 heads x 512), wkv, one of the 8 wo_a groups, wo_b, the indexer's wq_b
            linear_shapes={"wq_a": (1024, 4096), "wq_b": (32768, 1024), "wkv": (512, 4096),
                           "wo_a_group": (1024, 4096), "wo_b": (4096, 8192), "indexer_wq_b": (8192, 1024)},
            linear_tokens=(1, 64, 256),
            decode_preset="v4-flash", decode_layers=layers, decode_batches=(1, 64, 256), decode_context=8192,
            decode_page_tokens=256, decode_prefill_chunk=2048, decode_steps=(3, 8, 2),
            e2e_preset="small", e2e_dtype="bfloat16", e2e_workloads=((32, 128, 64), (256, 512, 128)),
            tune_moe=tuple(TileConfig(**c) for c in (
                {}, {"block_n": 32}, {"block_n": 128}, {"block_k": 256}, {"num_warps": 8},
                {"block_n": 128, "block_k": 256, "num_warps": 8}, {"num_stages": 4}, {"block_n": 32, "num_stages": 4})),
            tune_fp8=tuple(TileConfig(**c) for c in (
                {}, {"block_n": 16}, {"block_n": 32}, {"block_n": 128}, {"block_n": 32, "num_warps": 2},
                {"block_k": 64, "block_n": 32})),
            tune_fp8_shapes=("wq_a", "wq_b", "wo_b"),
        )

    @staticmethod
    def dry_run_cpu(layers: tuple[int, ...]) -> Plan:
        return Plan(
            device="cpu", act_dtype=torch.float32, input_precision="ieee", warmup=0, iters=1,
            copy_bytes=16 << 20,
            moe_dims=(64, 8, 2, 32), moe_tokens=(1, 4),
            linear_shapes={"wq_a": (96, 128), "wo_b": (128, 160)}, linear_tokens=(1, 3),
            decode_preset="tiny", decode_layers=layers, decode_batches=(1, 3), decode_context=512,
            decode_page_tokens=128, decode_prefill_chunk=256, decode_steps=(1, 2, 1),
            e2e_preset="tiny", e2e_dtype="float32", e2e_workloads=((2, 16, 3),),
            tune_moe=(TileConfig(), TileConfig(block_n=32, block_k=32)),
            tune_fp8=(TileConfig(), TileConfig(block_n=16)), tune_fp8_shapes=("wq_a",),
        )


# ---- results, written as they come -----------------------------------------------------------------------------
class Results:
    """The JSON document: rewritten (atomically) after every measurement; `section` records errors and moves on."""

    def __init__(self, path: str | Path, budget_s: float) -> None:
        self.path = Path(path)
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.doc: dict = {"benchmark": "gpu", "started_unix": time.time(), "budget_s": budget_s, "summary": {},
                          "sections": {}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def save(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str))
        tmp.replace(self.path)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict]:
        out: dict = {"status": "running"}
        self.doc["sections"][name] = out
        t0 = time.monotonic()
        print(f"[gpu bench] section {name} (elapsed {self.elapsed():.0f}s)", file=sys.stderr, flush=True)
        try:
            yield out
            out["status"] = "ok"
        except Exception as e:  # record it; the other sections still run
            out["status"] = "error"
            out["error"] = f"{type(e).__name__}: {e}"[:2000]
            out["traceback"] = traceback.format_exc()[-4000:]
            print(f"[gpu bench] section {name} failed: {out['error']}", file=sys.stderr, flush=True)
        finally:
            out["seconds"] = round(time.monotonic() - t0, 1)
            gc.unfreeze()  # LLMEngine freezes what it built: let this section's cycles be collected
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.save()

    def guard(self, out: dict, key: str, need_s: float) -> bool:
        """False (and `key` recorded as skipped) when fewer than `need_s` seconds of the budget remain."""
        if self.remaining() >= need_s:
            return True
        out[key] = {"skipped": f"time budget: {self.remaining():.0f}s left, needs about {need_s:.0f}s"}
        self.save()
        return False


def _try(out: dict, key: str, fn: Callable[[], object]) -> object | None:
    """Run one measurement; on error record it under `key` and return None."""
    try:
        return fn()
    except Exception as e:
        out[key] = {"error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()[-2000:]}
        return None


# ---- timing --------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int, iters: int) -> dict:
    """Median/min ms per call: CUDA events around each call on CUDA (after `warmup` calls), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": round(statistics.median(times), 4), "min_ms": round(min(times), 4), "iters": iters}


def copy_bandwidth(device: str, nbytes: int) -> dict:
    """Achievable memory bandwidth: a device-to-device copy of `nbytes` (reads and writes nbytes each)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, warmup=2, iters=5)
    moved = 2 * src.numel() * 4
    return {"copy_bytes": nbytes, "median_ms": t["median_ms"], "tb_s": round(moved / (t["median_ms"] * 1e-3) / 1e12, 3)}


def _bw(nbytes: float, ms: float, copy_tb_s: float) -> dict:
    tb_s = nbytes / (ms * 1e-3) / 1e12
    return {"bytes": int(nbytes), "achieved_tb_s": round(tb_s, 3),
            "fraction_of_measured_bw": round(tb_s / copy_tb_s, 3) if copy_tb_s else None,
            "fraction_of_nominal_bw": round(tb_s / NOMINAL_HBM_TB_S, 3)}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- machine ---------------------------------------------------------------------------------------------------
def section_machine(plan: Plan, res: Results, out: dict) -> None:
    import importlib.metadata as md

    vers = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for pkg in ("triton", "transformers"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None
    out["versions"] = vers
    with contextlib.suppress(Exception):
        out["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=5).stdout.strip()
    out["device"] = plan.device
    if plan.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   sms=p.multi_processor_count)
    out["nominal_hbm_tb_s"] = NOMINAL_HBM_TB_S
    out["copy"] = copy_bandwidth(plan.device, plan.copy_bytes)
    res.doc["summary"]["copy_tb_s"] = out["copy"]["tb_s"]


def _tiles_name(t) -> str:
    return f"m{t.block_m or 'auto'}_n{t.block_n or 'auto'}_k{t.block_k or 'auto'}_w{t.num_warps}_s{t.num_stages}"


def _copy_tb_s(res: Results) -> float:
    return res.doc["sections"].get("machine", {}).get("copy", {}).get("tb_s", 0.0)


# ---- (a) MoE layer: bf16 torch._grouped_mm vs MXFP4 Triton --------------------------------------------------------
def random_mxfp4(shape: tuple[int, ...], device: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 weights [.., N, K]: packed bytes [.., N, K/2] and E8M0 scales [.., N, K/32] around 2^-7 (so the
    values have about 1/sqrt(K) magnitude at K = 2048..4096)."""
    *lead, n, k = shape
    packed = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, device=device, generator=g)
    scale = torch.randint(119, 123, (*lead, n, k // 32), dtype=torch.uint8, device=device, generator=g)
    return packed, scale


def dequantize_mxfp4_chunked(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """engine.weights.formats.dequantize_fp4 expert by expert (its fp32 temporaries stay one expert big)."""
    from engine.weights.formats import dequantize_fp4

    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=dtype, device=packed.device)
    for e in range(packed.shape[0]):
        out[e] = dequantize_fp4(packed[e], scale[e], dtype=dtype)
    return out


def captured(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn` captured in a CUDA graph (after two warm-up calls on a side stream); returns a replay function that
    gives the graph's output tensor. Raises when `fn` cannot be captured (e.g. it syncs with the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def moe_bf16_grouped_mm(x: torch.Tensor, topk_w: torch.Tensor, topk_idx: torch.Tensor, w1: torch.Tensor,
                        w3: torch.Tensor, w2: torch.Tensor, limit: float) -> torch.Tensor:
    """The dequantized reference path: the same sort as the Triton path, three torch._grouped_mm (bf16)."""
    from engine.kernels.triton.moe import sort_by_expert
    from engine.model.moe import swiglu

    t, k = topk_idx.shape
    order, offs = sort_by_expert(topk_idx, w1.shape[0])
    tok = order // k
    xs = x.index_select(0, tok).to(torch.bfloat16)
    g = torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs)
    u = torch._grouped_mm(xs, w3.transpose(-2, -1), offs=offs)
    h = (swiglu(g.float(), u.float(), limit) * topk_w.reshape(-1).index_select(0, order)[:, None]).to(torch.bfloat16)
    y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, tok, y.float()).to(x.dtype)


def section_moe(plan: Plan, res: Results, out: dict) -> None:
    from engine.kernels.triton import moe_grouped_gemm
    from engine.kernels.triton.moe import ExpertWeights, routed_experts, sort_by_expert

    d, n_exp, topk, inter = plan.moe_dims
    dev, limit = plan.device, 10.0
    out["dims"] = {"hidden": d, "experts": n_exp, "top_k": topk, "expert_width": inter, "swiglu_limit": limit}
    g = torch.Generator(device=dev).manual_seed(0)
    (p1, s1), (p3, s3), (p2, s2) = (random_mxfp4(shape, dev, g) for shape in
                                    ((n_exp, inter, d), (n_exp, inter, d), (n_exp, d, inter)))
    fp4 = ExpertWeights(p1, p3, p2, s1, s3, s2)
    w1, w3, w2 = (dequantize_mxfp4_chunked(p, s, torch.bfloat16) for p, s in ((p1, s1), (p3, s3), (p2, s2)))
    bf16 = ExpertWeights(w1, w3, w2)
    per_expert = {"bf16": 3 * inter * d * 2, "mxfp4": 3 * inter * d // 2 + 3 * inter * d // 32}
    out["bytes_per_expert"] = per_expert
    copy_tb_s = _copy_tb_s(res)
    ip = plan.input_precision
    out["tokens"] = {}
    for t in plan.moe_tokens:
        if not res.guard(out["tokens"], str(t), 20):
            continue
        row: dict = {}
        out["tokens"][str(t)] = row
        x = (torch.randn(t, d, generator=g, device=dev) * 0.5).to(plan.act_dtype)
        topk_idx = torch.rand(t, n_exp, generator=g, device=dev).argsort(1)[:, :topk]
        topk_w = torch.rand(t, topk, generator=g, device=dev) / topk
        touched = int(torch.unique(topk_idx).numel())
        row["experts_touched"] = touched
        paths = {
            "bf16_grouped_mm": lambda x=x, tw=topk_w, ti=topk_idx: moe_bf16_grouped_mm(x, tw, ti, w1, w3, w2, limit),
            "mxfp4_triton": lambda x=x, tw=topk_w, ti=topk_idx: routed_experts(x, tw, ti, fp4, limit,
                                                                               input_precision=ip),
            "bf16_triton": lambda x=x, tw=topk_w, ti=topk_idx: routed_experts(x, tw, ti, bf16, limit,
                                                                              input_precision=ip),
        }
        ref = _try(row, "bf16_grouped_mm", paths["bf16_grouped_mm"])
        if dev == "cuda":  # sync-free, so capturable: the same calls replayed from CUDA graphs
            for name in ("bf16_grouped_mm", "mxfp4_triton"):
                graph = _try(row, f"{name}_graph", lambda fn=paths[name]: captured(fn))
                if graph is not None:
                    paths[f"{name}_graph"] = graph
        for name, fn in paths.items():
            fmt = "mxfp4" if name.startswith("mxfp4") else "bf16"

            def measure(name=name, fn=fn, fmt=fmt, touched=touched, ref=ref) -> dict:
                r = time_ms(fn, dev, plan.warmup, plan.iters)
                r.update(_bw(touched * per_expert[fmt], r["median_ms"], copy_tb_s))
                if ref is not None and name != "bf16_grouped_mm":
                    r["rel_err_vs_bf16_grouped_mm"] = round(_rel_err(fn(), ref), 5)
                return r

            got = _try(row, name, measure)
            if got is not None:
                row[name] = got
            res.save()
        # one projection alone (w1: the "one expert projection" building block)
        order, offs = sort_by_expert(topk_idx, n_exp)
        xs = x.index_select(0, order // topk)
        one = {
            "bf16_grouped_mm": lambda xs=xs, offs=offs: torch._grouped_mm(xs.to(torch.bfloat16), w1.transpose(-2, -1),
                                                                          offs=offs),
            "mxfp4_triton": lambda xs=xs, offs=offs: moe_grouped_gemm(xs, p1, offs, w_scale=s1, input_precision=ip),
        }
        row["w1_projection"] = {}
        for name, fn in one.items():
            fmt = "mxfp4" if name.startswith("mxfp4") else "bf16"

            def measure_one(fn=fn, fmt=fmt, touched=touched) -> dict:
                r = time_ms(fn, dev, plan.warmup, plan.iters)
                r.update(_bw(touched * per_expert[fmt] / 3, r["median_ms"], copy_tb_s))
                return r

            got = _try(row["w1_projection"], name, measure_one)
            if got is not None:
                row["w1_projection"][name] = got
        res.save()
    summ = {}
    for t, row in out["tokens"].items():
        for name in ("bf16_grouped_mm", "mxfp4_triton", "bf16_grouped_mm_graph", "mxfp4_triton_graph"):
            if "median_ms" in row.get(name, {}):
                summ[f"moe_{name}_ms_t{t}"] = row[name]["median_ms"]
                summ[f"moe_{name}_frac_bw_t{t}"] = row[name]["fraction_of_measured_bw"]
        if "median_ms" in row.get("mxfp4_triton", {}) and "median_ms" in row.get("bf16_grouped_mm", {}):
            summ[f"moe_speedup_mxfp4_vs_bf16_t{t}"] = round(
                row["bf16_grouped_mm"]["median_ms"] / row["mxfp4_triton"]["median_ms"], 2)
    res.doc["summary"].update(summ)


# ---- (b) FP8 block-scaled linear vs bf16 ------------------------------------------------------------------------
def section_fp8(plan: Plan, res: Results, out: dict) -> None:
    from engine.kernels.triton import fp8_block_linear
    from engine.weights.formats import dequantize_fp8_block, quantize_fp8_block

    dev = plan.device
    g = torch.Generator(device=dev).manual_seed(1)
    copy_tb_s = _copy_tb_s(res)
    out["shapes"] = {}
    for name, (n, k) in plan.linear_shapes.items():
        if not res.guard(out["shapes"], name, 10):
            continue
        q, s = quantize_fp8_block(torch.randn(n, k, generator=g, device=dev) / math.sqrt(k))
        w = dequantize_fp8_block(q, s, dtype=torch.bfloat16)
        rows: dict = {"N": n, "K": k}
        out["shapes"][name] = rows
        fp8_bytes = n * k + s.numel()
        for t in plan.linear_tokens:
            x = torch.randn(t, k, generator=g, device=dev).to(plan.act_dtype)
            r: dict = {}
            rows[str(t)] = r
            ref = torch.nn.functional.linear(x.to(torch.bfloat16), w)

            def fp8(x=x, q=q, s=s) -> torch.Tensor:
                return fp8_block_linear(x, q, s, input_precision=plan.input_precision)

            def bf16(x=x, w=w) -> torch.Tensor:
                return torch.nn.functional.linear(x.to(torch.bfloat16), w)

            for label, fn, nbytes in (("fp8_triton", fp8, fp8_bytes), ("bf16_matmul", bf16, 2 * n * k)):
                def measure(fn=fn, nbytes=nbytes) -> dict:
                    m = time_ms(fn, dev, plan.warmup, plan.iters)
                    m.update(_bw(nbytes, m["median_ms"], copy_tb_s))
                    return m

                got = _try(r, label, measure)
                if got is not None:
                    r[label] = got
            got_err = _try(r, "rel_err", lambda fp8=fp8, ref=ref: round(_rel_err(fp8(), ref), 5))
            if got_err is not None:
                r["rel_err_fp8_vs_bf16"] = got_err
            if "median_ms" in r.get("fp8_triton", {}) and "median_ms" in r.get("bf16_matmul", {}):
                r["speedup_fp8_vs_bf16"] = round(r["bf16_matmul"]["median_ms"] / r["fp8_triton"]["median_ms"], 2)
            res.save()
        del q, s, w
    sp = [r[t]["speedup_fp8_vs_bf16"] for r in out["shapes"].values() for t in map(str, plan.linear_tokens)
          if isinstance(r, dict) and "speedup_fp8_vs_bf16" in r.get(t, {})]
    if sp:
        res.doc["summary"]["fp8_speedup_vs_bf16_median"] = round(statistics.median(sp), 2)


# ---- (c) engine decode at V4-Flash dims ----------------------------------------------------------------------------
def decode_config(preset: str, layers: int):
    """The preset with `layers` main layers of the real mix beyond the two SWA layers (CSA, HCA, CSA, ...)."""
    from engine.model.config import get_preset

    base = get_preset(preset)
    kinds = tuple((4, 128)[i % 2] for i in range(layers))
    return dataclasses.replace(base, num_hidden_layers=layers,
                               compress_ratios=kinds + (0,) * base.num_nextn_predict_layers,
                               num_hash_layers=min(base.num_hash_layers, layers))


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights in place, by name and dtype: float weights ~ N(0, 1/fan_in), norms 1, routers and mHC as in
    tests/hf_ref.py; FP8 weights e4m3 of N(0, 1); packed FP4 bytes uniform; E8M0 scales ~ 2^-7; tid2eid valid ids."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dtype in (torch.float8_e8m0fnu, torch.uint8, torch.int8) and "scale" in name:
                p.view(torch.uint8).random_(119, 123, generator=g)
            elif p.dtype in (torch.uint8, torch.int8):
                p.view(torch.uint8).random_(0, 256, generator=g)
            elif p.dtype == torch.float8_e4m3fn:
                for chunk in p.view(-1).split(1 << 26):
                    chunk.copy_(torch.randn(chunk.shape, generator=g, device=dev).clamp_(-448, 448))
            elif not p.is_floating_point():
                continue
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf.startswith("hc_") and leaf.endswith("_scale"):
                p.uniform_(0.5, 1.5, generator=g)
            elif leaf.startswith("hc_") and leaf.endswith("_base"):
                p.normal_(0.0, 0.5, generator=g)
            elif leaf in ("attn_sink", "bias"):
                p.normal_(0.0, 0.1, generator=g)
            elif leaf == "ape":
                p.normal_(0.0, 0.5, generator=g)
            elif p.dim() >= 2:
                std = (0.5 if leaf.startswith("hc_") else 1.0) / math.sqrt(p.shape[-1])
                if name == "embed.weight":
                    std = 1.0
                for chunk in p.view(-1, p.shape[-1]).split(1 << 16):
                    chunk.normal_(0.0, std, generator=g)
            else:
                p.normal_(0.0, 0.1, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                n_exp = model.cfg.n_routed_experts
                b.copy_(torch.rand(b.shape[0], n_exp, generator=g, device=dev).argsort(1)[:, : b.shape[1]])


def build_model(cfg, dtype: torch.dtype, device: str, weights: str | None):
    """A Transformer built directly on `device` (no host copy, no checkpoint) with random weights."""
    from engine.model.model import Transformer
    from engine.model.weight_format import DENSE, WeightFormats

    # "native": the formats of V4's published checkpoint (FP8 linears, MXFP4 experts, BF16 kept); else dense
    kw = {} if weights is None else {"weights": WeightFormats.native_for(cfg.expert_dtype) if weights == "native"
                                     else DENSE}
    with torch.device(device):
        model = Transformer(cfg, dtype, with_mtp=False, **kw)
    randomize_(model)
    return model.eval()


def weight_modes() -> list[str | None]:
    """[None] (the plain bf16 model), or ["dequantized", "native"] once the Transformer takes `weights=`."""
    from engine.model.model import Transformer

    return ["dequantized", "native"] if "weights" in inspect.signature(Transformer.__init__).parameters else [None]


def graph_variants(device: str) -> list[dict]:
    """EngineConfig switches for CUDA graphs, if any: both settings on CUDA (eager first), eager only on CPU."""
    from engine.core.engine import EngineConfig

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    for key, eager in (("enforce_eager", True), ("cuda_graphs", False), ("use_cuda_graphs", False)):
        if key in names:
            return [{key: eager}] if device != "cuda" else [{key: eager}, {key: not eager}]
    return [{}]


def expected_touched(n_exp: int, topk: int, tokens: int) -> float:
    """Expected distinct experts hit by `tokens` tokens each choosing `topk` distinct experts uniformly."""
    return n_exp * (1 - (1 - topk / n_exp) ** tokens)


def step_bytes(model, cfg, batch: int, context: int) -> dict:
    """Bytes one decode step must read: per layer its weights (routed experts: the expected touched share) and the
    ideal sparse KV reads per sequence (window, top-k CSA entries, all indexer keys; every HCA entry); plus the
    embedding rows and the head. Element sizes are the model's own (native dtypes included)."""
    per_layer = []
    for i, block in enumerate(model.layers):
        dense = routed = 0
        for name, p in block.named_parameters():
            nbytes = p.numel() * p.element_size()
            if ".experts." in f".{name}":
                routed += nbytes
            else:
                dense += nbytes
        touched = expected_touched(cfg.n_routed_experts, cfg.num_experts_per_tok, batch)
        el = torch.empty(0, dtype=model.dtype).element_size()  # the cache holds the model's dtype
        ratio = cfg.compress_ratios[i]
        kv = min(context, cfg.sliding_window) * cfg.head_dim
        if ratio == 4:
            n = context // 4
            kv += min(n, cfg.index_topk) * cfg.head_dim + n * cfg.index_head_dim
        elif ratio:
            kv += (context // ratio) * cfg.head_dim
        per_layer.append({"dense_weights": dense,
                          "routed_weights_touched": int(routed * touched / cfg.n_routed_experts),
                          "kv": batch * kv * el, "expected_experts_touched": round(touched, 1)})
    head = model.head.weight.numel() * model.head.weight.element_size()
    layer_sum = sum(v["dense_weights"] + v["routed_weights_touched"] + v["kv"] for v in per_layer)
    return {"per_layer": per_layer, "layers_total": layer_sum, "head": head, "step_total": layer_sum + head}


_SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
_LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                  "cudaLaunchCooperativeKernel")


def profile_counts(fn: Callable[[], object], steps: int, device: str) -> dict:
    """Per step, from torch.profiler: host syncs (stream/device/event synchronize), memcpys device->host, host-side
    kernel launch calls, CUDA graph launches, kernels that ran on the GPU and their total time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    counts = {k: 0 for k in ("syncs", "memcpy_dtoh", "memcpy_calls", "launch_calls", "graph_launches",
                             "gpu_kernels")}
    by_sync: dict[str, int] = {}
    gpu_us = 0.0
    for ev in prof.events():
        name = ev.name
        on_gpu = str(getattr(ev, "device_type", "")).endswith("CUDA")
        if name in _SYNC_EVENTS:
            counts["syncs"] += 1
            by_sync[name] = by_sync.get(name, 0) + 1
        elif name in _LAUNCH_EVENTS:
            counts["launch_calls"] += 1
        elif name == "cudaGraphLaunch":
            counts["graph_launches"] += 1
        elif name.startswith(("cudaMemcpy", "cuMemcpy")):
            counts["memcpy_calls"] += 1
        elif on_gpu and "DtoH" in name:
            counts["memcpy_dtoh"] += 1
        elif on_gpu and not name.startswith(("Memcpy", "Memset")):
            counts["gpu_kernels"] += 1
            gpu_us += float(ev.time_range.elapsed_us())
    per = {k: round(v / steps, 1) for k, v in counts.items()}
    per["syncs_by_kind"] = {k: round(v / steps, 1) for k, v in by_sync.items()}
    per["gpu_busy_ms"] = round(gpu_us / steps / 1e3, 3)
    per["profiled_steps"] = steps
    return per


def _decode_batch(eng, cfg, plan: Plan, prefix: list[int], batch: int, n_layers: int, tag: int) -> dict:
    """`batch` requests continuing the cached prefix; returns timing and profile of their decode steps."""
    from scheduler.sampling import SamplingParams

    warm, timed, prof = plan.decode_steps
    params = SamplingParams(temperature=0, max_tokens=1 + warm + timed + prof, ignore_eos=True)
    rids = {eng.add_request(prefix + [2 + (tag * 997 + i) % (cfg.vocab_size - 2)], params) for i in range(batch)}
    produced: dict[str, int] = {}
    cached = []
    t0 = time.perf_counter()
    while len(produced) < batch:  # the suffix prefill (prefix-cache hits): every request gets its first token
        if not eng.has_unfinished() or time.perf_counter() - t0 > 120:
            raise RuntimeError(f"only {len(produced)} of {batch} requests produced a first token")
        for ro in eng.step():
            if ro.req_id in rids and ro.new_token_ids:
                produced[ro.req_id] = produced.get(ro.req_id, 0) + len(ro.new_token_ids)
                cached.append(ro.num_cached_tokens)
    first_s = time.perf_counter() - t0

    def one_step() -> int:
        outs = eng.step()
        return sum(len(ro.new_token_ids) for ro in outs if ro.req_id in rids)

    for _ in range(warm):
        one_step()
    _sync(plan.device)
    step_ms, tokens = [], []
    for _ in range(timed):
        t = time.perf_counter()
        tokens.append(one_step())
        _sync(plan.device)
        step_ms.append((time.perf_counter() - t) * 1e3)
    counts = profile_counts(one_step, prof, plan.device)
    while eng.has_unfinished():
        eng.step()
    med = statistics.median(step_ms)
    return {"batch": batch, "first_step_s": round(first_s, 3), "min_cached_tokens": min(cached),
            "step_ms_median": round(med, 3), "step_ms_min": round(min(step_ms), 3),
            "tokens_per_step": tokens, "per_layer_ms": round(med / n_layers, 3),
            "output_tok_s": round(batch / (med * 1e-3), 1), "profile_per_step": counts}


def section_decode(plan: Plan, res: Results, out: dict) -> None:
    from engine.core.engine import EngineConfig, LLMEngine
    from scheduler.sampling import SamplingParams

    dev = plan.device
    dtype_name = "bfloat16" if dev == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    copy_tb_s = _copy_tb_s(res) or NOMINAL_HBM_TB_S
    out.update(preset=plan.decode_preset, context=plan.decode_context, dtype=dtype_name,
               kv_pages="shared prefix (prefix cache)", runs={})
    ctx = plan.decode_context
    for n_layers in plan.decode_layers:
        cfg = decode_config(plan.decode_preset, n_layers)
        for mode in weight_modes():
            key_m = f"L{n_layers}" + (f"_{mode}" if mode else "")
            if not res.guard(out["runs"], key_m, 60):
                continue
            run: dict = {"layers": n_layers, "compress_ratios": list(cfg.compress_ratios[:n_layers]),
                         "weights": mode or "model dtype"}
            out["runs"][key_m] = run
            t0 = time.perf_counter()
            model = build_model(cfg, dtype, dev, mode)
            _sync(dev)
            run["build_s"] = round(time.perf_counter() - t0, 1)
            run["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
            res.save()
            g = torch.Generator().manual_seed(7)
            prefix = torch.randint(2, cfg.vocab_size, (ctx,), generator=g).tolist()
            n_pages = ctx // plan.decode_page_tokens + 2 * max(plan.decode_batches) + 64
            for variant in graph_variants(dev):
                key_v = ",".join(f"{k}={v}" for k, v in variant.items()) or "default"
                vr: dict = {}
                run[key_v] = vr
                if not res.guard(vr, "engine", 40):
                    continue
                eng = LLMEngine("<random weights in memory>", EngineConfig(
                    dtype=dtype_name, device=dev, max_num_seqs=max(plan.decode_batches),
                    max_num_batched_tokens=max(plan.decode_prefill_chunk, max(plan.decode_batches)),
                    page_tokens=plan.decode_page_tokens, num_pages=n_pages, enable_prefix_caching=True, **variant),
                    model=model)
                t1 = time.perf_counter()
                eng.add_request(prefix + [3], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
                while eng.has_unfinished():
                    eng.step()
                _sync(dev)
                vr["prefix_prefill_s"] = round(time.perf_counter() - t1, 2)
                res.save()
                for i, b in enumerate(plan.decode_batches):
                    if not res.guard(vr, f"batch_{b}", 15):
                        continue
                    got = _try(vr, f"batch_{b}", lambda eng=eng, cfg=cfg, prefix=prefix, b=b, n=n_layers, i=i:
                               _decode_batch(eng, cfg, plan, prefix, b, n, tag=i + 1))
                    if got is None:
                        res.save()
                        continue
                    need = step_bytes(model, cfg, b, ctx)
                    ideal_ms = need["step_total"] / (copy_tb_s * 1e12) * 1e3
                    layer_ideal_ms = need["layers_total"] / n_layers / (copy_tb_s * 1e12) * 1e3
                    got["bytes"] = need
                    got["roofline_step_ms"] = round(ideal_ms, 3)
                    got["fraction_of_roofline_step"] = round(ideal_ms / got["step_ms_median"], 3)
                    got["roofline_per_layer_ms"] = round(layer_ideal_ms, 3)
                    got["per_layer_vs_roofline_x"] = round(got["per_layer_ms"] / layer_ideal_ms, 2)
                    vr[f"batch_{b}"] = got
                    res.doc["summary"][f"decode_{key_m}_{key_v}_b{b}_per_layer_ms"] = got["per_layer_ms"]
                    res.doc["summary"][f"decode_{key_m}_{key_v}_b{b}_roofline_frac"] = got["fraction_of_roofline_step"]
                    res.doc["summary"][f"decode_{key_m}_{key_v}_b{b}_syncs_per_step"] = \
                        got["profile_per_step"]["syncs"]
                    res.save()
                del eng
                gc.unfreeze()
                gc.collect()
            del model
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
    _marginal_per_layer(out)


def _marginal_per_layer(out: dict) -> None:
    """With two layer counts measured: per-layer time as the difference of step times (no embed/head/sampling)."""
    runs = out["runs"]
    keys = [k for k in runs if isinstance(runs[k], dict) and "layers" in runs[k]]
    marg: dict = {}
    for a in keys:
        for b in keys:
            ra, rb = runs[a], runs[b]
            if rb["layers"] <= ra["layers"] or ra["weights"] != rb["weights"]:
                continue
            for var, va in ra.items():
                vb = rb.get(var)
                if not isinstance(va, dict) or not isinstance(vb, dict):
                    continue
                for bk, ba in va.items():
                    bb = vb.get(bk)
                    if isinstance(ba, dict) and isinstance(bb, dict) and "step_ms_median" in ba and \
                            "step_ms_median" in bb:
                        ms = (bb["step_ms_median"] - ba["step_ms_median"]) / (rb["layers"] - ra["layers"])
                        marg[f"{a}->{b}:{var}:{bk}"] = round(ms, 3)
    if marg:
        out["marginal_per_layer_ms"] = marg


# ---- (d) small preset end to end vs transformers -----------------------------------------------------------------
def _hf_on_device(cfg, sd: dict, dtype: torch.dtype, device: str) -> tuple[object, dict]:
    """transformers' model on `device`: the first of grouped_mm, batched_mm, eager that loads and generates."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_ref import build_hf_model  # test-only dependency: transformers

    from bench.common import HF_EXPERT_IMPLEMENTATIONS

    tried: dict[str, str] = {}
    for impl in HF_EXPERT_IMPLEMENTATIONS:
        try:
            model = build_hf_model(cfg, sd, dtype=dtype, experts_implementation=impl).to(device)
            ids = torch.randint(2, cfg.vocab_size, (2, 8), device=device)
            _hf_generate(model, ids, 2)
        except Exception as e:
            tried[impl] = f"{type(e).__name__}: {e}"[:300]
            continue
        return model, {"experts_implementation": impl, "not_usable": tried}
    raise RuntimeError(f"no transformers experts implementation ran: {tried}")


def _hf_generate(model, ids: torch.Tensor, new_tokens: int) -> int:
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0)
    return int((out.shape[1] - ids.shape[1]) * ids.shape[0])


def section_e2e(plan: Plan, res: Results, out: dict) -> None:
    from cluster.loadtest.offline import OfflineWorkload, make_prompts, timed_generate
    from engine import LLM
    from engine.model.config import get_preset
    from engine.weights.checkpoint import open_checkpoint
    from engine.weights.make_checkpoint import write_checkpoint

    dev = plan.device
    cfg = get_preset(plan.e2e_preset)
    dtype = getattr(torch, plan.e2e_dtype)
    out.update(preset=plan.e2e_preset, dtype=plan.e2e_dtype, workloads={})
    biggest = max(plan.e2e_workloads, key=lambda w: w[0] * (w[1] + w[2]))
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(cfg, tmp, seed=0)
        llm = LLM(tmp, dtype=plan.e2e_dtype, device=dev, max_num_seqs=max(w[0] for w in plan.e2e_workloads),
                  max_num_batched_tokens=max(8192, biggest[1] * 16), page_tokens=128,
                  cache_budget_bytes=max(512 << 20, 4 * _cache_bytes_needed(cfg, biggest)))
        hf, hf_info = _hf_on_device(cfg, open_checkpoint(tmp).state_dict(torch.float32), dtype, dev)
    out["transformers"] = hf_info
    res.save()
    timed_generate(llm, make_prompts(cfg.vocab_size, OfflineWorkload(2, 8, 2)), 2)  # warm-up
    for n, plen, new in plan.e2e_workloads:
        key = f"{n}x{plen}->{new}"
        if not res.guard(out["workloads"], key, 30 if dev == "cpu" else 60):
            continue
        w = OfflineWorkload(n, plen, new)
        prompts = make_prompts(cfg.vocab_size, w)
        row: dict = {}
        out["workloads"][key] = row
        _sync(dev)
        dt, n_out = timed_generate(llm, prompts, new)
        _sync(dev)
        row["ours"] = {"seconds": round(dt, 3), "output_tokens": n_out, "output_tok_s": round(n_out / dt, 1)}
        res.save()
        ids = torch.tensor(prompts, device=dev)
        _hf_generate(hf, ids[: min(n, 4), :16], 2)  # warm-up at this batch's shape class
        _sync(dev)
        t0 = time.perf_counter()
        n_hf = _hf_generate(hf, ids, new)
        _sync(dev)
        dt_hf = time.perf_counter() - t0
        row["transformers"] = {"seconds": round(dt_hf, 3), "output_tokens": n_hf,
                               "output_tok_s": round(n_hf / dt_hf, 1)}
        row["ratio_ours_vs_transformers"] = round(row["ours"]["output_tok_s"] / row["transformers"]["output_tok_s"], 3)
        res.doc["summary"][f"e2e_{key}_ours_tok_s"] = row["ours"]["output_tok_s"]
        res.doc["summary"][f"e2e_{key}_transformers_tok_s"] = row["transformers"]["output_tok_s"]
        res.doc["summary"][f"e2e_{key}_ratio"] = row["ratio_ours_vs_transformers"]
        res.save()


def _cache_bytes_needed(cfg, workload: tuple[int, int, int]) -> int:
    from engine.cache.accounting import page_bytes, slot_bytes

    n, plen, new = workload
    pages = n * (-(-(plen + new) // 128) + 1)
    return pages * page_bytes(cfg, 128, "bfloat16", True, True) + n * slot_bytes(cfg, "bfloat16", True)


# ---- (tune) tile sizes of the two kernels, for the next defaults -------------------------------------------------
def section_tune(plan: Plan, res: Results, out: dict) -> None:
    """Time the fused w1/w3 MXFP4 grouped GEMM and the FP8 linear under a few TileConfigs (the defaults are untuned
    heuristics); records every time and the best config per case. Results do not change with the tiles."""
    from engine.kernels.triton import fp8_block_linear, moe_grouped_gemm
    from engine.kernels.triton.moe import sort_by_expert
    from engine.weights.formats import quantize_fp8_block

    d, n_exp, topk, inter = plan.moe_dims
    dev, ip = plan.device, plan.input_precision
    copy_tb_s = _copy_tb_s(res)
    g = torch.Generator(device=dev).manual_seed(2)
    (p1, s1), (p3, s3) = random_mxfp4((n_exp, inter, d), dev, g), random_mxfp4((n_exp, inter, d), dev, g)
    out["moe_w13_mxfp4"] = {}
    for t in plan.moe_tokens:
        rows: dict = {}
        out["moe_w13_mxfp4"][f"t{t}"] = rows
        topk_idx = torch.rand(t, n_exp, generator=g, device=dev).argsort(1)[:, :topk]
        order, offs = sort_by_expert(topk_idx, n_exp)
        xs = torch.randn(t * topk, d, generator=g, device=dev).to(plan.act_dtype)
        rw = torch.rand(t * topk, generator=g, device=dev)
        nbytes = int(torch.unique(topk_idx).numel()) * 2 * inter * (d // 2 + d // 32)
        for tiles in plan.tune_moe:
            name = _tiles_name(tiles)
            if not res.guard(rows, name, 8):
                break

            def run(tiles=tiles, xs=xs, offs=offs, rw=rw) -> torch.Tensor:
                return moe_grouped_gemm(xs, p1, offs, w_scale=s1, w3=p3, w3_scale=s3, swiglu_limit=10.0,
                                        row_weight=rw, input_precision=ip, tiles=tiles)

            got = _try(rows, name, lambda run=run, nbytes=nbytes: {
                **(m := time_ms(run, dev, plan.warmup, plan.iters)), **_bw(nbytes, m["median_ms"], copy_tb_s)})
            if got is not None:
                rows[name] = got
        _best(rows, res, f"tune_moe_w13_t{t}")
        res.save()
    out["fp8_linear"] = {}
    for shape in plan.tune_fp8_shapes:
        n, k = plan.linear_shapes[shape]
        q, s = quantize_fp8_block(torch.randn(n, k, generator=g, device=dev) / math.sqrt(k))
        for t in plan.linear_tokens:
            rows = {}
            out["fp8_linear"][f"{shape}_t{t}"] = rows
            x = torch.randn(t, k, generator=g, device=dev).to(plan.act_dtype)
            for tiles in plan.tune_fp8:
                name = _tiles_name(tiles)
                if not res.guard(rows, name, 6):
                    break
                got = _try(rows, name, lambda tiles=tiles, x=x, q=q, s=s, n=n, k=k: {
                    **(m := time_ms(lambda: fp8_block_linear(x, q, s, input_precision=ip, tiles=tiles), dev,
                                    plan.warmup, plan.iters)),
                    **_bw(n * k + s.numel(), m["median_ms"], copy_tb_s)})
                if got is not None:
                    rows[name] = got
            _best(rows, res, f"tune_fp8_{shape}_t{t}")
            res.save()


def _best(rows: dict, res: Results, key: str) -> None:
    timed = {k: v["median_ms"] for k, v in rows.items() if isinstance(v, dict) and "median_ms" in v}
    if timed:
        best = min(timed, key=timed.get)
        rows["best"] = best
        res.doc["summary"][key] = {"best": best, "ms": timed[best], "default_ms": timed.get(_tiles_name(TILES_DEFAULT))}


# e2e before decode: decode depends most on the engine of the day and takes what the budget leaves; tune last
SECTIONS: dict[str, Callable[[Plan, Results, dict], None]] = {
    "machine": section_machine, "moe": section_moe, "fp8": section_fp8, "e2e": section_e2e, "decode": section_decode,
    "tune": section_tune,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file (rewritten after every measurement)")
    ap.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes on CPU (Triton interpreter), no timing "
                    "meaning: checks that every section runs")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    ap.add_argument("--decode-layers", default="4,2", help="layer counts for the decode section, run in this order "
                    "(two counts also give the marginal per-layer time: the difference of step times)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="stop starting new steps after this many seconds")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")
    layers = tuple(int(x) for x in args.decode_layers.split(","))
    if args.dry_run_cpu:
        plan = Plan.dry_run_cpu(layers if args.decode_layers != "4,2" else (2,))
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py needs a CUDA device (none is visible to torch); use --dry-run-cpu to check the "
                  "script on CPU", file=sys.stderr)
            return 2
        plan = Plan.gpu(layers)
    res = Results(args.out, args.budget_s)
    res.doc["plan"] = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in dataclasses.asdict(plan).items()}
    if "machine" not in sections:
        sections.insert(0, "machine")  # the bandwidth every fraction is computed against
    torch.manual_seed(0)
    for name in sections:
        with res.section(name) as out:
            SECTIONS[name](plan, res, out)
    res.doc["finished"] = True
    res.save()
    print(json.dumps(res.doc["summary"], indent=2))
    errors = {k: v.get("error") for k, v in res.doc["sections"].items() if v.get("status") == "error"}
    if errors:
        print(f"[gpu bench] sections with errors: {errors}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
