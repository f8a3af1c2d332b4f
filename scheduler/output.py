"""The one contract between the scheduler and the model runner: what crosses each step, nothing else.

New requests travel in full, running ones as diffs; requests that left (finished, aborted or
preempted) are named so the runner drops their per-sequence state. Plain data: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.sampling import SamplingParams


@dataclass
class NewRequestData:
    """A request entering the runner (first time, or again after preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    # Tokens generated before a preemption: recomputed together with the prompt (empty otherwise).
    output_token_ids: list[int]
    sampling_params: SamplingParams
    page_ids: list[int]  # pages for compressed KV entries, in token order (one page = page_tokens tokens)
    # Tokens already in the cache from a prefix hit (a multiple of page_tokens); the runner restores the
    # window/compressor state stored with page_ids[num_computed_tokens // page_tokens - 1].
    num_computed_tokens: int
    # Sequences started by the same request seed: how many tokens were sampled before (keeps seeded
    # sampling reproducible across preemption).
    num_sampled_before: int = 0


@dataclass
class CachedRequestData:
    """Running requests, as diffs: only what changed since the last step."""

    req_ids: list[str] = field(default_factory=list)
    new_page_ids: list[list[int]] = field(default_factory=list)  # pages appended this step
    num_computed_tokens: list[int] = field(default_factory=list)  # tokens in the cache before this step


@dataclass
class SchedulerOutput:
    new_reqs: list[NewRequestData]
    cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to run this step (prefill chunk or 1)
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # finished or aborted since the last step: drop their state
    preempted_req_ids: set[str]  # preempted this step: drop their state (they come back as new)
    # page_id -> req_id: pages that become full during this step; the runner stores the window and
    # compressor state at the end of each such page with it (prefix caching), keyed by page id.
    pages_to_snapshot: dict[int, str] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]  # every request scheduled this step, in the order of the packed batch
    # One list per request: the token sampled this step, or [] for a prefill chunk that did not reach
    # the end of its prompt.
    sampled_token_ids: list[list[int]]
    # When a request asked for logprobs: per sampled token, (logprob of the sampled token,
    # {token_id: logprob} of the top `logprobs` tokens). None for requests that did not ask.
    logprobs: list[list[tuple[float, dict[int, float]]] | None] | None = None
