"""Send times for `--request-rate` with gamma `--burstiness`, optional linear/exponential ramp-up (vLLM semantics).

Inter-arrival gaps ~ Gamma(shape = burstiness, scale = 1 / (rate * burstiness)): mean 1/rate, coefficient of
variation 1/sqrt(burstiness); burstiness 1 is a Poisson process. Without ramp-up the cumulative send times are
rescaled so the last one is exactly N / rate, as vLLM does. With ramp-up, request i of N uses the rate
start + (end - start) * i/(N-1) (linear) or start * (end/start)^(i/(N-1)) (exponential), without rescaling.
"""

from __future__ import annotations

import math
import random


def ramp_rate(i: int, n: int, strategy: str, start_rps: float, end_rps: float) -> float:
    """The request rate for request i of n under a ramp-up strategy (`linear` or `exponential`)."""
    progress = i / (n - 1) if n > 1 else 1.0
    if strategy == "linear":
        return start_rps + (end_rps - start_rps) * progress
    if strategy == "exponential":
        if start_rps <= 0:
            raise ValueError("exponential ramp-up needs --ramp-up-start-rps > 0")
        return start_rps * (end_rps / start_rps) ** progress
    raise ValueError(f"unknown ramp-up strategy {strategy!r} (linear or exponential)")


def send_times(n: int, request_rate: float = math.inf, burstiness: float = 1.0, seed: int = 0,
               ramp_up: str | None = None, ramp_start_rps: float | None = None,
               ramp_end_rps: float | None = None) -> list[float]:
    """Seconds after the start at which each of n requests is sent (all 0.0 for an infinite rate)."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = random.Random(seed)
    if ramp_up:
        if ramp_start_rps is None or ramp_end_rps is None:
            raise ValueError("ramp-up needs --ramp-up-start-rps and --ramp-up-end-rps")
        t, times = 0.0, []
        for i in range(n):
            rate = ramp_rate(i, n, ramp_up, ramp_start_rps, ramp_end_rps)
            if rate > 0 and math.isfinite(rate):
                t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
            times.append(t)
        return times
    if math.isinf(request_rate):
        return [0.0] * n
    if request_rate <= 0:
        raise ValueError(f"request rate must be > 0, got {request_rate}")
    t, times = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness))
        times.append(t)
    if times and times[-1] > 0:
        factor = (n / request_rate) / times[-1]
        times = [x * factor for x in times]
    return times


def inter_arrivals(times: list[float]) -> list[float]:
    """Gaps between consecutive send times (the first measured from 0)."""
    return [b - a for a, b in zip([0.0] + times[:-1], times)]
