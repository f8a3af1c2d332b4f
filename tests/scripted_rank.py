"""ScriptedRankEngine: a TEST-ONLY stand-in for the LLMEngine behind a RankWorker.

The weights of the test checkpoints are random, so what they write never exercises the chat parsers.
This stand-in answers each request with the next scripted reply (text, tokenized with the V4 test
tokenizer and ended with eos), a few tokens per step, through the real RankWorker, wire protocol, router
and OpenAI service. It honours what the frontend asks of a rank: `max_tokens` ("length"),
`stop_token_ids` ("stop", the stop token included) and aborts. It records every request it got.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tokenizers import Tokenizer

from scheduler.request import RequestOutput
from scheduler.sampling import SamplingParams


@dataclass
class ScriptedRequest:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    reply_ids: list[int]
    sent: int = 0
    aborted: bool = False


class ScriptedRankEngine:
    def __init__(self, tokenizer: Tokenizer, eos_token_id: int, tokens_per_step: int = 3) -> None:
        self.tokenizer, self.eos_token_id, self.tokens_per_step = tokenizer, eos_token_id, tokens_per_step
        self.replies: deque[str] = deque()  # the tests push the next replies here
        self.replies_by_prompt: dict[str, str] = {}  # or: the reply to a prompt containing the key
        self.received: list[ScriptedRequest] = []
        self._live: dict[str, ScriptedRequest] = {}

    def prompt_text(self, i: int = -1) -> str:
        """The i-th received prompt as text, special tokens spelled out."""
        return self.tokenizer.decode(self.received[i].prompt_token_ids, skip_special_tokens=False)

    # ---- the engine interface RankWorker drives ----
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, req_id: str) -> str:
        prompt = self.tokenizer.decode(list(prompt_token_ids), skip_special_tokens=False)
        keyed = [k for k in self.replies_by_prompt if k in prompt]
        if keyed:
            reply = self.replies_by_prompt.pop(keyed[0])
        elif self.replies:
            reply = self.replies.popleft()
        else:
            raise ValueError("the scripted rank has no reply queued for this request")
        ids = self.tokenizer.encode(reply, add_special_tokens=False).ids + [self.eos_token_id]
        req = ScriptedRequest(req_id, list(prompt_token_ids), params, ids)
        self.received.append(req)
        self._live[req_id] = req
        return req_id

    def abort_request(self, req_id: str) -> bool:
        req = self._live.get(req_id)
        if req is not None:
            req.aborted = True
        return req is not None

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def idle(self) -> bool:
        return not self._live

    def stats(self) -> dict:
        return {"running": len(self._live), "waiting": 0}

    def step(self) -> list[RequestOutput]:
        outs = []
        for req in list(self._live.values()):
            if req.aborted:
                outs.append(RequestOutput(req.req_id, [], True, "abort"))
                del self._live[req.req_id]
                continue
            new, reason = [], None
            while len(new) < self.tokens_per_step and reason is None:
                tok = req.reply_ids[req.sent]
                req.sent += 1
                new.append(tok)
                if tok == self.eos_token_id or tok in req.params.stop_token_ids:
                    reason = "stop"
                elif req.sent >= req.params.max_tokens:
                    reason = "length"
            outs.append(RequestOutput(req.req_id, new, reason is not None, reason))
            if reason is not None:
                del self._live[req.req_id]
        return outs
