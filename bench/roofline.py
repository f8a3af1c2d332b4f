"""What this machine can do at best on the offline workload: its measured fp32 GEMM rate and read bandwidth,
and the workload's FLOPs, so a throughput can be read as a fraction of the ceiling.

The FLOPs come from the capacity planner's own per-token count (`cluster.plan.perf.token_flops`: every
matmul of every layer, the attention core and the LM head), summed over the tokens the workload pushes
through the model:

- prefill: every prompt token at positions 0 .. prompt_len-1, the LM head only on each prompt's last row;
- decode: new_tokens - 1 steps per prompt (the first new token comes out of prefill), each a token at
  positions prompt_len .. prompt_len + new_tokens - 2, LM head included.

The floor is FLOPs / (the best fp32 GEMM rate measured here, large square matmuls on every thread torch
uses): no engine on this machine can finish the workload sooner, and the ceiling on output tokens/s is
output tokens / floor.

    python bench/roofline.py            # prints the machine figures and the small-preset workload's FLOPs
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.plan.hardware import get_hardware  # noqa: E402
from cluster.plan.model_spec import from_v4  # noqa: E402
from cluster.plan.perf import token_flops  # noqa: E402
from engine.model.config import ModelConfig, get_preset  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    fn()  # warm up (allocations, thread pool)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_machine(repeats: int = 7) -> dict:
    """fp32 GEMM GFLOP/s (best of a few large shapes, median over repeats) and read bandwidth GB/s."""
    g = torch.Generator().manual_seed(0)
    gemm = {}
    for m, k, n in ((2048, 2048, 2048), (4096, 768, 1024), (1024, 3072, 2048)):
        a = torch.randn(m, k, generator=g)
        b = torch.randn(k, n, generator=g)
        t = _median_time(lambda a=a, b=b: torch.mm(a, b), repeats)
        gemm[f"{m}x{k}x{n}"] = round(2 * m * k * n / t / 1e9, 1)
    x = torch.randn(64 * 2**20, generator=g)  # 256 MiB: far beyond the caches
    t = _median_time(lambda: x.sum(), repeats)
    return {"threads": torch.get_num_threads(), "fp32_gemm_gflops": gemm,
            "fp32_gemm_gflops_best": max(gemm.values()), "read_gb_s": round(x.numel() * 4 / t / 1e9, 1)}


def workload_flops(cfg: ModelConfig, num_prompts: int, prompt_len: int, new_tokens: int) -> dict:
    """FLOPs of the offline workload (module docstring), split into prefill and decode."""
    if prompt_len < 1 or new_tokens < 1:
        raise ValueError(f"prompt_len and new_tokens must be >= 1, got {prompt_len}, {new_tokens}")
    model = from_v4(cfg)
    hw = get_hardware("b200")  # only sets a Layout; FLOPs do not depend on it
    per_pos = [token_flops(model, p, hw) for p in range(prompt_len + new_tokens - 1)]
    head = per_pos[0]["head"]
    prefill = sum(f["total"] - head for f in per_pos[:prompt_len]) + head
    decode = sum(f["total"] for f in per_pos[prompt_len:])
    return {"prefill_flops": num_prompts * prefill, "decode_flops": num_prompts * decode,
            "total_flops": num_prompts * (prefill + decode)}


def ceiling(flops: dict, machine: dict, output_tokens: int) -> dict:
    """The floor on wall time at the measured GEMM peak and the ceiling on output tokens/s it implies."""
    peak = machine["fp32_gemm_gflops_best"] * 1e9
    floor_s = flops["total_flops"] / peak
    return {"floor_s_at_gemm_peak": round(floor_s, 3), "ceiling_output_tok_s": round(output_tokens / floor_s, 1)}


if __name__ == "__main__":
    m = measure_machine()
    f = workload_flops(get_preset("small"), 32, 128, 64)
    print(m)
    print({k: f"{v / 1e9:.1f} GFLOP" for k, v in f.items()})
    print(ceiling(f, m, 32 * 64))
