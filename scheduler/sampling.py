"""SamplingParams: how one request picks its tokens and when it stops. Plain data, validated.

The logits controls (applied in this order by engine/core/sampler.py, before temperature/top-k/top-p):
- `repetition_penalty` (CTRL / HF / vLLM): a token that occurs in the prompt or the output so far has its
  logit divided by the penalty when positive, multiplied by it when negative (1 = off).
- `frequency_penalty`, `presence_penalty` (OpenAI): logit -= frequency_penalty * (times the token occurs in
  the output so far) + presence_penalty * (1 if it occurs at all). Range [-2, 2].
- `logit_bias`: {token_id: bias} added to the logits, bias in [-100, 100].
- `min_tokens`: until this many tokens are out, eos (unless ignore_eos) and `stop_token_ids` cannot be
  sampled (their logits are -inf).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = all tokens
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings: applied by the frontend on text
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # return the sampled token's logprob and this many top alternatives
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # (token_id, bias) pairs sorted by id; a {token_id: bias} mapping is accepted and converted
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs must be a non-negative integer, got {self.logprobs!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {v!r}")
        rp = self.repetition_penalty
        if not isinstance(rp, (int, float)) or not math.isfinite(rp) or rp <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {rp!r}")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        pairs = {}
        for pair in bias:
            tok, b = pair
            if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {tok!r}")
            if not isinstance(b, (int, float)) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {b!r}")
            pairs[tok] = float(b)
        object.__setattr__(self, "logit_bias", tuple(sorted(pairs.items())))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Any of the penalties is on (the sampler needs the request's tokens)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
