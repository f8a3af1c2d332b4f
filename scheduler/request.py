"""A request as the scheduler sees it, and the per-step delta the engine hands back to callers.

A request's tokens are prompt + outputs; `num_computed_tokens` counts those already in the cache.
Scheduling only ever moves `num_computed_tokens` towards `num_tokens` (vLLM-v1 style): a prefill is
the case where the gap is large, a decode the case where it is 1.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Literal

from scheduler.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]
# Per sampled token: (logprob of the sampled token, {token_id: logprob} of the top alternatives).
TokenLogprobs = list[tuple[float, dict[int, float]]]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its pages were taken; recomputed on return
    FINISHED_STOPPED = "finished_stopped"  # eos or a stop token
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED})


@dataclass(eq=False)
class Request:
    """One generation request; the scheduler owns it and is the only writer of its state."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    eos_token_id: int | None = None

    # ---- state: set by the scheduler ----
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    output_token_ids: list[int] = field(default_factory=list, init=False)
    num_computed_tokens: int = field(default=0, init=False)  # tokens in the cache
    page_ids: list[int] = field(default_factory=list, init=False)  # in token order
    # Prefix-cache keys of this request's leading full pages; len == num_computed_tokens // page_tokens
    # while prefix caching is on (page i's key chains from page i-1's).
    page_keys: list[int] = field(default_factory=list, init=False)
    num_cached_tokens: int = field(default=0, init=False)  # prefix hit at the latest admission
    num_preemptions: int = field(default=0, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    stop_token_id: int | None = field(default=None, init=False)  # the stop_token_ids entry that ended it
    # Stop rules precomputed at add_request (the per-token check is hot): tokens that may end the request
    # (eos unless ignore_eos, plus stop_token_ids), and the most outputs it may have (max_tokens, and what
    # max_model_len leaves after the prompt).
    stop_ids: frozenset[int] = field(default=frozenset(), init=False)
    max_output_tokens: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by outputs (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished


@dataclass
class RequestOutput:
    """What one step produced for one request: the tokens appended since the last delta."""

    req_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    new_logprobs: TokenLogprobs | None = None  # one entry per new token, when the request asked
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the latest admission
