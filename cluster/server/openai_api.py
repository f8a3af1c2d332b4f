"""OpenAIService: the OpenAI completions and chat completions APIs over the router.

Validation happens up front (`prepare_*`, raising APIError with a 4xx status) so a stream never starts for
a request that cannot run. Each prompt x `n` choice is one rank request; their deltas are merged, turned
into text (cluster/server/text.py: incremental detokenization, stop strings) and shaped as OpenAI JSON.
The non-streaming methods `completions(body)` and `chat_completions(body)` are what batch jobs call.

Supported request fields: model, prompt (string, list of strings, token ids, list of token-id lists) /
messages, max_tokens (chat: max_completion_tokens too), temperature, top_p, top_k, n, stop, seed, logprobs
(completions: int; chat: bool + top_logprobs), stream, stream_options.include_usage, and the vLLM
extensions ignore_eos, stop_token_ids and priority (lower runs first; batch jobs use 1); the logits controls
min_tokens, presence_penalty, frequency_penalty, repetition_penalty and logit_bias (sampling_fields.py).
echo, suffix and best_of != n are refused; fields this server does not know (user, metadata, ...) are ignored.

Chat uses DeepSeek-V4's encoding with thinking on or off, tools and tool_choice (cluster/server/chat/):
messages carry `reasoning_content` and `tool_calls`, deltas carry one of `reasoning_content`, `content` or
`tool_calls`, and the finish reason is "tool_calls" when the model called a tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from cluster.router import RankError, Router
from cluster.server.chat.request import ChatFormat, build_chat_prompt
from cluster.server.chat.response import ChatChoice
from cluster.server.errors import APIError, bad_request
from cluster.server.limits import check_fanout
from cluster.server.metrics import Metrics
from cluster.server.sampling_fields import sampling_controls
from cluster.server.text import TextStream
from comm import wire
from scheduler.sampling import SamplingParams

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_CHOICES_PER_REQUEST = 256  # prompts x n of one request (cluster/server/limits.py)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, name: str, max_model_len: int | None = None) -> ModelInfo:
        """Name, context length (default: max_position_embeddings), vocabulary and bos/eos of a checkpoint."""
        from engine.model.config import ModelConfig

        cfg = ModelConfig.from_json(model_dir)
        return cls(name=name, max_model_len=max_model_len or cfg.max_position_embeddings, vocab_size=cfg.vocab_size,
                   bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)


@dataclass
class Job:
    """One validated API request."""

    chat: bool
    id: str
    created: int
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    priority: int
    arrival: float = field(default_factory=time.monotonic)
    chat_format: ChatFormat | None = None  # chat: how the output is read and steered

    @property
    def logprobs(self) -> int | None:
        """Top alternatives per token (None: no logprobs)."""
        return self.params.logprobs


@dataclass
class _Event:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[wire.TokenLogprob] | None
    finish_reason: str | None = None
    num_cached_tokens: int = 0


@dataclass
class _Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[wire.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


# ======================= field validation =======================
def _int(body: dict, key: str, default: Any, lo: int | None = None, hi: int | None = None) -> Any:
    v = body.get(key, default)
    if v is None or v is default:  # an explicit null means the default, as in OpenAI's API
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad_request(f"{key} must be an integer, got {v!r}", key)
    if lo is not None and v < lo:
        raise bad_request(f"{key} must be >= {lo}, got {v}", key)
    if hi is not None and v > hi:
        raise bad_request(f"{key} must be <= {hi}, got {v}", key)
    return v


def _num(body: dict, key: str, default: float, check: Callable[[float], bool], rule: str) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise bad_request(f"{key} must be a finite number, got {v!r}", key)
    if not check(float(v)):
        raise bad_request(f"{key} must be {rule}, got {v}", key)
    return float(v)


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"{key} must be a boolean, got {v!r}", key)
    return v


class OpenAIService:
    def __init__(self, router: Router, tokenizer: Tokenizer, model: ModelInfo, metrics: Metrics | None = None,
                 default_max_tokens: int | None = None) -> None:
        self.router = router
        self.tokenizer = tokenizer
        self.model = model
        self.metrics = metrics or Metrics()
        self.default_max_tokens = default_max_tokens  # chat without max_tokens: min(this, context left)
        self.max_choices_per_request = MAX_CHOICES_PER_REQUEST  # prompts x n (the app sets its settings' cap)
        self._token_text: dict[int, str] = {}

    @classmethod
    def from_router(cls, router: Router, model_dir: str | Path, settings: Any, max_model_len: int | None = None,
                    default_max_tokens: int | None = None) -> OpenAIService:
        """A service for the checkpoint in `model_dir` (its config.json and tokenizer.json) over `router`;
        the model id is `settings.model_name` or the directory's name."""
        from engine.weights.tokenizer import load_tokenizer

        name = getattr(settings, "model_name", None) or Path(model_dir).resolve().name
        info = ModelInfo.from_checkpoint(model_dir, name, max_model_len)
        return cls(router, load_tokenizer(model_dir), info, default_max_tokens=default_max_tokens)

    # ======================= public API =======================
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model.name, "object": "model", "created": 0,
                                            "owned_by": "megaserve", "max_model_len": self.model.max_model_len}]}

    async def completions(self, body: Any) -> dict:
        job = self.prepare(body, chat=False)
        return await self.run(job)

    async def chat_completions(self, body: Any) -> dict:
        job = self.prepare(body, chat=True)
        return await self.run(job)

    def prepare(self, body: Any, chat: bool) -> Job:
        """Validate a request body (APIError 4xx naming the field when it is wrong)."""
        if not isinstance(body, dict):
            raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("you must provide a model parameter (a string)", "model")
        if model != self.model.name:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {self.model.name!r}",
                           "invalid_request_error", "model", "model_not_found")
        if body.get("echo"):
            raise bad_request("echo is not supported", "echo")
        if body.get("suffix") is not None:
            raise bad_request("suffix is not supported", "suffix")
        n = _int(body, "n", 1, 1, MAX_N)
        best_of = _int(body, "best_of", None, 1)
        if best_of is not None and best_of != n:
            raise bad_request("best_of different from n is not supported", "best_of")
        if chat:
            prompt, chat_format = build_chat_prompt(body, self.tokenizer)
            prompts = [prompt]
            max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            logprobs_on = _bool(body, "logprobs", False)
            top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
            if top is not None and not logprobs_on:
                raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
            logprobs = (top or 0) if logprobs_on else None
        else:
            prompts, chat_format = self._completion_prompts(body.get("prompt")), None
            max_key = "max_tokens"
            logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        check_fanout(len(prompts), n, self.max_choices_per_request, "n" if n > 1 else "prompt")
        max_tokens = _int(body, max_key, None)
        if max_tokens is not None and max_tokens <= 0:
            raise bad_request(f"{max_key} must be a positive integer, got {max_tokens}", max_key)
        longest = max(len(p) for p in prompts)
        limit = self.model.max_model_len
        if longest >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your prompt has "
                              f"{longest} tokens, which leaves no room for any output.", "messages" if chat else
                              "prompt", "context_length_exceeded")
        if max_tokens is None:
            left = limit - longest
            cap = 16 if not chat else self.default_max_tokens
            max_tokens = left if cap is None else min(cap, left)
        elif longest + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                              f"completion). Please reduce the prompt or max_tokens.", max_key,
                              "context_length_exceeded")
        temperature = _num(body, "temperature", 1.0, lambda v: v >= 0, ">= 0")
        top_p = _num(body, "top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
        top_k = _int(body, "top_k", -1, -1)
        seed = _int(body, "seed", None, -(2**63), 2**63 - n)  # choice j samples with seed + j
        stop = self._stop(body.get("stop"))
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
            raise bad_request("stop_token_ids must be a list of integers", "stop_token_ids")
        stream = _bool(body, "stream", False)
        opts = body.get("stream_options")
        if opts is not None and (not isinstance(opts, dict) or not stream):
            raise bad_request("stream_options must be an object and needs stream set to true", "stream_options")
        include_usage = _bool(opts or {}, "include_usage", False)
        try:
            params = SamplingParams(temperature=temperature, top_p=top_p, top_k=-1 if top_k == 0 else top_k,
                                    max_tokens=max_tokens, stop_token_ids=tuple(stop_ids), stop=stop, seed=seed,
                                    ignore_eos=_bool(body, "ignore_eos", False), logprobs=logprobs,
                                    **sampling_controls(body, self.model.vocab_size))
        except ValueError as e:
            raise bad_request(str(e)) from None
        prefix = "chatcmpl-" if chat else "cmpl-"
        return Job(chat, prefix + uuid.uuid4().hex[:24], int(time.time()), prompts, params, n, stream,
                   include_usage, _int(body, "priority", 0), chat_format=chat_format)

    async def run(self, job: Job) -> dict:
        """A non-streaming response for a prepared job."""
        choices = [_Choice(i) for i in range(len(job.prompts) * job.n)]
        cached = [0] * len(job.prompts)
        async with contextlib.aclosing(self._events(job)) as events:  # closed even if abandoned
            async for ev in events:
                c = choices[ev.index]
                c.text += ev.text
                c.token_ids += ev.token_ids
                if ev.logprobs:
                    c.logprobs += ev.logprobs
                if ev.finish_reason is not None:
                    c.finish_reason = ev.finish_reason
                    cached[ev.index // job.n] = max(cached[ev.index // job.n], ev.num_cached_tokens)
        out_choices = []
        for c in choices:
            lp = self._logprobs_json(job, c.token_ids, c.logprobs, 0) if job.logprobs is not None else None
            if job.chat:
                assert job.chat_format is not None
                shaped = ChatChoice(job.chat_format)
                shaped.feed(c.text, final=True)
                out_choices.append({"index": c.index, "message": shaped.message(), "logprobs": lp,
                                    "finish_reason": shaped.finish_reason(c.finish_reason)})
            else:
                out_choices.append({"index": c.index, "text": c.text, "logprobs": lp,
                                    "finish_reason": c.finish_reason})
        completion = sum(len(c.token_ids) for c in choices)
        return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion",
                "created": job.created, "model": self.model.name, "choices": out_choices,
                "usage": self._usage(job, completion, sum(cached))}

    async def stream(self, job: Job) -> AsyncIterator[dict]:
        """The chunks of a streaming response (the HTTP layer adds SSE framing and `[DONE]`)."""
        obj = "chat.completion.chunk" if job.chat else "text_completion"
        head = {"id": job.id, "object": obj, "created": job.created, "model": self.model.name}
        started: set[int] = set()
        shapers: dict[int, ChatChoice] = {}
        offsets: dict[int, int] = {}
        completion = 0
        cached = [0] * len(job.prompts)
        async with contextlib.aclosing(self._events(job)) as events:  # closed even if abandoned
            async for ev in events:
                completion += len(ev.token_ids)
                if ev.finish_reason is not None:
                    cached[ev.index // job.n] = max(cached[ev.index // job.n], ev.num_cached_tokens)
                if not ev.text and not ev.token_ids and ev.finish_reason is None:
                    continue
                if not ev.text and ev.finish_reason is None and job.logprobs is None:
                    continue  # tokens whose text is held back (incomplete character or a possible stop string)
                lp = None
                if job.logprobs is not None:
                    start = offsets.get(ev.index, 0)
                    lp = self._logprobs_json(job, ev.token_ids, ev.logprobs or [], start)
                    if not job.chat:  # text_offset exists only in completions logprobs
                        offsets[ev.index] = start + sum(len(self._token_str(t)) for t in ev.token_ids)
                if job.chat:
                    for choice in self._chat_chunks(job, ev, lp, started, shapers):
                        yield {**head, "choices": [choice]}
                    continue
                else:
                    choice = {"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
                yield {**head, "choices": [choice]}
        if job.include_usage:
            yield {**head, "choices": [], "usage": self._usage(job, completion, sum(cached))}

    # ======================= running =======================
    async def _events(self, job: Job) -> AsyncIterator[_Event]:
        """Events of all choices of a job, merged in arrival order; aborts every request if abandoned."""
        self.metrics.record_request(sum(len(p) for p in job.prompts))
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int, prompt: list[int], j: int) -> None:
            try:
                async for ev in self._choice(job, index, prompt, j):
                    queue.put_nowait(ev)
                queue.put_nowait(done)
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(p * job.n + j, prompt, j))
                 for p, prompt in enumerate(job.prompts) for j in range(job.n)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            self.metrics.end_request()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _choice(self, job: Job, index: int, prompt: list[int], j: int) -> AsyncIterator[_Event]:
        """One choice's events. A chat choice with a forced tool-calls prefix (tool_choice required or named)
        gets it written into its output: at once (non-thinking), or after the reasoning, as a second rank
        request that continues prompt + reasoning + prefix (the first stops at `</think>`)."""
        params = job.params
        if params.seed is not None and j:
            params = dataclasses.replace(params, seed=params.seed + j)  # n choices: different seeded draws
        fmt = job.chat_format
        prefix = list(fmt.forced_prefix_ids) if fmt is not None else []
        think_end = fmt.think_end_id if fmt is not None and prefix else None
        leg_params = params
        if prefix and think_end is None:
            prompt = prompt + prefix
            yield _Event(index, fmt.forced_prefix, [], None)
        elif think_end is not None:
            leg_params = dataclasses.replace(params, stop_token_ids=(*params.stop_token_ids, think_end))
        ttft = None
        n_tokens = cached_tokens = 0
        reason = None
        req_id = f"{job.id}-{index}"
        try:
            while True:
                try:
                    stream = self.router.submit(prompt, leg_params, req_id, job.priority)
                except RankError as e:
                    raise APIError(503, f"no rank can take the request: {e}", "server_error") from None
                except ValueError as e:  # WireError: the request does not fit in a frame
                    raise bad_request(f"the request cannot be sent to a rank: {e}") from None
                text = TextStream(self.tokenizer, job.params.stop)
                produced: list[int] = []
                try:
                    async for out in stream:
                        cached_tokens = max(cached_tokens, out.num_cached_tokens)
                        if ttft is None and out.new_token_ids:
                            ttft = time.monotonic() - job.arrival
                        toks = out.new_token_ids
                        lps = out.logprobs
                        delta = text.push(toks)
                        if text.stopped:
                            keep = len(toks) - (len(text.token_ids) - text.num_tokens_at_stop)
                            toks, lps = toks[:keep], (lps[:keep] if lps is not None else None)
                            n_tokens += len(toks)
                            reason = "stop"
                            await stream.aclose()  # abort on the rank: the stop string ends the request here
                            yield _Event(index, delta, toks, lps, "stop", out.num_cached_tokens)
                            return
                        n_tokens += len(toks)
                        produced += toks
                        if out.finished:
                            reason = out.finish_reason
                            if (think_end is not None and reason == "stop" and produced[-1:] == [think_end]
                                    and think_end not in params.stop_token_ids):
                                break  # reasoning done: the tool-calls block opens after it
                            yield _Event(index, delta + text.finish(), toks, lps, reason, out.num_cached_tokens)
                            return
                        if delta or toks:
                            yield _Event(index, delta, toks, lps)
                    else:
                        return  # the stream ended without a finished output
                finally:
                    await stream.aclose()
                left = params.max_tokens - n_tokens
                if left <= 0:  # the reasoning used the whole budget
                    reason = "length"
                    yield _Event(index, delta + text.finish(), toks, lps, reason, cached_tokens)
                    return
                reason = None  # the choice goes on
                yield _Event(index, delta + text.finish() + fmt.forced_prefix, toks, lps)
                prompt = prompt + produced + prefix
                leg_params = dataclasses.replace(params, max_tokens=left,
                                                 min_tokens=min(left, max(0, params.min_tokens - n_tokens)))
                think_end, req_id = None, req_id + "-tools"
        except RankError as e:
            if e.refused:
                raise bad_request(f"the rank refused the request: {e}") from None
            raise APIError(503, f"the request was lost: {e}", "server_error") from None
        finally:
            self.metrics.record_choice(reason or "abort", n_tokens, ttft, time.monotonic() - job.arrival,
                                       cached_tokens)

    @staticmethod
    def _chat_chunks(job: Job, ev: _Event, lp: dict | None, started: set[int],
                     shapers: dict[int, ChatChoice]) -> list[dict]:
        """The chat chunks of one event: one per settled piece (a delta never mixes reasoning, content and
        tool calls), the first of a choice with the role, the last of a finished choice with the reason."""
        assert job.chat_format is not None
        shaper = shapers.setdefault(ev.index, ChatChoice(job.chat_format))
        deltas: list[dict[str, Any]] = [shaper.delta(p) for p in shaper.feed(ev.text, ev.finish_reason is not None)]
        if ev.index not in started:
            started.add(ev.index)
            deltas = [{"role": "assistant", **(deltas[0] if deltas else {"content": ""})}, *deltas[1:]]
        if not deltas and ((lp is not None and ev.token_ids) or ev.finish_reason is not None):
            deltas = [{}]
        chunks = [{"index": ev.index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        if chunks:
            chunks[0]["logprobs"] = lp
            chunks[-1]["finish_reason"] = shaper.finish_reason(ev.finish_reason)
        return chunks

    # ======================= helpers =======================
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        bos = self.model.bos_token_id
        if isinstance(prompt, str):
            return [[bos] + self._encode(prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return [self._check_ids(prompt, "prompt")]
            if all(isinstance(p, str) for p in prompt):
                return [[bos] + self._encode(p) for p in prompt]
            if all(isinstance(p, list) and p for p in prompt):
                return [self._check_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        raise bad_request("prompt must be a string, a list of strings, a non-empty list of token ids, or a list "
                          "of such lists", "prompt")

    def _check_ids(self, ids: list, where: str) -> list[int]:
        vocab = self.model.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad_request(f"{where} must contain only integer token ids", "prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"{where} has token ids outside [0, {vocab}): {bad[:5]}", "prompt")
        return list(ids)

    def _stop(self, stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad_request("stop must be a non-empty string or a list of non-empty strings", "stop")
        if len(stop) > MAX_STOP:
            raise bad_request(f"stop may hold at most {MAX_STOP} strings, got {len(stop)}", "stop")
        return tuple(stop)

    def _token_str(self, token_id: int) -> str:
        s = self._token_text.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = s
        return s

    def _logprobs_json(self, job: Job, token_ids: list[int], lps: list[wire.TokenLogprob], offset: int) -> dict:
        if job.chat:
            content = []
            for t, lp in zip(token_ids, lps):
                s = self._token_str(t)
                content.append({"token": s, "logprob": lp.logprob, "bytes": list(s.encode()),
                                "top_logprobs": [{"token": self._token_str(i), "logprob": v,
                                                  "bytes": list(self._token_str(i).encode())}
                                                 for i, v in zip(lp.top_ids[:job.logprobs], lp.top_logprobs)]})
            return {"content": content}
        tokens, token_lps, tops, offsets = [], [], [], []
        for t, lp in zip(token_ids, lps):
            s = self._token_str(t)
            tokens.append(s)
            token_lps.append(lp.logprob)
            tops.append({self._token_str(i): v for i, v in zip(lp.top_ids[:job.logprobs], lp.top_logprobs)})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _usage(self, job: Job, completion: int, cached: int) -> dict:
        prompt = sum(len(p) for p in job.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}
