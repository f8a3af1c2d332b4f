"""Disaggregated prefill/decode from the step model: per-GPU throughput counting the prefill GPUs too.

Two questions, both answered from a prefill rate (input tokens/s per prefill GPU, `perf.prefill`) and the decode
step time as a function of the batch per decode GPU (`perf.decode`):

- `ideal_split`: the best tokens/s per GPU at a given decode batch, with as many prefill GPUs per decode GPU as the
  workload needs, (isl / prefill_rate) / (osl / decode_rate) of them. This is the model's Pareto point at the
  interactivity 1 / TPOT of that batch.
- `fixed_layout`: a published recipe (P prefill GPUs, D decode GPUs, closed-loop concurrency C): requests flow at
  the smaller of the prefill capacity P * prefill_rate / isl and what the decode pool finishes with all C
  requests decoding; when prefill is the limit, only the requests it feeds are decoding (the rest queue for
  prefill), so the decode batch is X * osl * TPOT(b) / D, solved by fixed-point iteration.

Throughput is (input + output) tokens per second over ALL GPUs (prefill and decode), which is how InferenceX
reports `tput_per_gpu` for disaggregated runs (SemiAnalysisAI/InferenceX `utils/process_result.py`, multinode:
total_token_throughput / (prefill_gpus + decode_gpus)); output-only figures are given too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DisaggPoint:
    prefill_gpus: float
    decode_gpus: float
    requests_per_s: float
    batch_per_decode_gpu: float  # sequences decoding per decode GPU
    tpot_s: float
    prefill_bound: bool
    isl: int
    osl: int

    @property
    def tok_s_per_gpu(self) -> float:
        """(input + output) tokens/s per GPU over prefill and decode GPUs."""
        return self.requests_per_s * (self.isl + self.osl) / (self.prefill_gpus + self.decode_gpus)

    @property
    def output_tok_s_per_gpu(self) -> float:
        return self.requests_per_s * self.osl / (self.prefill_gpus + self.decode_gpus)

    @property
    def tok_s_per_user(self) -> float:
        return 1.0 / self.tpot_s


def _check(isl: int, osl: int, prefill_rate: float) -> None:
    if isl < 1 or osl < 1:
        raise ValueError(f"isl and osl must be positive, got {isl}, {osl}")
    if not prefill_rate > 0:
        raise ValueError(f"prefill rate must be positive, got {prefill_rate}")


def ideal_split(isl: int, osl: int, prefill_rate: float, batch: float, tpot_s: float) -> DisaggPoint:
    """Per decode GPU: `batch` sequences at `tpot_s` per step; the prefill GPUs the workload needs for them."""
    _check(isl, osl, prefill_rate)
    if batch <= 0 or tpot_s <= 0:
        raise ValueError(f"batch and tpot must be positive, got {batch}, {tpot_s}")
    req_s = batch / (osl * tpot_s)  # requests finished per second by one decode GPU
    prefill_gpus = req_s * isl / prefill_rate
    return DisaggPoint(prefill_gpus, 1.0, req_s, batch, tpot_s, False, isl, osl)


def fixed_layout(isl: int, osl: int, prefill_rate: float, tpot_at: Callable[[float], float], prefill_gpus: int,
                 decode_gpus: int, concurrency: int, iterations: int = 30) -> DisaggPoint:
    """Steady state of a closed loop of `concurrency` requests on P prefill and D decode GPUs (see module doc).
    `tpot_at(b)` is the decode step time at b sequences per decode GPU (non-decreasing in b)."""
    _check(isl, osl, prefill_rate)
    if prefill_gpus < 1 or decode_gpus < 1 or concurrency < 1:
        raise ValueError(f"prefill_gpus, decode_gpus and concurrency must be positive, got {prefill_gpus}, "
                         f"{decode_gpus}, {concurrency}")
    cap = prefill_gpus * prefill_rate / isl  # requests/s the prefill pool can feed
    prefill_time = isl / prefill_rate  # one request's prefill at one GPU's rate (small next to osl x TPOT)
    b_all = concurrency / decode_gpus
    t_all = tpot_at(b_all)
    x_dec = concurrency / (prefill_time + osl * t_all)
    if x_dec <= cap:
        return DisaggPoint(prefill_gpus, decode_gpus, x_dec, b_all, t_all, False, isl, osl)
    b = b_all
    for _ in range(iterations):  # decode batch fed by the prefill pool: b = cap * osl * TPOT(b) / D
        b = min(b_all, cap * osl * tpot_at(b) / decode_gpus)
    return DisaggPoint(prefill_gpus, decode_gpus, cap, b, tpot_at(b), True, isl, osl)
