"""`megaserve bench sweep`: `bench serve` at each of several request rates; the highest rate meeting the SLOs.

At each rate (ascending) the same workload (dataset, seed, every other `bench serve` option) runs with
`--request-rate` set to that rate. A point *meets the SLOs* iff its SLO attainment

    slo_attainment = good_requests / (completed + failed)

is at least `--slo-attainment` (default 0.9), where a request is good iff it succeeded and every `--goodput` SLO
holds for it (vLLM's goodput rule). Failed requests count against attainment; for a point with no failures
attainment equals `request_goodput / request_throughput`. The reported rate is the highest swept rate that
meets the SLOs with every lower swept rate meeting them too, so one lucky point above a failing one does not
count; the sweep stops at the first failing rate unless `keep_going`. One JSON holds every point's metrics
(vLLM keys, per-request lists dropped) plus the sweep's settings.
"""

from __future__ import annotations

import json
import math
import sys
from argparse import Namespace
from pathlib import Path

from cluster.loadtest.metrics import parse_goodput
from cluster.loadtest.runner import DEFAULTS, run_benchmark

PER_REQUEST_KEYS = ("input_lens", "output_lens", "ttfts", "latencies", "itls", "errors", "args")


def parse_rates(text: str) -> list[float]:
    """`"1,2,4,8"` -> [1.0, 2.0, 4.0, 8.0] (ascending; `inf` allowed; each > 0, no repeats)."""
    rates = []
    for tok in text.replace(" ", "").split(","):
        if not tok:
            continue
        try:
            r = float(tok)
        except ValueError:
            raise ValueError(f"bad rate {tok!r} in --rates {text!r}: expected numbers like 1,2,4,8") from None
        if not r > 0 or math.isnan(r):
            raise ValueError(f"bad rate {tok!r} in --rates {text!r}: every rate must be > 0")
        rates.append(r)
    if not rates:
        raise ValueError(f"--rates {text!r} names no rate")
    if len(set(rates)) != len(rates):
        raise ValueError(f"--rates {text!r} repeats a rate")
    return sorted(rates)


def slo_attainment(result: dict) -> float:
    """Fraction of all sent requests that succeeded within every SLO (0.0 when nothing was sent)."""
    sent = result["completed"] + result["failed"]
    return result.get("good_requests", 0) / sent if sent else 0.0


def best_rate(points: list[dict]) -> float | None:
    """The highest rate whose point, and every lower rate's point, meets the SLOs; None if the lowest fails."""
    best = None
    for p in sorted(points, key=lambda p: p["rate"]):
        if not p["meets_slos"]:
            break
        best = p["rate"]
    return best


def _point(rate: float, result: dict, min_attainment: float) -> dict:
    point = {"rate": rate, "slo_attainment": slo_attainment(result)}
    point["meets_slos"] = point["slo_attainment"] >= min_attainment
    point.update({k: v for k, v in result.items() if k not in PER_REQUEST_KEYS})
    point["first_errors"] = sorted({e for e in result["errors"] if e})[:5]
    return point


def _rate_text(rate: float | None) -> str:
    return "none" if rate is None else ("inf" if math.isinf(rate) else f"{rate:g}")


def _ms(point: dict, key: str) -> str:
    return f"{point[key]:.1f}" if key in point else "-"  # p99 only when --percentiles includes 99


def print_sweep(sweep: dict, file=None) -> None:
    file = file or sys.stdout
    slos = " ".join(f"{k}<={v:g}ms" for k, v in sweep["goodput_slos_ms"].items())
    lines = ["{s:{c}^{n}}".format(s=" Request-rate sweep ", n=96, c="="),
             f"SLOs: {slos}; a rate meets them when >= {sweep['slo_attainment']:.0%} of its requests do",
             f"{'rate':>8} {'completed':>9} {'failed':>6} {'req/s':>8} {'goodput':>8} {'attain':>7} "
             f"{'p99 TTFT ms':>12} {'p99 TPOT ms':>12} {'out tok/s':>10}  meets"]
    for p in sweep["points"]:
        lines.append(f"{_rate_text(p['rate']):>8} {p['completed']:>9} {p['failed']:>6} {p['request_throughput']:>8.2f} "
                     f"{p['request_goodput']:>8.2f} {p['slo_attainment']:>7.1%} {_ms(p, 'p99_ttft_ms'):>12} "
                     f"{_ms(p, 'p99_tpot_ms'):>12} {p['output_throughput']:>10.1f}  "
                     f"{'yes' if p['meets_slos'] else 'NO'}")
    skipped = [r for r in sweep["rates"] if r not in {p["rate"] for p in sweep["points"]}]
    if skipped:
        lines.append(f"not run (a lower rate already missed the SLOs): {', '.join(map(_rate_text, skipped))}")
    lines.append(f"highest rate meeting the SLOs: {_rate_text(sweep['best_rate'])} req/s")
    lines.append("=" * 96)
    print("\n".join(lines), file=file)


def run_sweep(args: Namespace | dict) -> dict:
    """Run `bench serve` at each rate of `args.rates`; returns (and writes to `args.out`) the sweep JSON."""
    a = {**DEFAULTS, "slo_attainment": 0.9, "keep_going": False,
         **(vars(args) if isinstance(args, Namespace) else args)}
    rates = parse_rates(a["rates"]) if isinstance(a["rates"], str) else sorted(float(r) for r in a["rates"])
    slos = parse_goodput(a["goodput"] if not isinstance(a["goodput"], str) else [a["goodput"]])
    if not slos:
        raise ValueError("bench sweep needs --goodput SLOs (e.g. ttft:500 tpot:50) to judge each rate")
    if not 0 < a["slo_attainment"] <= 1:
        raise ValueError(f"--slo-attainment must be in (0, 1], got {a['slo_attainment']}")
    if a.get("dataset") == "trace":
        raise ValueError("bench sweep sets the request rate itself; a trace replays its own timestamps")
    if a.get("ramp_up"):
        raise ValueError("bench sweep sets a fixed rate per point; --ramp-up does not apply")
    out = a.pop("out", None)
    points: list[dict] = []
    for rate in rates:
        print(f"[sweep] request rate {_rate_text(rate)} req/s", file=sys.stderr)
        result = run_benchmark({**a, "request_rate": rate, "out": None})
        points.append(_point(rate, result, a["slo_attainment"]))
        if not points[-1]["meets_slos"] and not a["keep_going"]:
            break
    sweep = {
        "benchmark": "sweep",
        "base_url": a["base_url"],
        "model_id": a["model"],
        "rates": rates,
        "goodput_slos_ms": slos,
        "slo_attainment": a["slo_attainment"],
        "meets_slos_rule": "good_requests / (completed + failed) >= slo_attainment; best_rate: the highest rate "
                           "meeting it with every lower swept rate meeting it too",
        "keep_going": a["keep_going"],
        "best_rate": best_rate(points),
        "points": points,
        "args": {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in sorted(a.items())
                 if k != "func"},
    }
    print_sweep(sweep)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(sweep), indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return sweep


def _json_safe(x):
    """Infinite rates as the string "inf" (JSON has no Infinity)."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x
