"""Offline throughput: our engine (`engine.LLM`) vs transformers' `generate`, same checkpoint, one run.

The standard workload (cluster/loadtest/offline.py, shared with `megaserve bench offline`): 32 prompts x 128
random tokens -> 64 new tokens each, greedy, ignore_eos, float32, the `small` preset. Output tokens/s of each
(median over `--repeats`, alternating; transformers with its fastest routed-expert implementation here, chosen
by a probe and named in the JSON), the ratio (`summary.speedup_vs_transformers`), and the scheduler's own
time per step with 1,000 running requests.

Also the roofline (bench/roofline.py): the workload's FLOPs, this machine's measured fp32 GEMM peak, hence the
ceiling on output tokens/s that no engine here can pass, and each engine's fraction of it; and our engine's
time split into the prefill step and the decode steps.

    python bench/offline.py --out out/offline.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fastest_hf_model, versions, write_result  # noqa: E402
from bench.roofline import ceiling, measure_machine, workload_flops  # noqa: E402
from bench.scheduler_step import measure as measure_scheduler  # noqa: E402
from cluster.loadtest.offline import OfflineWorkload, engine_args, make_prompts, timed_generate  # noqa: E402
from engine import LLM  # noqa: E402
from engine.model.config import get_preset  # noqa: E402
from engine.weights.checkpoint import open_checkpoint  # noqa: E402
from engine.weights.make_checkpoint import write_checkpoint  # noqa: E402
from scheduler.sampling import SamplingParams  # noqa: E402


def _hf(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0)
    dt = time.perf_counter() - t0
    return dt, int((out.shape[1] - ids.shape[1]) * ids.shape[0])


def _phases(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict:
    """Our engine step by step: the first step (the whole prefill, when the token budget holds every prompt)
    and the decode steps after it."""
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for p in prompts:
        eng.add_request(p, params)
    times = []
    while eng.has_unfinished():
        t0 = time.perf_counter()
        outs = eng.step()
        if outs:  # the scheduler's last step only hands the finished ids to the runner
            times.append(time.perf_counter() - t0)
    return {"first_step_s": round(times[0], 3), "decode_steps": len(times) - 1,
            "decode_step_ms_median": round(statistics.median(times[1:]) * 1e3, 2) if len(times) > 1 else None,
            "decode_s": round(sum(times[1:]), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))

    cfg = get_preset(args.preset)
    machine = measure_machine()  # first, while nothing else of ours runs
    workload = OfflineWorkload(args.num_prompts, args.prompt_len, args.new_tokens, args.seed)
    prompts = make_prompts(cfg.vocab_size, workload)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(cfg, tmp, seed=args.seed)
        llm = LLM(tmp, **engine_args(workload))
        hf, hf_info = None, None
        if not args.skip_transformers:
            hf, hf_info = fastest_hf_model(cfg, open_checkpoint(tmp).state_dict(torch.float32))
    timed_generate(llm, prompts[:2], 2)
    if hf is not None:
        _hf(hf, prompts[:2], 2)
    runs: dict[str, list[float]] = {"ours": [], "transformers": []}
    for _ in range(args.repeats):
        dt, n = timed_generate(llm, prompts, args.new_tokens)
        runs["ours"].append(n / dt)
        if hf is not None:
            dt, n = _hf(hf, prompts, args.new_tokens)
            runs["transformers"].append(n / dt)
    phases = _phases(llm, prompts, args.new_tokens)
    sched = measure_scheduler(1000, 200)
    flops = workload_flops(cfg, args.num_prompts, args.prompt_len, args.new_tokens)
    roof = ceiling(flops, machine, args.num_prompts * args.new_tokens)
    summary: dict = {"output_tok_s_ours": round(statistics.median(runs["ours"]), 1)}
    summary["ours_fraction_of_ceiling"] = round(summary["output_tok_s_ours"] / roof["ceiling_output_tok_s"], 3)
    if hf is not None:
        ratios = [a / b for a, b in zip(runs["ours"], runs["transformers"])]
        summary.update({
            "output_tok_s_transformers": round(statistics.median(runs["transformers"]), 1),
            "speedup_vs_transformers": round(statistics.median(ratios), 2),
            "transformers_experts_implementation": hf_info["experts_implementation"],
            "speedup_min_max": [round(min(ratios), 2), round(max(ratios), 2)],
            # the most any engine on this machine could beat transformers by: the ceiling / transformers
            "max_possible_speedup_vs_transformers": round(
                roof["ceiling_output_tok_s"] / statistics.median(runs["transformers"]), 2),
        })
    summary.update(roof)
    summary["scheduler_step_ms_1000_running"] = sched["step_ms_median"]
    out = {
        "benchmark": "offline",
        "workload": {"preset": args.preset, "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "greedy": True, "ignore_eos": True, "dtype": "float32",
                     "device": "cpu", "repeats": args.repeats, "seed": args.seed, "threads": torch.get_num_threads()},
        "versions": versions(with_transformers=hf is not None),
        "transformers": hf_info,
        "runs_output_tok_s": runs,
        "scheduler": sched,
        "ours_phases": phases,
        "machine": machine,
        "workload_gflops": {k: round(v / 1e9, 1) for k, v in flops.items()},
        "summary": summary,
    }
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
