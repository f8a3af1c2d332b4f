"""Scheduler: decides each step which requests run and how many tokens each computes.

One model of scheduling (vLLM v1): every request has `num_tokens` (prompt + outputs) and
`num_computed_tokens`; a step moves the second towards the first within a token budget. A prefill is
a large gap (computed in chunks when it exceeds the budget), a decode a gap of 1.

Each step: running requests first, in order of admission; when pages run out the LAST-admitted
running request is preempted (pages freed, recomputed later). Then waiting requests, FCFS, with a
prefix-cache lookup; a waiting request never preempts anyone. The engine calls, strictly in turn:

    out = scheduler.schedule()            # -> SchedulerOutput
    res = runner.execute(out)             # -> ModelRunnerOutput
    deltas = scheduler.update_from_output(out, res)
"""

from __future__ import annotations

from collections import deque
from itertools import repeat

from scheduler.config import SchedulerConfig
from scheduler.output import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from scheduler.pages import PageAllocator
from scheduler.prefix_store import PrefixStore
from scheduler.request import Request, RequestOutput, RequestStatus

RUNNING = RequestStatus.RUNNING


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.pages = PageAllocator(config.num_pages, config.page_tokens, config.enable_prefix_caching)
        # ======================= request table =======================
        self.requests: dict[str, Request] = {}  # live (waiting or running) requests
        self.waiting: deque[Request] = deque()  # FCFS; preempted requests go back to the front
        self.running: list[Request] = []  # in order of admission
        # ======================= reported on the next step =======================
        self._finished_ids: set[str] = set()  # -> SchedulerOutput.finished_req_ids
        self._abort_outputs: list[RequestOutput] = []  # -> update_from_output's return
        # NOTE: a request can never hold more than the whole cache, so its length is capped there too
        # (otherwise a lone request that outgrows the cache would preempt itself forever).
        self.max_len = min(config.max_model_len, config.num_pages * config.page_tokens)
        self.num_preemptions = 0
        self.prefix_store: PrefixStore | None = None  # a cache level below memory (the engine's disk tier)

    # ---- requests in and out ----
    def add_request(self, req: Request) -> None:
        """Queue a request (FCFS). Raises ValueError for a request that could never run."""
        n = len(req.prompt_token_ids)
        if req.req_id in self.requests:
            raise ValueError(f"duplicate req_id {req.req_id!r}: a request with this id is still live")
        if n == 0:
            raise ValueError(f"request {req.req_id!r}: empty prompt")
        if n > self.config.max_model_len:
            raise ValueError(
                f"request {req.req_id!r}: prompt of {n} tokens is longer than max_model_len={self.config.max_model_len}"
            )
        pages = -(-req.num_tokens // self.config.page_tokens)
        if pages > self.config.num_pages:
            raise ValueError(
                f"request {req.req_id!r}: prompt of {n} tokens needs {pages} pages of "
                f"{self.config.page_tokens} tokens, the cache has num_pages={self.config.num_pages}"
            )
        sp = req.sampling_params
        eos = () if req.eos_token_id is None or sp.ignore_eos else (req.eos_token_id,)
        req.stop_ids = frozenset((*eos, *sp.stop_token_ids))
        req.max_output_tokens = min(sp.max_tokens, self.max_len - n)
        req.status = RequestStatus.WAITING
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def abort_request(self, req_id: str) -> bool:
        """Drop a waiting or running request and free its pages now. False if no such live request."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return False
        if req.status is RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._free_pages(req)
        req.status = RequestStatus.FINISHED_ABORTED
        req.finish_reason = "abort"
        self._finished_ids.add(req_id)
        self._abort_outputs.append(RequestOutput(req_id, [], True, "abort", None, req.num_cached_tokens))
        return True

    # ---- the step ----
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        p = cfg.page_tokens
        caching = cfg.enable_prefix_caching
        budget = cfg.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        cached = CachedRequestData()
        new_reqs: list[NewRequestData] = []
        preempted: set[str] = set()
        snapshots: dict[int, str] = {}

        # ======================= running requests, in order of admission =======================
        running = self.running
        add_id, add_pages, add_computed = (
            cached.req_ids.append,
            cached.new_page_ids.append,
            cached.num_computed_tokens.append,
        )
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            computed = req.num_computed_tokens
            n = len(req.prompt_token_ids) + len(req.output_token_ids) - computed  # num_tokens, inlined (hot)
            if n > budget:
                n = budget
            end = computed + n
            new_pages: list[int] = []
            if end > len(req.page_ids) * p:
                need = -(-end // p) - len(req.page_ids)
                got = self.pages.allocate(need)
                while got is None:  # preempt from the back until the pages fit
                    victim = running.pop()
                    self._preempt(victim)
                    preempted.add(victim.req_id)
                    if victim is req:
                        break
                    got = self.pages.allocate(need)
                if got is None:
                    break  # req itself was the last one: nothing after it is running
                req.page_ids.extend(got)
                new_pages = got
            num_scheduled[req.req_id] = n
            add_id(req.req_id)
            add_pages(new_pages)
            add_computed(computed)
            if caching and end // p != computed // p:
                for j in range(computed // p, end // p):
                    snapshots[req.page_ids[j]] = req.req_id
            budget -= n
            i += 1

        # ======================= waiting requests, FCFS =======================
        # NOTE: not after a preemption: pages are short, and a request preempted this step must not
        # come back as new in the same step.
        while not preempted and self.waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            req = self.waiting[0]
            tokens = req.all_token_ids if req.output_token_ids else req.prompt_token_ids
            hits: list[int] = []
            load = None
            if caching:  # a hit never covers the last token: at least one is computed
                hits = self.pages.find_prefix(tokens, (len(tokens) - 1) // p)
                if self.prefix_store is not None:
                    hits = self.prefix_store.trim(hits)
                    load = self.prefix_store.lookup(req.req_id, tokens, len(hits), (len(tokens) - 1) // p)
                self.pages.acquire(hits)
            computed = (len(hits) + (load.num_cached_pages if load else 0)) * p
            n = min(len(tokens) - computed, budget)
            got = self.pages.allocate(max(-(-(computed + n) // p), len(hits) + (load.num_loaded_pages if load else 0))
                                      - len(hits))
            if got is None:
                self.pages.free(reversed(hits))
                break
            if caching:
                self.pages.record_query(len(tokens), computed)
            self.waiting.popleft()
            req.status = RUNNING
            req.page_ids = hits + got
            req.page_keys = [self.pages.key_of(page) for page in hits]
            if load is not None:
                self.prefix_store.admit(req.req_id, load, got)
                self._register_pages(req, len(hits), len(hits) + load.num_cached_pages)
            req.num_computed_tokens = req.num_cached_tokens = computed
            running.append(req)
            new_reqs.append(
                NewRequestData(
                    req_id=req.req_id,
                    prompt_token_ids=req.prompt_token_ids,
                    output_token_ids=list(req.output_token_ids),
                    sampling_params=req.sampling_params,
                    page_ids=list(req.page_ids),
                    num_computed_tokens=computed,
                    num_sampled_before=len(req.output_token_ids),
                )
            )
            num_scheduled[req.req_id] = n
            if caching:
                for j in range(computed // p, (computed + n) // p):
                    snapshots[req.page_ids[j]] = req.req_id
            budget -= n

        finished, self._finished_ids = self._finished_ids, set()
        return SchedulerOutput(
            new_reqs=new_reqs,
            cached_reqs=cached,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=cfg.max_num_batched_tokens - budget,
            finished_req_ids=finished,
            preempted_req_ids=preempted,
            pages_to_snapshot=snapshots,
        )

    def update_from_output(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[RequestOutput]:
        """Advance computed tokens, append sampled ones, apply stop rules, register full pages.

        Returns one delta per request that got tokens or finished (aborts since the last call included)."""
        outputs, self._abort_outputs = self._abort_outputs, []
        num_sched = sched_out.num_scheduled_tokens
        ids, rows, lp_rows = runner_out.req_ids, runner_out.sampled_token_ids, runner_out.logprobs
        if not len(ids) == len(rows) == len(num_sched) or (lp_rows is not None and len(lp_rows) != len(ids)):
            raise RuntimeError(f"runner output rows ({len(ids)}, {len(rows)}) != {len(num_sched)} scheduled requests")
        requests = self.requests
        p = self.config.page_tokens
        caching = self.config.enable_prefix_caching
        any_finished = False
        for req_id, sampled, lp in zip(ids, rows, lp_rows if lp_rows is not None else repeat(None)):
            n = num_sched.get(req_id)
            if n is None:
                raise RuntimeError(f"the runner returned {req_id!r}, which was not scheduled")
            req = requests.get(req_id)
            if req is None or req.status is not RUNNING:
                continue  # aborted since schedule()
            before = req.num_computed_tokens
            req.num_computed_tokens = after = before + n
            if caching and after // p != before // p:
                self._register_pages(req, before // p, after // p)
            if not sampled:
                continue  # a prefill chunk short of the end of its tokens
            outs = req.output_token_ids
            taken, finished = 0, False
            for tok in sampled:
                outs.append(tok)
                taken += 1
                if tok in req.stop_ids or len(outs) >= req.max_output_tokens:
                    self._finish_stopped(req, tok)
                    finished = True
                    break
            outputs.append(
                RequestOutput(
                    req_id,
                    sampled[:taken],  # a new list, also when taken == len(sampled)
                    finished,
                    req.finish_reason,
                    None if lp is None else lp[:taken],
                    req.num_cached_tokens,
                )
            )
            if finished:
                any_finished = True
                self._free_pages(req)
                del requests[req_id]
                self._finished_ids.add(req_id)
        if any_finished:
            self.running = [r for r in self.running if r.status is RUNNING]
        return outputs

    # ---- queries ----
    def has_unfinished(self) -> bool:
        """True while a request is live or a finished/aborted one still has to be reported (one more
        step tells the runner to drop its state)."""
        return bool(self.waiting or self.running or self._finished_ids or self._abort_outputs)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def stats(self) -> dict[str, float]:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "preemptions": self.num_preemptions,
            **self.pages.stats(),
        }

    # ---- internals ----
    def _free_pages(self, req: Request) -> None:
        self.pages.free(reversed(req.page_ids))  # tail first: the prefix stays cached longest
        req.page_ids = []
        req.page_keys = []

    def _preempt(self, req: Request) -> None:
        """Preempt by recompute: pages go, outputs stay; back to the front of the queue."""
        self._free_pages(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _register_pages(self, req: Request, first: int, last: int) -> None:
        """Index pages first..last-1 of req, full since this step, in the prefix cache."""
        p = self.config.page_tokens
        keys = req.page_keys
        assert len(keys) == first, f"{req.req_id}: page keys out of step ({len(keys)} != {first})"
        for j in range(first, last):
            parent = keys[j - 1] if j else None
            keys.append(self.pages.register(req.page_ids[j], parent, req.token_slice(j * p, (j + 1) * p)))

    def _finish_stopped(self, req: Request, tok: int) -> None:
        """Set why req stopped after appending tok; the rules apply in order: eos (unless ignore_eos),
        stop_token_ids, max_tokens, max_model_len (the last two folded into max_output_tokens)."""
        sp = req.sampling_params
        if tok == req.eos_token_id and not sp.ignore_eos:
            req.status, req.finish_reason = RequestStatus.FINISHED_STOPPED, "stop"
        elif tok in sp.stop_token_ids:
            req.status, req.finish_reason = RequestStatus.FINISHED_STOPPED, "stop"
            req.stop_token_id = tok
        else:
            req.status, req.finish_reason = RequestStatus.FINISHED_LENGTH, "length"
