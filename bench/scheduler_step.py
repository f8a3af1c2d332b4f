"""The scheduler's own cost per step: schedule() + update_from_output() with fabricated runner outputs.

Two workloads: "decode" = `--running` requests all decoding (one token each per step); "mixed" = the
same plus a long prompt arriving every `--arrive-every` steps, prefilled in chunks within the token
budget and finishing after a few tokens (half of them share a prefix, so prefix lookups hit). Only the
two scheduler calls are timed; building the fake runner output is not.

    python bench/scheduler_step.py --out out/scheduler_step.json [--running 1000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.output import ModelRunnerOutput, SchedulerOutput  # noqa: E402
from scheduler.request import Request  # noqa: E402
from scheduler.sampling import SamplingParams  # noqa: E402
from scheduler.scheduler import Scheduler  # noqa: E402

PAGE_TOKENS = 256
DECODE_PARAMS = SamplingParams(max_tokens=1_000_000, ignore_eos=True)


def _fake_runner(s: Scheduler, out: SchedulerOutput) -> ModelRunnerOutput:
    """A token for every request whose scheduled tokens reach its end, [] for a prefill chunk."""
    ids = list(out.num_scheduled_tokens)
    reqs = s.requests
    sampled = []
    for rid in ids:
        r = reqs[rid]
        sampled.append([5] if r.num_computed_tokens + out.num_scheduled_tokens[rid] >= r.num_tokens else [])
    return ModelRunnerOutput(ids, sampled)


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _run(
    s: Scheduler, steps: int, arrive_every: int = 0, prompt_len: int = 0, rng: random.Random | None = None
) -> dict:
    shared = [rng.randrange(2, 50_000) for _ in range(prompt_len // 2)] if rng else []
    sched_ms, update_ms, step_ms, tokens, running = [], [], [], [], []
    full_gcs = []
    on_gc = lambda phase, info: full_gcs.append(1) if phase == "start" and info["generation"] == 2 else None
    gc.callbacks.append(on_gc)
    for i in range(steps):
        if arrive_every and i % arrive_every == 0:
            head = shared if i % (2 * arrive_every) == 0 else []
            prompt = head + [rng.randrange(2, 50_000) for _ in range(prompt_len - len(head))]
            s.add_request(Request(f"p{i}", prompt, SamplingParams(max_tokens=8, ignore_eos=True)))
        t0 = time.perf_counter()
        out = s.schedule()
        t1 = time.perf_counter()
        runner_out = _fake_runner(s, out)
        t2 = time.perf_counter()
        s.update_from_output(out, runner_out)
        t3 = time.perf_counter()
        sched_ms.append((t1 - t0) * 1e3)
        update_ms.append((t3 - t2) * 1e3)
        step_ms.append((t1 - t0 + t3 - t2) * 1e3)
        tokens.append(out.total_num_scheduled_tokens)
        running.append(s.num_running)
    gc.callbacks.remove(on_gc)
    return {
        "gc_enabled": gc.isenabled(),
        "full_gc_collections": len(full_gcs),
        "steps": steps,
        "step_ms_median": statistics.median(step_ms),
        "step_ms_p99": _percentile(step_ms, 0.99),
        "step_ms_mean": statistics.fmean(step_ms),
        "step_ms_max": max(step_ms),
        "schedule_ms_median": statistics.median(sched_ms),
        "update_ms_median": statistics.median(update_ms),
        "tokens_per_step_mean": statistics.fmean(tokens),
        "running_mean": statistics.fmean(running),
    }


def _decoding_scheduler(n_running: int, budget: int, extra_pages: int = 0) -> Scheduler:
    """n_running requests of 20-300 prompt tokens, prefilled already: every one of them is decoding."""
    rng = random.Random(0)
    cfg = SchedulerConfig(
        num_pages=4 * n_running + extra_pages + 64,
        max_num_seqs=n_running + 64,
        max_num_batched_tokens=budget,
        page_tokens=PAGE_TOKENS,
    )
    s = Scheduler(cfg)
    for i in range(n_running):
        prompt = [rng.randrange(2, 50_000) for _ in range(rng.randint(20, 300))]
        s.add_request(Request(f"d{i}", prompt, DECODE_PARAMS))
    while any(r.num_computed_tokens < r.num_tokens - 1 for r in s.running) or s.num_waiting:
        out = s.schedule()
        s.update_from_output(out, _fake_runner(s, out))
    return s


def measure(n_running: int, steps: int) -> dict:
    """Scheduler time per step with n_running decoding requests (token budget fits them all)."""
    s = _decoding_scheduler(n_running, budget=max(2048, n_running + 1024))  # never binds: setup converges fast
    return {"running": n_running, **_run(s, steps)}


def measure_mixed(n_running: int, steps: int, prompt_len: int = 3000, arrive_every: int = 4) -> dict:
    """As measure(), plus a prompt_len-token prompt arriving every arrive_every steps (chunked prefill)."""
    budget = n_running + 1024
    s = _decoding_scheduler(n_running, budget, extra_pages=steps * prompt_len // PAGE_TOKENS // arrive_every)
    res = _run(s, steps, arrive_every, prompt_len, random.Random(1))
    return {"running": n_running, "prompt_len": prompt_len, "arrive_every": arrive_every, **res, **s.stats()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--running", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--arrive-every", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=3000)
    args = ap.parse_args()

    decode = measure(args.running, args.steps)
    mixed = measure_mixed(args.running, args.steps, args.prompt_len, args.arrive_every)
    # The same with the cyclic GC off: separates the scheduler's own time from the interpreter's full
    # collections (which traverse every live token list; an engine would gc.freeze() after startup).
    gc.disable()
    try:
        decode_nogc = measure(args.running, args.steps)
    finally:
        gc.enable()
    result = {
        "summary": {k: decode[k] for k in ("step_ms_median", "step_ms_p99", "running")},
        "decode": decode,
        "mixed": mixed,
        "decode_gc_off": decode_nogc,
        "page_tokens": PAGE_TOKENS,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"]))
    print(f"decode, gc off: median {decode_nogc['step_ms_median']:.2f} ms, p99 {decode_nogc['step_ms_p99']:.2f} ms")
    print(
        f"mixed: median {mixed['step_ms_median']:.2f} ms, p99 {mixed['step_ms_p99']:.2f} ms, "
        f"{mixed['tokens_per_step_mean']:.0f} tokens/step, prefix hit rate {mixed['prefix_hit_rate']:.2f}"
    )


if __name__ == "__main__":
    main()
