"""Router: the frontend's view of all ranks. Picks a rank per request and streams its deltas back.

Placement: the rank with the fewest outstanding tokens (prompt tokens not yet served plus tokens still to
generate, over its in-flight requests), except that a prompt whose first `affinity_tokens` tokens were
seen before goes back to the rank that served them, while that rank is not overloaded (its load at most
`2 * least + affinity_slack_tokens`). Prefix caching keys whole pages, so affinity uses the first page.

Each request's stream yields `comm.wire.Output` deltas; the last one has `finished=True`. Closing a stream
before it finishes aborts the request on its rank (the HTTP layer does this when a client disconnects).

Recovery: with `hold_on_loss=True` a lost rank's requests stay in flight (paused) until `reset_ranks`
connects to the restarted ranks and resubmits each as prompt + tokens already produced, with the
remaining max_tokens: greedy outputs come out unchanged. With `hold_on_loss=False` (no supervisor to
restart ranks) their streams fail with RankError at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.rank_client import RankClient, RankConnectionError
from comm import auth, wire
from scheduler.sampling import SamplingParams

log = logging.getLogger(__name__)

AFFINITY_ENTRIES = 65536


class RankError(RuntimeError):
    """A rank refused a request (`refused=True`: bad input it found) or was lost while serving it."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass
class _Inflight:
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int
    rank: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    produced: list[int] = field(default_factory=list)
    prompt_pending: int = 0  # prompt tokens not yet served (until the first output)

    @property
    def outstanding(self) -> int:
        return self.prompt_pending + max(0, self.params.max_tokens - len(self.produced))


class RequestStream:
    """Async iterator over one request's deltas; `aclose()` before the end aborts the request."""

    def __init__(self, router: Router, req: _Inflight) -> None:
        self._router = router
        self._req = req
        self.req_id = req.req_id
        self.rank = req.rank
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> wire.Output:
        if self._done:
            raise StopAsyncIteration
        item = await self._req.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._router.abort(self.req_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class Router:
    def __init__(self, addresses: Sequence[tuple[str, int]], affinity_tokens: int = 256,
                 affinity_slack_tokens: int = 4096, hold_on_loss: bool = False,
                 connect_timeout_s: float = 30.0, *, secret: bytes) -> None:
        """`secret`: the launch secret the ranks were given (every connection proves it, comm/auth.py)."""
        if not addresses:
            raise ValueError("Router needs at least one rank address")
        if affinity_tokens < 1:
            raise ValueError(f"affinity_tokens must be >= 1, got {affinity_tokens}")
        self.addresses = [tuple(a) for a in addresses]
        self.affinity_tokens = affinity_tokens
        self.affinity_slack_tokens = affinity_slack_tokens
        self.hold_on_loss = hold_on_loss
        self.connect_timeout_s = connect_timeout_s
        self._secret = auth.check_secret(secret)
        self.clients: list[RankClient] = []
        self._inflight: dict[str, _Inflight] = {}
        self._affinity: OrderedDict[int, int] = OrderedDict()
        self._ids = itertools.count()
        self.generation = 0  # bumped by every reset_ranks

    # ---------------- lifecycle ----------------
    async def start(self) -> Router:
        self.clients = await self._connect(self.addresses)
        return self

    async def _connect(self, addresses: Sequence[tuple[str, int]]) -> list[RankClient]:
        clients = [RankClient(r, a, self._on_output, self._on_error, self._on_lost, secret=self._secret)
                   for r, a in enumerate(addresses)]
        try:
            await asyncio.gather(*(c.connect(self.connect_timeout_s) for c in clients))
        except BaseException:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            raise
        return clients

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        for req in list(self._inflight.values()):
            self._end(req, RankError("the router was closed"))

    # ---------------- requests ----------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, req_id: str | None = None,
               priority: int = 0) -> RequestStream:
        """Send a request to a rank; iterate the returned stream for its deltas."""
        rid = req_id if req_id is not None else f"rt-{next(self._ids)}"
        if rid in self._inflight:
            raise ValueError(f"duplicate req_id {rid!r}: a request with this id is in flight")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt")
        rank = self._pick(prompt)
        req = _Inflight(rid, prompt, params, int(priority), rank, prompt_pending=len(prompt))
        self._inflight[rid] = req
        try:
            self.clients[rank].send(self._add_message(req))
        except RankConnectionError as e:
            if not self.hold_on_loss:
                del self._inflight[rid]
                raise RankError(str(e)) from e
        except BaseException:  # e.g. WireError: a prompt too large for one frame
            del self._inflight[rid]
            raise
        return RequestStream(self, req)

    def abort(self, req_id: str) -> bool:
        """Abort an in-flight request (its stream ends with finish_reason 'abort'). False if unknown."""
        req = self._inflight.get(req_id)
        if req is None:
            return False
        try:
            self.clients[req.rank].send(wire.Abort(req_id))
        except RankConnectionError:
            self._end(req, wire.Output(req_id, [], True, "abort"))
        return True

    def _add_message(self, req: _Inflight) -> wire.AddRequest:
        p = req.params
        return wire.AddRequest(
            req.req_id, req.prompt_ids + req.produced, max_tokens=p.max_tokens - len(req.produced),
            temperature=float(p.temperature), top_p=float(p.top_p), top_k=p.top_k, seed=p.seed,
            ignore_eos=p.ignore_eos, logprobs=p.logprobs, stop_token_ids=list(p.stop_token_ids),
            priority=req.priority, min_tokens=max(0, p.min_tokens - len(req.produced)),
            presence_penalty=float(p.presence_penalty), frequency_penalty=float(p.frequency_penalty),
            repetition_penalty=float(p.repetition_penalty), logit_bias_ids=[t for t, _ in p.logit_bias],
            logit_bias_values=[b for _, b in p.logit_bias])

    # ---------------- placement ----------------
    def loads(self) -> list[int]:
        """Outstanding tokens per rank."""
        load = [0] * len(self.clients)
        for req in self._inflight.values():
            if req.rank < len(load):
                load[req.rank] += req.outstanding
        return load

    def _pick(self, prompt: list[int]) -> int:
        up = [c.rank for c in self.clients if c.connected]
        if not up:
            if self.hold_on_loss and self.clients:
                up = [c.rank for c in self.clients]  # requests wait for reset_ranks
            else:
                raise RankError("no rank is reachable")
        load = self.loads()
        best = min(up, key=lambda r: (load[r], r))
        if len(prompt) < self.affinity_tokens:
            return best
        key = hash(tuple(prompt[: self.affinity_tokens]))
        rank = self._affinity.get(key)
        if rank is not None and rank in up and load[rank] <= 2 * load[best] + self.affinity_slack_tokens:
            self._affinity.move_to_end(key)
            return rank
        self._affinity[key] = best
        self._affinity.move_to_end(key)
        if len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)
        return best

    # ---------------- from the rank clients ----------------
    def _on_output(self, out: wire.Output) -> None:
        req = self._inflight.get(out.req_id)
        if req is None:  # finished, failed or aborted already
            return
        req.prompt_pending = 0
        req.produced.extend(out.new_token_ids)
        if out.finished:
            self._end(req, out)
        else:
            req.queue.put_nowait(out)

    def _on_error(self, err: wire.Error) -> None:
        if err.req_id is None:
            log.warning("rank error: %s", err.message)
            return
        req = self._inflight.get(err.req_id)
        if req is not None:
            self._end(req, RankError(err.message, refused=True))

    def _on_lost(self, rank: int, reason: str) -> None:
        if self.hold_on_loss:
            return  # paused until reset_ranks
        for req in [r for r in self._inflight.values() if r.rank == rank]:
            self._end(req, RankError(f"rank {rank} was lost ({reason})"))

    def _end(self, req: _Inflight, last: wire.Output | BaseException) -> None:
        """Retire a request: its stream ends with `last` (a finished Output, or the error it raises)."""
        self._inflight.pop(req.req_id, None)
        req.queue.put_nowait(last)

    # ---------------- recovery and stats ----------------
    async def reset_ranks(self, addresses: Sequence[tuple[str, int]]) -> None:
        """Connect to a restarted rank group and resubmit every in-flight request from where it got to."""
        old = self.clients
        self.clients = []
        await asyncio.gather(*(c.close() for c in old), return_exceptions=True)
        self.addresses = [tuple(a) for a in addresses]
        self.clients = await self._connect(self.addresses)
        self.generation += 1
        self._affinity.clear()
        pending = sorted(self._inflight.values(), key=lambda r: r.priority)
        for req in pending:
            req.prompt_pending = len(req.prompt_ids) + len(req.produced)
        for req in pending:
            if len(req.produced) >= req.params.max_tokens:
                self._end(req, wire.Output(req.req_id, [], True, "length"))
                continue
            req.rank = self._pick(req.prompt_ids + req.produced)
            self.clients[req.rank].send(self._add_message(req))
        log.info("router: %d ranks reset, %d requests resubmitted", len(self.clients), len(pending))

    async def stats(self, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """Per rank: connection state, router-side load, and the rank's own engine stats (when reachable)."""
        load = self.loads()
        counts = [0] * len(self.clients)
        for req in self._inflight.values():
            if req.rank < len(counts):
                counts[req.rank] += 1

        async def one(c: RankClient) -> dict[str, Any]:
            row: dict[str, Any] = {"rank": c.rank, "address": f"{c.address[0]}:{c.address[1]}",
                                   "connected": c.connected, "outstanding_tokens": load[c.rank],
                                   "inflight": counts[c.rank]}
            if c.connected:
                try:
                    row["engine"] = await c.stats(timeout_s)
                except (RankConnectionError, asyncio.TimeoutError) as e:
                    row["error"] = str(e) or type(e).__name__
            return row

        return list(await asyncio.gather(*(one(c) for c in self.clients)))
