"""Prometheus text-format metrics of the frontend (no client library: counters, histograms, gauges).

Request-level series are recorded by the OpenAI service as requests finish; per-rank gauges are read
from the router's stats at scrape time. Label cardinality is bounded: `rank` (one value per rank),
`finished_reason` (stop/length/abort), `layer` for expert balancedness (at most MAX_BALANCE_LAYERS
layers; V4-Pro has 61), never a request id or a prompt.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

PREFIX = "megaserve:"
MAX_BALANCE_LAYERS = 128
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0)


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels.items())
    return "{" + inner + "}"


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip((*self.buckets, math.inf), self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{_fmt(b)}"}} {acc}')
        out += [f"{name}_sum {_fmt(self.sum)}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_prompt_tokens = 0
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        self.errors: dict[int, int] = {}  # HTTP status -> count
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.requests_in_progress = 0

    def record_request(self, prompt_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens

    def record_choice(self, finish_reason: str | None, num_tokens: int, ttft: float | None, e2e: float) -> None:
        """One generated sequence ended (`ttft` None when it produced no token)."""
        self.generation_tokens += num_tokens
        reason = finish_reason if finish_reason in self.finished else "abort"
        self.finished[reason] += 1
        self.e2e.observe(e2e)
        if ttft is not None:
            self.ttft.observe(ttft)
            if num_tokens > 1:
                self.tpot.observe((e2e - ttft) / (num_tokens - 1))

    def record_error(self, status: int) -> None:
        self.errors[status] = self.errors.get(status, 0) + 1

    def render(self, rank_stats: list[dict[str, Any]]) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, Any], float]]) -> None:
            lines.append(f"# HELP {PREFIX}{name} {help_}")
            lines.append(f"# TYPE {PREFIX}{name} {kind}")
            lines.extend(f"{PREFIX}{name}{_labels(lab)} {_fmt(v)}" for lab, v in samples)

        def hist(name: str, help_: str, h: Histogram) -> None:
            lines.append(f"# HELP {PREFIX}{name} {help_}")
            lines.append(f"# TYPE {PREFIX}{name} histogram")
            lines.extend(h.lines(PREFIX + name))

        metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [({}, self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Generated tokens.", [({}, self.generation_tokens)])
        metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from a rank's prefix cache.",
               [({}, self.cached_prompt_tokens)])
        metric("request_success_total", "counter", "Finished sequences by finish reason.",
               [({"finished_reason": k}, v) for k, v in sorted(self.finished.items())])
        metric("request_errors_total", "counter", "Requests answered with an error, by HTTP status.",
               [({"status": k}, v) for k, v in sorted(self.errors.items())])
        metric("requests_in_progress", "gauge", "HTTP generation requests being served.",
               [({}, self.requests_in_progress)])
        hist("time_to_first_token_seconds", "Time to first token.", self.ttft)
        hist("time_per_output_token_seconds", "Time per output token after the first.", self.tpot)
        hist("e2e_request_latency_seconds", "End-to-end sequence latency.", self.e2e)

        up, running, waiting, kv, outstanding, prefix_rate = [], [], [], [], [], []
        for s in rank_stats:
            lab = {"rank": s["rank"]}
            up.append((lab, 1 if s.get("connected") else 0))
            outstanding.append((lab, s.get("outstanding_tokens", 0)))
            eng = s.get("engine") or {}
            if "running" in eng:
                running.append((lab, eng["running"]))
            if "waiting" in eng or "held_requests" in eng:
                waiting.append((lab, eng.get("waiting", 0) + eng.get("held_requests", 0)))
            used, free = eng.get("pages_used"), eng.get("pages_free")
            if isinstance(used, (int, float)) and isinstance(free, (int, float)) and used + free > 0:
                kv.append((lab, used / (used + free)))
            if isinstance(eng.get("prefix_hit_rate"), (int, float)):
                prefix_rate.append((lab, eng["prefix_hit_rate"]))
        metric("rank_up", "gauge", "1 while the frontend is connected to the rank.", up)
        metric("num_requests_running", "gauge", "Requests in the rank's running batch.", running)
        metric("num_requests_waiting", "gauge", "Requests queued on the rank.", waiting)
        metric("kv_cache_usage_perc", "gauge", "Fraction of the rank's KV cache pages in use (1 = full).", kv)
        metric("outstanding_tokens", "gauge", "Router's outstanding tokens (prompt left + tokens to generate).",
               outstanding)
        metric("prefix_cache_hit_rate", "gauge", "Rank's prefix cache hit rate (tokens).", prefix_rate)
        balance = expert_balancedness(rank_stats)
        if balance:
            metric("expert_balancedness", "gauge",
                   "Expert-parallel load balancedness per MoE layer: mean/max tokens per rank (1 = perfect).",
                   [({"layer": layer}, b) for layer, b in balance])
            metric("expert_balancedness_min", "gauge", "Lowest per-layer balancedness.",
                   [({}, min(b for _, b in balance))])
        return "\n".join(lines) + "\n"


def expert_balancedness(rank_stats: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """[(layer, balancedness)] from the first rank that reports it (the EP group shares one view), capped."""
    for s in rank_stats:
        eng = s.get("engine") or {}
        rows = eng.get("expert_balance")  # engine/core/ep/engine.py: per layer {layer, ..., balancedness}
        if isinstance(rows, list) and rows:
            out = []
            for i, row in enumerate(rows[:MAX_BALANCE_LAYERS]):
                if isinstance(row, dict) and isinstance(row.get("balancedness"), (int, float)):
                    out.append((int(row.get("layer", i)), float(row["balancedness"])))
            if out:
                return out
    return []
