"""Where the offline workload's time goes in our engine: wall time per model part, prefill step vs decode steps.

Wraps the forward methods of the engine's modules with timers (nested parts are included in their parents:
`attention` holds `attention.batch_core`, which holds `attention.compressor_batched`), runs the standard
workload once to warm up, then once measured, and prints seconds in the prefill step and milliseconds per
decode step.

    python bench/offline_profile.py [--preset small] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine.core.runner as runner  # noqa: E402
import engine.model.attention as attention  # noqa: E402
import engine.model.model as model  # noqa: E402
import engine.model.moe as moe  # noqa: E402
from cluster.loadtest.offline import OfflineWorkload, engine_args, make_prompts  # noqa: E402
from engine import LLM  # noqa: E402
from engine.model.config import get_preset  # noqa: E402
from engine.weights.make_checkpoint import write_checkpoint  # noqa: E402
from scheduler.sampling import SamplingParams  # noqa: E402

PARTS = [  # (owner, attribute, label)
    (runner.ModelRunner, "execute", "runner.execute"),
    (model.Transformer, "forward", "model.forward"),
    (attention.Attention, "forward", "attention"),
    (attention.Attention, "_attend_batch", "attention.batch_core"),
    (attention.Compressor, "forward_batch", "attention.compressor_batched"),
    (model.Block, "_hc", "mhc.pre"),
    (model, "hc_post", "mhc.post"),
    (moe.Gate, "forward", "moe.gate"),
    (moe.RoutedExperts, "forward", "moe.routed"),
    (moe.Expert, "forward", "moe.shared"),
    (model.Transformer, "compute_logits", "logits"),
    (runner.Sampler, "__call__", "sampler"),
]


def _instrument(acc: dict[str, float]) -> None:
    for owner, name, label in PARTS:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*a, _fn=fn, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_label] += time.perf_counter() - t0

        setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    acc: dict[str, float] = collections.defaultdict(float)
    _instrument(acc)
    cfg = get_preset(args.preset)
    workload = OfflineWorkload(32, 128, 64, 0)
    prompts = make_prompts(cfg.vocab_size, workload)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(cfg, tmp, seed=0)
        eng = LLM(tmp, **engine_args(workload)).engine
    params = SamplingParams(temperature=0, max_tokens=workload.new_tokens, ignore_eos=True)

    def run() -> tuple[dict[str, float], dict[str, float], list[float]]:
        for p in prompts:
            eng.add_request(p, params)
        acc.clear()
        times, prefill = [], {}
        while eng.has_unfinished():
            t0 = time.perf_counter()
            outs = eng.step()
            if outs:
                times.append(time.perf_counter() - t0)
            if len(times) == 1 and not prefill:
                prefill = dict(acc)
        return prefill, dict(acc), times

    run()  # warm-up (first-use kernel compile, allocations)
    prefill, total, times = run()
    n_decode = len(times) - 1
    rows = {k: {"prefill_s": round(prefill.get(k, 0.0), 3),
                "decode_ms_per_step": round((total[k] - prefill.get(k, 0.0)) / max(n_decode, 1) * 1e3, 2)}
            for k in sorted(total, key=lambda k: -total[k])}
    print(f"total {sum(times):.2f} s: prefill step {times[0]:.2f} s, {n_decode} decode steps "
          f"{sum(times[1:]):.2f} s")
    print(f"{'part':30s} {'prefill s':>10s} {'decode ms/step':>15s}")
    for k, r in rows.items():
        print(f"{k:30s} {r['prefill_s']:10.3f} {r['decode_ms_per_step']:15.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"preset": args.preset, "prefill_step_s": times[0],
                                              "decode_steps": n_decode, "decode_s": sum(times[1:]),
                                              "parts": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
