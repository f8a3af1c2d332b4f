"""The logits-control fields of a completions / chat request -> SamplingParams keyword arguments.

min_tokens (vLLM extension), presence_penalty and frequency_penalty (OpenAI, [-2, 2]), repetition_penalty
(vLLM extension, > 0) and logit_bias (OpenAI: {"token id": bias in [-100, 100]}). Definitions in
scheduler/sampling.py. Wrong values are APIError 400 naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from cluster.server.errors import bad_request
from scheduler.sampling import MAX_LOGIT_BIAS, MAX_PENALTY

MAX_LOGIT_BIAS_ENTRIES = 1024


def _number(body: dict, key: str, default: float, lo: float, hi: float, open_lo: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise bad_request(f"{key} must be a finite number, got {v!r}", key)
    if v < lo or v > hi or (open_lo and v == lo):
        raise bad_request(f"{key} must be in {'(' if open_lo else '['}{lo}, {hi}], got {v}", key)
    return float(v)


def sampling_controls(body: dict, vocab_size: int) -> dict[str, Any]:
    """SamplingParams kwargs for the logits controls present in `body`."""
    out: dict[str, Any] = {}
    min_tokens = body.get("min_tokens")
    if min_tokens is not None:
        if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
            raise bad_request(f"min_tokens must be a non-negative integer, got {min_tokens!r}", "min_tokens")
        out["min_tokens"] = min_tokens
    out["presence_penalty"] = _number(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY)
    out["frequency_penalty"] = _number(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY)
    out["repetition_penalty"] = _number(body, "repetition_penalty", 1.0, 0.0, math.inf, open_lo=True)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad_request("logit_bias must be an object mapping token ids to biases", "logit_bias")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise bad_request(f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries", "logit_bias")
        pairs = {}
        for k, v in bias.items():
            try:
                tok = int(k)
            except (TypeError, ValueError):
                raise bad_request(f"logit_bias keys must be token ids, got {k!r}", "logit_bias") from None
            if not 0 <= tok < vocab_size:
                raise bad_request(f"logit_bias token id {tok} is outside [0, {vocab_size})", "logit_bias")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
                raise bad_request(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}],"
                                  f" got {v!r}", "logit_bias")
            pairs[tok] = float(v)
        out["logit_bias"] = pairs
    return out
