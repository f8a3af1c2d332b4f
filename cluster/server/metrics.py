"""Prometheus metrics of the frontend (prometheus_client): request counters and histograms, per-rank gauges.

Request-level series are recorded by the OpenAI service as requests finish; per-rank gauges are read from the
router's stats at scrape time (`render(rank_stats)`, a collector over those stats). Label cardinality is
bounded: `rank` (one value per rank), `finished_reason` (stop/length/abort), `status` (HTTP status), `layer`
for expert balancedness (at most MAX_BALANCE_LAYERS layers; V4-Pro has 61), never a request id or a prompt.
Each `Metrics` has its own registry. No `_created` series are exported (prometheus_client.disable_created_metrics,
process-wide), so the series are exactly the ones below.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "megaserve:"
MAX_BALANCE_LAYERS = 128
FINISH_REASONS = ("abort", "length", "stop")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0)

disable_created_metrics()


class _RankGauges(Collector):
    """Gauges computed from the router's per-rank stats at scrape time (`stats` is set just before a scrape)."""

    def __init__(self) -> None:
        self.stats: list[dict[str, Any]] = []

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, help_: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, help_, labels=list(labels))

        up = gauge("rank_up", "1 while the frontend is connected to the rank.", ("rank",))
        running = gauge("num_requests_running", "Requests in the rank's running batch.", ("rank",))
        waiting = gauge("num_requests_waiting", "Requests queued on the rank.", ("rank",))
        kv = gauge("kv_cache_usage_perc", "Fraction of the rank's KV cache pages in use (1 = full).", ("rank",))
        outstanding = gauge("outstanding_tokens", "Router's outstanding tokens (prompt left + tokens to generate).",
                            ("rank",))
        prefix_rate = gauge("prefix_cache_hit_rate", "Rank's prefix cache hit rate (tokens).", ("rank",))
        for s in self.stats:
            rank = [str(s["rank"])]
            up.add_metric(rank, 1 if s.get("connected") else 0)
            outstanding.add_metric(rank, s.get("outstanding_tokens", 0))
            eng = s.get("engine") or {}
            if "running" in eng:
                running.add_metric(rank, eng["running"])
            if "waiting" in eng or "held_requests" in eng:
                waiting.add_metric(rank, eng.get("waiting", 0) + eng.get("held_requests", 0))
            used, free = eng.get("pages_used"), eng.get("pages_free")
            if isinstance(used, (int, float)) and isinstance(free, (int, float)) and used + free > 0:
                kv.add_metric(rank, used / (used + free))
            if isinstance(eng.get("prefix_hit_rate"), (int, float)):
                prefix_rate.add_metric(rank, eng["prefix_hit_rate"])
        yield from (up, running, waiting, kv, outstanding, prefix_rate)
        balance = expert_balancedness(self.stats)
        if balance:
            per_layer = gauge("expert_balancedness", "Expert-parallel load balancedness per MoE layer: mean/max "
                              "tokens per rank (1 = perfect).", ("layer",))
            for layer, b in balance:
                per_layer.add_metric([str(layer)], b)
            lowest = gauge("expert_balancedness_min", "Lowest per-layer balancedness.")
            lowest.add_metric([], min(b for _, b in balance))
            yield from (per_layer, lowest)


class Metrics:
    """The frontend's metrics; `render(rank_stats)` is the /metrics body (Prometheus text format)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self._generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", registry=r)
        self._cached_prompt_tokens = Counter(PREFIX + "prefix_cache_hit_tokens",
                                             "Prompt tokens served from a rank's prefix cache.", registry=r)
        self._success = Counter(PREFIX + "request_success", "Finished sequences by finish reason.",
                                ["finished_reason"], registry=r)
        for reason in FINISH_REASONS:
            self._success.labels(finished_reason=reason)  # every reason's series exists from the start, at 0
        self._errors = Counter(PREFIX + "request_errors", "Requests answered with an error, by HTTP status.",
                               ["status"], registry=r)
        self._in_progress = Gauge(PREFIX + "requests_in_progress", "HTTP generation requests being served.",
                                  registry=r)
        self._ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS,
                               registry=r)
        self._tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time per output token after the first.",
                               buckets=TPOT_BUCKETS, registry=r)
        self._e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end sequence latency.",
                              buckets=E2E_BUCKETS, registry=r)
        self._ranks = _RankGauges()
        r.register(self._ranks)

    def record_request(self, prompt_tokens: int) -> None:
        """A generation request was admitted: its prompt tokens, and it is in progress until `end_request`."""
        self._prompt_tokens.inc(prompt_tokens)
        self._in_progress.inc()

    def end_request(self) -> None:
        self._in_progress.dec()

    def record_choice(self, finish_reason: str | None, num_tokens: int, ttft: float | None, e2e: float,
                      cached_prompt_tokens: int = 0) -> None:
        """One generated sequence ended (`ttft` None when it produced no token)."""
        self._generation_tokens.inc(num_tokens)
        self._cached_prompt_tokens.inc(cached_prompt_tokens)
        reason = finish_reason if finish_reason in FINISH_REASONS else "abort"
        self._success.labels(finished_reason=reason).inc()
        self._e2e.observe(e2e)
        if ttft is not None:
            self._ttft.observe(ttft)
            if num_tokens > 1:
                self._tpot.observe((e2e - ttft) / (num_tokens - 1))

    def record_error(self, status: int) -> None:
        self._errors.labels(status=str(status)).inc()

    @property
    def finished(self) -> dict[str, int]:
        """Finished sequences so far, by finish reason."""
        return {reason: int(self.registry.get_sample_value(PREFIX + "request_success_total",
                                                           {"finished_reason": reason}))
                for reason in FINISH_REASONS}

    def render(self, rank_stats: list[dict[str, Any]]) -> str:
        """The Prometheus text exposition of every series, the per-rank gauges from `rank_stats`."""
        self._ranks.stats = rank_stats
        try:
            return generate_latest(self.registry).decode()
        finally:
            self._ranks.stats = []


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
