"""Native weights vs dequantized, on one quantized checkpoint: resident bytes, CPU decode and prefill speed.

The same random checkpoint (FP8 linears, MXFP4 experts; `--preset small` by default) loaded twice:
`weights="native"` (checkpoint precision in memory) and `weights="dequantized"` (every weight in float32, the
reference). Decode: `--decode-steps` greedy steps of a batch of B sequences (B in `--batches`) after a short
prompt each; prefill: one prompt of `--prefill-len` tokens. Each measurement is repeated `--repeats` times,
native and dequantized interleaved (the machine may be shared: interleaving spreads any contention over both);
the JSON reports medians, min/max and the ratios native / dequantized (per repeat, then the median).

    python bench/weights.py --out out/weights.json [--preset small] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import run_stats, versions, write_result  # noqa: E402
from engine.model.config import get_preset  # noqa: E402
from engine.weights.checkpoint import open_checkpoint  # noqa: E402
from engine.weights.loader import load_model  # noqa: E402
from engine.weights.make_checkpoint import write_checkpoint  # noqa: E402
from engine.weights.resident import model_resident_bytes  # noqa: E402


def decode_tok_s(model, batch: int, prompt_len: int, steps: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, model.cfg.vocab_size, (batch, prompt_len), generator=g)
    with torch.inference_mode():
        states = [model.new_state() for _ in range(batch)]
        h = model(prompts.flatten(), states, [prompt_len] * batch)
        nxt = model.compute_logits(h.view(batch, prompt_len, *h.shape[1:])[:, -1]).argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = model.compute_logits(model(nxt, states, [1] * batch)).argmax(-1)
        return batch * steps / (time.perf_counter() - t0)


def prefill_tok_s(model, length: int, seed: int) -> float:
    ids = torch.randint(2, model.cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.compute_logits(model(ids, [model.new_state()], [length])[-1:])
        return length / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt of each decoding sequence")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    cfg = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(cfg, tmp, seed=args.seed)
        manifest_bytes = open_checkpoint(tmp).manifest.bytes
        models = {mode: load_model(tmp, dtype=torch.float32, weights=mode) for mode in ("native", "dequantized")}
    resident = {mode: model_resident_bytes(m) for mode, m in models.items()}
    for m in models.values():  # warm-up: kernels built, first-touch page faults paid
        decode_tok_s(m, 2, 8, 2, args.seed)
        prefill_tok_s(m, 64, args.seed)
    runs: dict[str, dict[str, list[float]]] = {mode: {} for mode in models}
    for rep in range(args.repeats):
        order = list(models) if rep % 2 == 0 else list(reversed(models))  # alternate who goes first
        for b in batches:
            for mode in order:
                runs[mode].setdefault(f"decode_b{b}", []).append(
                    decode_tok_s(models[mode], b, args.prompt_len, args.decode_steps, args.seed + rep))
        for mode in order:
            runs[mode].setdefault("prefill", []).append(prefill_tok_s(models[mode], args.prefill_len, args.seed + rep))
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{m} {k} {v[-1]:.1f}" for m, r in runs.items()
                                                              for k, v in r.items()), file=sys.stderr, flush=True)
    summary: dict = {
        "resident_bytes_native": resident["native"], "resident_bytes_dequantized": resident["dequantized"],
        "manifest_bytes": manifest_bytes,
        "resident_ratio_dequantized_over_native": round(resident["dequantized"] / resident["native"], 3),
    }
    for key in runs["native"]:
        ratios = [a / b for a, b in zip(runs["native"][key], runs["dequantized"][key])]
        summary[f"{key}_tok_s_native"] = round(statistics.median(runs["native"][key]), 1)
        summary[f"{key}_tok_s_dequantized"] = round(statistics.median(runs["dequantized"][key]), 1)
        summary[f"{key}_ratio"] = round(statistics.median(ratios), 3)
        summary[f"{key}_ratio_min_max"] = [round(min(ratios), 3), round(max(ratios), 3)]
    out = {
        "benchmark": "weights",
        "workload": {"preset": args.preset, "batches": batches, "prompt_len": args.prompt_len,
                     "decode_steps": args.decode_steps, "prefill_len": args.prefill_len, "repeats": args.repeats,
                     "seed": args.seed, "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
                     "load_average": os.getloadavg(), "unit": "tokens/s"},
        "versions": versions(),
        "results": {mode: {k: run_stats(v) for k, v in r.items()} for mode, r in runs.items()},
        "summary": summary,
    }
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
