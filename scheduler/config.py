"""SchedulerConfig: the knobs of one rank's scheduler. Frozen, validated, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class SchedulerConfig:
    num_pages: int  # pages in the rank's KV cache (from the engine's memory plan)
    max_num_seqs: int = 256  # running requests at most
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    page_tokens: int = 256  # tokens per page
    enable_prefix_caching: bool = True
    max_model_len: int = 65536  # prompt + output tokens of one request

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "enable_prefix_caching":
                if not isinstance(value, bool):
                    raise ValueError(f"SchedulerConfig.{f.name} must be a bool, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{f.name} must be a positive integer, got {value!r}")

    @property
    def max_pages_per_request(self) -> int:
        """Pages one request can ever need (its tokens are capped at max_model_len)."""
        return -(-self.max_model_len // self.page_tokens)
