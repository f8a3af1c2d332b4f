"""What every benchmark shares: the software versions it ran with, and writing its JSON."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def versions(with_transformers: bool = True) -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    if with_transformers:
        out["transformers"] = __import__("transformers").__version__
    return out


def run_stats(xs: list[float]) -> dict:
    """Median, min, max and every run of a repeated measurement."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def write_result(path: str | Path, result: dict) -> None:
    """Write the benchmark's JSON (its headline figures under `summary`) and print the summary."""
    assert "summary" in result, "every benchmark JSON has a top-level summary"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


# transformers' routed-expert implementations, fastest first where the installed version has them; eager (a
# per-expert Python loop) is the slow fallback and never the baseline while a faster one loads.
HF_EXPERT_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")
GATHER_LIMIT = 1 << 30  # batched_mm's per-token weight gather above this is no prefill candidate (fastest_hf_model)


def fastest_hf_model(cfg, sd: dict, dtype: torch.dtype = torch.float32, batch: int = 8, prompt_len: int = 64,
                     decode_steps: int = 4) -> tuple[object, dict]:
    """transformers' DeepseekV4ForCausalLM on `sd`, with the experts implementation that runs a short probe
    (one `batch` x `prompt_len` prefill, `decode_steps` decode steps, last-position logits) fastest here.

    Returns (model, info): info["experts_implementation"] is the one fastest over the whole probe (what a single
    `generate` call runs), info["phase_implementations"] the fastest for the prefill and for the decode steps
    separately (`hf_generate_steps` switches between them when given it: transformers switches at runtime), and
    info["probe_s"] the probe's (prefill, decode) seconds of every implementation that loaded (and the error of
    those that did not). Attention is eager: transformers' DeepseekV4 supports no other attention implementation
    on CPU (sdpa is refused at construction).
    """
    root = Path(__file__).resolve().parents[1]
    if str(root / "tests") not in sys.path:
        sys.path.insert(0, str(root / "tests"))
    from hf_ref import build_hf_model  # test-only dependency: transformers

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (batch, prompt_len), generator=g)
    probe: dict[str, list[float] | str] = {}
    model = None
    for impl in HF_EXPERT_IMPLEMENTATIONS:
        try:
            if model is None:
                model = build_hf_model(cfg, sd, dtype=dtype, experts_implementation=impl)
            else:
                model.set_experts_implementation(impl)
        except Exception as e:  # an implementation this transformers version lacks
            probe[impl] = f"unavailable: {type(e).__name__}: {e}"[:200]
            continue
        # batched_mm gathers a [I, D] weight copy per (token, expert): over GATHER_LIMIT bytes it is no
        # candidate for the prefill (GBs, minutes; and the transient allocation slows the whole process after it,
        # ours included), so its prefill probe runs eager and only its decode steps are timed.
        gather = 3 * batch * prompt_len * cfg.num_experts_per_tok * cfg.moe_intermediate_size * cfg.hidden_size * 4
        skip_prefill = impl == "batched_mm" and gather > GATHER_LIMIT
        phases = {"prefill": "eager" if skip_prefill else impl, "decode": impl}
        hf_generate_steps(model, ids[:, :8], 1, phases)  # warm-up
        runs = [hf_generate_steps(model, ids, decode_steps, phases) for _ in range(2)]
        prefill_s = f"not a candidate: would gather {gather / 1e9:.1f} GB" if skip_prefill \
            else round(min(r[0] for r in runs), 4)
        probe[impl] = [prefill_s, round(min(r[1] for r in runs), 4)]
    timed = {impl: t for impl, t in probe.items() if isinstance(t, list)}
    if model is None or not timed:
        raise RuntimeError(f"no transformers experts implementation loaded: {probe}")
    prefill_ok = {i: t for i, t in timed.items() if not isinstance(t[0], str)}
    phases = {"prefill": min(prefill_ok, key=lambda i: prefill_ok[i][0]),
              "decode": min(timed, key=lambda i: timed[i][1])}
    whole = min(prefill_ok, key=lambda i: sum(prefill_ok[i]))
    model.set_experts_implementation(whole)
    return model, {"experts_implementation": whole, "phase_implementations": phases, "attn_implementation": "eager",
                   "probe_s": probe}


def hf_generate_steps(model, prompts: torch.Tensor, steps: int,
                      phase_implementations: dict[str, str] | None = None) -> tuple[float, float]:
    """transformers: prefill `prompts` [B, S] and `steps` greedy decode steps with its DynamicCache, computing
    logits for the last position only (`logits_to_keep=1`, as our engine does); returns (prefill s, decode s).
    `phase_implementations` ({"prefill": ..., "decode": ...}, from `fastest_hf_model`): the experts
    implementation of each phase, switched outside the timed parts."""
    from transformers import DynamicCache

    with torch.inference_mode():
        if phase_implementations:
            model.set_experts_implementation(phase_implementations["prefill"])
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        if phase_implementations:
            model.set_experts_implementation(phase_implementations["decode"])
            t1 = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1
