"""Forward-pass throughput: megaserve's model vs transformers' DeepseekV4ForCausalLM, same checkpoint, one run.

Two workloads: "batch" = `--batch` prompts of `--prompt-len` random tokens prefilled together, then
`--decode-steps` greedy decode steps of the whole batch; "long" = one prompt of `--long-prompt-len`
tokens, then `--decode-steps` steps. Each measurement is repeated `--repeats` times, alternating the
two implementations; the JSON reports medians, min/max and the ratio ours / transformers. Both sides compute
logits for the last position only; transformers runs its fastest routed-expert implementation on this
machine for each phase (`bench.common.fastest_hf_model`: grouped_mm, batched_mm or eager, chosen by a probe of
the prefill and of the decode steps, switched between the phases, named in the JSON).

    python bench/forward.py --out out/forward.json [--preset small]
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

from bench.common import fastest_hf_model, hf_generate_steps, run_stats, versions, write_result  # noqa: E402
from engine.model.config import get_preset  # noqa: E402
from engine.weights.checkpoint import open_checkpoint  # noqa: E402
from engine.weights.loader import load_model  # noqa: E402
from engine.weights.make_checkpoint import write_checkpoint  # noqa: E402


def _ours(model, prompts: torch.Tensor, steps: int) -> tuple[float, float]:
    b, s = prompts.shape
    with torch.inference_mode():
        states = [model.new_state() for _ in range(b)]
        t0 = time.perf_counter()
        h = model(prompts.flatten(), states, [s] * b)
        nxt = model.compute_logits(h.view(b, s, *h.shape[1:])[:, -1]).argmax(-1)
        t1 = time.perf_counter()
        for _ in range(steps):
            nxt = model.compute_logits(model(nxt, states, [1] * b)).argmax(-1)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--long-prompt-len", type=int, default=2048, help="0 skips the long workload")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(cfg, tmp, seed=args.seed)
        ours = load_model(tmp, dtype=torch.float32)
        sd = dict(open_checkpoint(tmp).iter_weights(dtype=torch.float32))
    theirs, hf_info = fastest_hf_model(cfg, sd, dtype=torch.float32)
    del sd
    g = torch.Generator().manual_seed(args.seed)
    workloads = {"batch": torch.randint(2, cfg.vocab_size, (args.batch, args.prompt_len), generator=g)}
    if args.long_prompt_len:
        workloads["long"] = torch.randint(2, cfg.vocab_size, (1, args.long_prompt_len), generator=g)

    phase_impls = hf_info["phase_implementations"]

    def _theirs(model, prompts: torch.Tensor, steps: int) -> tuple[float, float]:  # each phase its fastest experts
        return hf_generate_steps(model, prompts, steps, phase_impls)

    _ours(ours, workloads["batch"][:, :16], 2)  # warm-up both
    _theirs(theirs, workloads["batch"][:, :16], 2)
    impls = (("ours", _ours, ours), ("transformers", _theirs, theirs))
    res = {w: {name: {"prefill": [], "decode": []} for name, _, _ in impls} for w in workloads}
    for _ in range(args.repeats):
        for w, prompts in workloads.items():
            b, s = prompts.shape
            for name, fn, model in impls:
                tp, td = fn(model, prompts, args.decode_steps)
                res[w][name]["prefill"].append(b * s / tp)
                res[w][name]["decode"].append(b * args.decode_steps / td)
    out = {
        "benchmark": "forward",
        "workload": {"preset": args.preset, "batch": args.batch, "prompt_len": args.prompt_len,
                     "long_prompt_len": args.long_prompt_len, "decode_steps": args.decode_steps,
                     "repeats": args.repeats, "seed": args.seed, "dtype": "float32", "device": "cpu",
                     "threads": torch.get_num_threads(), "unit": "tokens/s"},
        "versions": versions(),
        "transformers": hf_info,
        "results": {w: {name: {k: run_stats(v) for k, v in r.items()} for name, r in rw.items()}
                    for w, rw in res.items()},
    }
    summary = {}
    for w, rw in res.items():
        for phase in ("prefill", "decode"):
            a_runs, b_runs = rw["ours"][phase], rw["transformers"][phase]
            ratios = [x / y for x, y in zip(a_runs, b_runs)]
            key = f"{w}_{phase}"
            summary[f"{key}_tok_s_ours"] = round(statistics.median(a_runs), 1)
            summary[f"{key}_tok_s_transformers"] = round(statistics.median(b_runs), 1)
            summary[f"{key}_ratio"] = round(statistics.median(ratios), 3)
            summary[f"{key}_ratio_min_max"] = [round(min(ratios), 3), round(max(ratios), 3)]
    summary["transformers_experts_implementation"] = phase_impls
    out["summary"] = summary
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
