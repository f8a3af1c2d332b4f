"""The offline API: `LLM(model_dir).generate(prompts, sampling_params)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.core.engine import EngineConfig, LLMEngine
from engine.weights.tokenizer import load_tokenizer
from scheduler.sampling import SamplingParams


@dataclass
class CompletionOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # per generated token: (logprob of the token, {top token id: logprob}), when logprobs were asked
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache


class LLM:
    """Load a checkpoint directory and generate for batches of prompts with continuous batching."""

    def __init__(self, model_dir: str | Path, **engine_args) -> None:
        self.engine = LLMEngine(model_dir, EngineConfig(**engine_args))
        self.tokenizer = load_tokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").exists() else None

    def _encode(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer.json next to the checkpoint")
            bos = self.engine.model_config.bos_token_id
            return prompt, [bos] + self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return None, [int(t) for t in prompt]

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionOutput]:
        """One CompletionOutput per prompt, in order. A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        outs: dict[str, CompletionOutput] = {}
        order = []
        for prompt, p in zip(prompts, params):
            p = p or SamplingParams()
            text, ids = self._encode(prompt)
            rid = self.engine.add_request(ids, p)
            outs[rid] = CompletionOutput(rid, text, ids, logprobs=[] if p.logprobs is not None else None)
            order.append((rid, p))
        stops = {rid: p.stop for rid, p in order if p.stop}
        while self.engine.has_unfinished():
            for ro in self.engine.step():
                out = outs[ro.req_id]
                out.token_ids.extend(ro.new_token_ids)
                if out.logprobs is not None and ro.new_logprobs:
                    out.logprobs.extend(ro.new_logprobs)
                out.num_cached_tokens = max(out.num_cached_tokens, ro.num_cached_tokens)
                if ro.finished and out.finish_reason is None:
                    out.finish_reason = ro.finish_reason
                if ro.req_id in stops and not ro.finished and self._hit_stop(out, stops[ro.req_id]):
                    self.engine.abort_request(ro.req_id)
        for out in outs.values():
            if out.text is None:  # (a stop string already set the cut text)
                out.text = self._decode(out)
        return [outs[rid] for rid, _ in order]

    def _decode(self, out: CompletionOutput) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(out.token_ids)

    def _hit_stop(self, out: CompletionOutput, stops: tuple[str, ...]) -> bool:
        """Stop strings: cut the text before the first stop string and end the request there."""
        text = self._decode(out)
        if text is None:
            return False
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if not hits:
            return False
        out.text, out.finish_reason = text[:min(hits)], "stop"
        return True
