"""Routed-expert MLP micro-benchmark: the C kernel (engine.kernels.cpu.moe_mlp) vs padded torch.bmm vs the
per-expert F.linear loop, on the `small` preset's expert shapes (32 experts, D=768, I=512, fp32).

Cases: decode batches of 8/32/64 tokens routed top-6 of 32 (uniformly random experts), a prefill-like
4096 x 6 assignment, and a crossover sweep (8 experts with the same row count each, 1 to 256 rows) that shows
from which rows per expert on MKL's per-expert loop beats the kernel. Every method gets the same rows grouped
by expert (x [N, D], offsets [E+1], route_w [N]) and returns y [N, D]; repeats interleave the methods
(rotating order) so load from other processes hits all of them alike. Reported per case and method: median
and min/max ms, GB/s (bytes of the weights of experts that got rows, per median time), GFLOP/s
(N * 2 * 3 * D * I per median time), and the kernel's speedups. With --threads 1 it also records each call's
CPU time (`median_cpu_ms`), which other processes on the box disturb less than wall time.

--compare-source FILE (a .py defining SOURCE, e.g. an older moe_mlp_src.py from `git show`, or a .c file) adds
method `kernel_b`: that source built like the kernel and timed interleaved with it in the same process, the
fair way to A/B a kernel change on a box other processes share.

    python bench/moe_kernel.py --out out/moe_kernel.json [--repeats 15] [--threads N] [--tiny]
                               [--compare-source old_src.py]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import versions, write_result  # noqa: E402
from engine.kernels.cpu import KernelBuildError, moe_mlp, moe_mlp_available  # noqa: E402

Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x, offsets, route_w


def _swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(g.clamp(max=limit)) * u.clamp(min=-limit, max=limit)


def run_loop(x, offsets, route_w, w1, w3, w2, limit):
    """One F.linear per non-empty expert (RoutedExperts._forward_loop without the gather/scatter)."""
    y = torch.empty_like(x)
    off = offsets.tolist()
    for s in range(w1.shape[0]):
        a, b = off[s], off[s + 1]
        if a < b:
            h = _swiglu(F.linear(x[a:b], w1[s]), F.linear(x[a:b], w3[s]), limit) * route_w[a:b, None]
            y[a:b] = F.linear(h, w2[s])
    return y


def run_bmm(x, offsets, route_w, w1, w3, w2, limit):
    """Rows padded into [E, max_count, D] and three bmm's (RoutedExperts._forward_bmm's core)."""
    counts = offsets.diff()
    expert = torch.repeat_interleave(torch.arange(w1.shape[0]), counts)
    slot = torch.arange(x.shape[0]) - offsets[:-1][expert]
    xb = x.new_zeros(w1.shape[0], int(counts.max()), x.shape[1])
    xb[expert, slot] = x
    a = _swiglu(torch.bmm(xb, w1.transpose(1, 2)), torch.bmm(xb, w3.transpose(1, 2)), limit)
    ab = torch.zeros_like(a)
    ab[expert, slot] = a[expert, slot] * route_w[:, None]
    return torch.bmm(ab, w2.transpose(1, 2))[expert, slot]


def load_source(path: Path) -> str:
    """C source from a .c file, or the SOURCE string of a .py file (such as a moe_mlp_src.py)."""
    if not path.is_file():
        raise SystemExit(f"--compare-source: no file {path}")
    if path.suffix == ".c":
        return path.read_text()
    spec = importlib.util.spec_from_file_location("compare_source", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--compare-source: cannot load {path} (expected a .c or .py file)")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not isinstance(getattr(mod, "SOURCE", None), str):
        raise SystemExit(f"--compare-source: {path} defines no SOURCE string")
    return mod.SOURCE


def build_variant(source: str) -> Callable:
    """`source` compiled like the default kernel (same flags and thread runtime), as a moe_mlp-like callable.

    MoeMlpKernel compiles its module's SOURCE; it is swapped for the build only (the cache key is the source).
    """
    mod = importlib.import_module("engine.kernels.cpu.moe_mlp")  # the module (the package's moe_mlp is the function)
    saved = mod.SOURCE
    mod.SOURCE = source
    try:
        kernel = mod.MoeMlpKernel()
    except (KernelBuildError, AttributeError) as e:  # AttributeError: the library lacks megaserve_moe_mlp
        raise SystemExit(f"--compare-source: cannot build or load it: {e}") from e
    finally:
        mod.SOURCE = saved
    return kernel.run


def make_case(n_tokens: int, n_experts: int, topk: int, d: int, seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:topk] for _ in range(n_tokens)])
    counts = torch.bincount(idx.flatten(), minlength=n_experts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    n = int(offsets[-1])
    return torch.randn(n, d, generator=g), offsets, torch.rand(n, generator=g)


def bench_case(methods: dict[str, Callable], case: Case, weights, limit: float, repeats: int,
               cpu_time: bool) -> dict:
    x, offsets, route_w = case
    w1, w3, w2 = weights
    counts = offsets.diff()
    ref = run_loop(x, offsets, route_w, *weights, limit)
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    names = list(methods)
    for rep in range(repeats + 1):  # the first round warms up and checks agreement
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            t0, c0 = time.perf_counter(), time.thread_time()
            y = methods[name](x, offsets, route_w, w1, w3, w2, limit)
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            if rep == 0:
                err = (y - ref).abs().max().item() / ref.abs().max().item()
                assert err <= 1e-5, f"{name} disagrees with the loop: rel err {err:.2e}"
            else:
                times[name].append(dt)
                cpu[name].append(dc)
    active = int((counts > 0).sum())
    weight_bytes = active * (w1[0].numel() + w3[0].numel() + w2[0].numel()) * 4
    flops = x.shape[0] * 2 * (w1[0].numel() + w3[0].numel() + w2[0].numel())
    out = {"rows": x.shape[0], "active_experts": active, "max_rows_per_expert": int(counts.max()),
           "weight_mb": weight_bytes / 1e6, "methods": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        out["methods"][name] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                                "gb_per_s": weight_bytes / med / 1e9, "gflop_per_s": flops / med / 1e9}
        if cpu_time:
            out["methods"][name]["median_cpu_ms"] = statistics.median(cpu[name]) * 1e3
    if "kernel" in times:
        k = statistics.median(times["kernel"])
        out["kernel_speedup"] = {n: statistics.median(ts) / k for n, ts in times.items() if n != "kernel"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--tiny", action="store_true", help="small shapes, to check the script runs")
    ap.add_argument("--compare-source", type=Path, default=None,
                    help="also time this kernel source (.py with SOURCE, or .c) as method kernel_b")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_time = torch.get_num_threads() == 1
    torch.manual_seed(0)
    n_experts, topk, d, inter = (8, 2, 128, 64) if args.tiny else (32, 6, 768, 512)
    limit = 10.0
    weights = (torch.randn(n_experts, inter, d) / d**0.5, torch.randn(n_experts, inter, d) / d**0.5,
               torch.randn(n_experts, d, inter) / inter**0.5)
    methods: dict[str, Callable] = {"bmm": run_bmm, "loop": run_loop}
    if moe_mlp_available():
        methods = {"kernel": moe_mlp, **methods}
        if args.compare_source is not None:
            methods = {"kernel_b": build_variant(load_source(args.compare_source)), **methods}
    elif args.compare_source is not None:
        raise SystemExit("--compare-source: the kernel is unavailable here (no compiler?)")
    batches = {"decode_b8": 8, "decode_b32": 32, "decode_b64": 64, "prefill_4096": 256 if args.tiny else 4096}
    cases = {}
    for i, (name, tokens) in enumerate(batches.items()):
        case = make_case(tokens, n_experts, topk, d, seed=i)
        reps = max(3, args.repeats // 3) if name.startswith("prefill") else args.repeats
        cases[name] = bench_case(methods, case, weights, limit, reps, cpu_time)
        print(name, {m: round(r["median_ms"], 2) for m, r in cases[name]["methods"].items()}, flush=True)
    sweep = {}
    for rows in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        s = min(8, n_experts)
        offsets = torch.arange(s + 1, dtype=torch.int64) * rows
        case = (torch.randn(s * rows, d), offsets, torch.rand(s * rows))
        res = bench_case(methods, case, tuple(w[:s] for w in weights), limit, max(3, args.repeats // 3), cpu_time)
        sweep[rows] = {m: round(r["median_ms"], 3) for m, r in res["methods"].items()}
        print("rows/expert", rows, sweep[rows], flush=True)
    crossover = next((r for r, t in sweep.items() if "kernel" in t and t["loop"] < t["kernel"]), None)
    summary = {f"{c}_{m}_ms": round(r["median_ms"], 3) for c, res in cases.items() for m, r in res["methods"].items()}
    summary["loop_beats_kernel_from_rows_per_expert"] = crossover
    if "kernel" in methods:
        summary["decode_b32_kernel_gb_per_s"] = round(cases["decode_b32"]["methods"]["kernel"]["gb_per_s"], 1)
    result = {"shapes": {"experts": n_experts, "topk": topk, "hidden": d, "inter": inter, "dtype": "float32"},
              "threads": torch.get_num_threads(), "kernel_available": "kernel" in methods,
              "versions": versions(with_transformers=False), "cases": cases,
              "sweep_8_experts_median_ms": sweep, "summary": summary}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
