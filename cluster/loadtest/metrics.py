"""Aggregate metrics with vLLM's (`vllm bench serve`) definitions and JSON key names.

Over successful requests only (failed ones are counted in `failed` and excluded everywhere else):
- TTFT, E2EL per request; TPOT = (E2EL - TTFT) / (output_tokens - 1) for requests with more than one token;
  ITL over the pooled list of all inter-chunk gaps of all requests.
- `request_throughput = completed / duration`, `output_throughput = sum(output) / duration`,
  `total_token_throughput = (sum(input) + sum(output)) / duration`.
- goodput: a request is good iff every given SLO holds (`ttft`, `tpot`, `e2el` in ms; TPOT of a 1-token output
  counts as 0); `request_goodput = good / duration`.
- mean/median/std (population)/pXX in milliseconds; percentiles interpolate linearly (numpy's default).
- input tokens are the server's `usage.prompt_tokens` when it reports them (as vLLM counts them; chat templates
  add tokens), else the dataset's prompt length.
- `max_output_tokens_per_s` and `max_concurrent_requests` from 1-second buckets of chunk timestamps, counted from
  the first successful request's start.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from cluster.loadtest.client import RequestRecord

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolation percentile (numpy's default method); 0.0 for an empty list."""
    if not values:
        return 0.0
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def percentile_key(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        for tok in item.replace(",", " ").split():
            name, sep, value = tok.partition(":")
            if not sep or name not in SLO_METRICS:
                raise ValueError(f"bad --goodput item {tok!r}: expected ttft:MS, tpot:MS or e2el:MS")
            slos[name] = float(value)
            if slos[name] < 0:
                raise ValueError(f"goodput SLO must be >= 0: {tok!r}")
    return slos


def parse_percentiles(text: str) -> list[float]:
    ps = [float(x) for x in text.replace(" ", "").split(",") if x]
    if any(not 0 < p <= 100 for p in ps):
        raise ValueError(f"percentiles must be in (0, 100]: {text!r}")
    return ps


def request_tpot(r: RequestRecord) -> float | None:
    return (r.e2el - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def input_tokens(r: RequestRecord) -> int:
    """Prompt tokens as the server counted them (`usage.prompt_tokens`, as vLLM takes them), else the dataset's."""
    return r.prompt_tokens_server if r.prompt_tokens_server is not None else r.prompt_len


def _peaks(records: Sequence[RequestRecord]) -> tuple[float, int]:
    """Peak output tokens/s and peak concurrent requests over 1-second buckets counted from the first successful
    request's start (vLLM's method)."""
    ok = [r for r in records if r.success and r.chunk_times]
    if not ok:
        return 0.0, 0
    origin = min(r.start for r in ok)
    n = math.ceil(max(r.start + r.e2el for r in ok) - origin) + 1
    tokens = [0.0] * n
    conc = [0] * n
    for r in ok:
        # spread usage-counted tokens evenly over the chunks, so multi-token chunks weigh right
        per_chunk = r.output_tokens / len(r.chunk_times)
        for t in r.chunk_times:
            b = int(t - origin)
            if 0 <= b < n:
                tokens[b] += per_chunk
        for s in range(int(r.start - origin), min(int(r.start + r.e2el - origin), n - 1) + 1):
            conc[s] += 1
    return max(tokens), max(conc)


def compute_metrics(records: Sequence[RequestRecord], duration: float, percentiles: Sequence[float] = (99,),
                    goodput: dict[str, float] | None = None) -> dict:
    ok = [r for r in records if r.success]
    dur = duration if duration > 0 else float("nan")
    ttfts = [r.ttft for r in ok]
    e2els = [r.e2el for r in ok]
    tpots = [t for r in ok if (t := request_tpot(r)) is not None]
    itls = [g for r in ok for g in r.itl]
    total_in = sum(input_tokens(r) for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    out: dict = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "request_goodput": None,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
    }
    if goodput:
        good = 0
        for r in ok:
            vals = {"ttft": r.ttft, "tpot": request_tpot(r) or 0.0, "e2el": r.e2el}
            good += all(vals[k] * 1000.0 <= slo for k, slo in goodput.items())
        out["request_goodput"] = good / dur
        out["good_requests"] = good
    peak_tok, peak_conc = _peaks(records)
    out["max_output_tokens_per_s"] = peak_tok
    out["max_concurrent_requests"] = peak_conc
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        ms = [v * 1000.0 for v in values]
        out[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        out[f"median_{name}_ms"] = statistics.median(ms) if ms else 0.0
        out[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else 0.0
        for p in percentiles:
            out[f"p{percentile_key(p)}_{name}_ms"] = percentile(ms, p)
    return out
