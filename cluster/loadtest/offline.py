"""`megaserve bench offline`: the standard offline workload through the offline API (`engine.LLM`).

The workload is bench/offline.py's (which imports it from here): `num_prompts` prompts of `prompt_len` token ids
drawn uniformly from [2, vocab) by `torch.Generator().manual_seed(seed)`, each generating exactly `new_tokens`
tokens (greedy, ignore_eos), all submitted at once so continuous batching runs them together. One short warm-up
generate, then `repeats` timed runs. Figures per run and their medians use `vllm bench throughput`'s names:
`elapsed_time`, `num_requests`, `total_num_tokens` (prompt + output), `requests_per_second`, `tokens_per_second`
(prompt + output per second), plus `output_tokens_per_second`.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine import LLM, SamplingParams


@dataclass(frozen=True)
class OfflineWorkload:
    num_prompts: int = 32
    prompt_len: int = 128
    new_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("num_prompts", "prompt_len", "new_tokens"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)!r}")


def engine_args(workload: OfflineWorkload, max_num_batched_tokens: int = 8192, page_tokens: int = 128) -> dict:
    """The engine settings of the standard workload: every prompt admitted at once."""
    return {"max_num_seqs": workload.num_prompts, "max_num_batched_tokens": max_num_batched_tokens,
            "page_tokens": page_tokens}


def make_prompts(vocab_size: int, workload: OfflineWorkload) -> list[list[int]]:
    """The workload's prompts: token ids uniform in [2, vocab_size) (0 and 1 are BOS/EOS in our tokenizer)."""
    g = torch.Generator().manual_seed(workload.seed)
    return torch.randint(2, vocab_size, (workload.num_prompts, workload.prompt_len), generator=g).tolist()


def timed_generate(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """Generate `new_tokens` for every prompt (greedy, ignore_eos); returns (seconds, output tokens)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    return dt, sum(len(o.token_ids) for o in outs)


def run_figures(elapsed: float, num_requests: int, input_tokens: int, output_tokens: int) -> dict:
    """One run's figures with `vllm bench throughput`'s keys."""
    return {"elapsed_time": elapsed, "num_requests": num_requests, "total_num_tokens": input_tokens + output_tokens,
            "total_output_tokens": output_tokens, "requests_per_second": num_requests / elapsed,
            "tokens_per_second": (input_tokens + output_tokens) / elapsed,
            "output_tokens_per_second": output_tokens / elapsed}


def run_offline(model_dir: str | Path, workload: OfflineWorkload, repeats: int = 3, dtype: str = "float32",
                device: str = "cpu", max_num_batched_tokens: int = 8192, page_tokens: int = 128,
                llm: LLM | None = None) -> dict:
    """Load `model_dir` (unless `llm` is given), run the workload `repeats` times; returns the result dict."""
    if repeats <= 0:
        raise ValueError(f"repeats must be positive, got {repeats}")
    eng = engine_args(workload, max_num_batched_tokens, page_tokens)
    t0 = time.perf_counter()
    llm = llm or LLM(model_dir, dtype=dtype, device=device, **eng)
    load_s = time.perf_counter() - t0
    vocab = llm.engine.model_config.vocab_size
    prompts = make_prompts(vocab, workload)
    timed_generate(llm, prompts[:2], 2)  # warm-up
    runs = []
    for i in range(repeats):
        dt, n_out = timed_generate(llm, prompts, workload.new_tokens)
        runs.append(run_figures(dt, len(prompts), len(prompts) * workload.prompt_len, n_out))
        print(f"[bench offline] run {i + 1}/{repeats}: {runs[-1]['output_tokens_per_second']:,.1f} output tok/s "
              f"in {dt:.2f}s", file=sys.stderr)
    expected = workload.num_prompts * workload.new_tokens
    if any(r["total_output_tokens"] != expected for r in runs):
        raise RuntimeError(f"the engine produced {[r['total_output_tokens'] for r in runs]} output tokens per run, "
                           f"expected {expected} (ignore_eos, max_tokens={workload.new_tokens})")
    summary = {k: (statistics.median(r[k] for r in runs) if isinstance(v, float) else v) for k, v in runs[0].items()}
    return {
        "benchmark": "offline",
        "model": str(model_dir),
        "workload": {**asdict(workload), "greedy": True, "ignore_eos": True, "prompts": "token ids uniform in "
                     f"[2, {vocab}) from torch.Generator().manual_seed(seed)", "repeats": repeats,
                     "warmup": "one generate of 2 prompts x 2 tokens"},
        "engine": {**eng, "dtype": dtype, "device": device, "threads": torch.get_num_threads(),
                   "load_seconds": load_s},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "runs": runs,
        "summary": summary,
    }


def print_offline_summary(result: dict, file=None) -> None:
    s, w = result["summary"], result["workload"]
    rows = [("Model:", result["model"]),
            ("Workload:", f"{w['num_prompts']} x {w['prompt_len']} tokens -> {w['new_tokens']} (greedy)"),
            ("Runs (median reported):", w["repeats"]),
            ("Elapsed (s):", f"{s['elapsed_time']:.2f}"),
            ("Requests/s:", f"{s['requests_per_second']:.2f}"),
            ("Output tokens/s:", f"{s['output_tokens_per_second']:.2f}"),
            ("Total tokens/s (prompt + output):", f"{s['tokens_per_second']:.2f}")]
    lines = ["{s:{c}^{n}}".format(s=" Offline Benchmark Result ", n=60, c="=")]
    lines += [f"{k:<36}{v}" for k, v in rows]
    lines.append("=" * 60)
    print("\n".join(lines), file=file or sys.stdout)
