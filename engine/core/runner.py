"""The model runner: executes one `SchedulerOutput` as a single packed batch and samples.

Prefill chunks and decode tokens of many requests run in one forward, back to back, with no
padding. The runner keeps, per request, its tokens, its sequence state (window, compressor state,
paged entries) and its sampling generator; the scheduler owns everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.cache.disk import DiskTier
from engine.cache.kv_cache import PagedKVCache
from engine.core.graph_runner import DecodeGraphRunner
from engine.core.sampler import Sampler
from engine.model.model import SequenceState, Transformer
from scheduler.output import ModelRunnerOutput, SchedulerOutput
from scheduler.sampling import SamplingParams


@dataclass
class RunnerRequest:
    req_id: str
    tokens: list[int]  # prompt + generated, as far as the runner knows
    params: SamplingParams
    page_ids: list[int]  # the page table; PagedEntries of every layer read this same list
    state: SequenceState
    num_sampled: int  # tokens sampled so far (the seeded generator's step index)
    num_prompt_tokens: int  # tokens[:num_prompt_tokens] is the prompt, the rest the output so far
    slot: int | None = None  # its decode slot once it decodes (its window/compressor state lives there)


class ModelRunner:
    """`decode`: the static decode step (decode slots, buckets, CUDA graphs); None runs every step through the
    eager per-sequence paths (the reference)."""

    def __init__(self, model: Transformer, cache: PagedKVCache, sampler: Sampler,
                 decode: DecodeGraphRunner | None = None) -> None:
        self.model, self.cache, self.sampler = model, cache, sampler
        self.device = model.embed.weight.device
        self.reqs: dict[str, RunnerRequest] = {}
        self.disk: DiskTier | None = None  # the prefix cache's disk tier (engine.cache.disk), when configured
        self.decode = decode
        self.last_sampled: list[str] = []  # the requests of the last sampler call's logits rows, in order

    def _generator(self, r: RunnerRequest) -> torch.Generator | None:
        """Seeded requests draw token i from a generator seeded by (seed, i): reproducible across
        batch composition and preemption."""
        if r.params.seed is None or r.params.greedy:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed((r.params.seed * 1_000_003 + r.num_sampled) % (2**63))
        return g

    def _apply_diffs(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids | so.preempted_req_ids:
            r = self.reqs.pop(rid, None)
            if r is not None and r.slot is not None:
                self.decode.slots.release(r.slot)
        if self.disk is not None:
            self.disk.forget(so)
        for nr in so.new_reqs:
            page_ids = list(nr.page_ids)
            state = (self.disk.new_sequence(self.model, nr.req_id, page_ids, nr.num_computed_tokens) if self.disk
                     else self.cache.new_sequence(self.model, page_ids, nr.num_computed_tokens))
            self.reqs[nr.req_id] = RunnerRequest(nr.req_id, list(nr.prompt_token_ids) + list(nr.output_token_ids),
                                                 nr.sampling_params, page_ids, state, nr.num_sampled_before,
                                                 len(nr.prompt_token_ids))
        cr = so.cached_reqs
        for rid, new_pages, n_computed in zip(cr.req_ids, cr.new_page_ids, cr.num_computed_tokens, strict=True):
            r = self.reqs[rid]
            r.page_ids.extend(new_pages)  # in place: the layers' PagedEntries share this list
            assert r.state.num_tokens == n_computed, f"{rid}: runner at {r.state.num_tokens}, scheduler {n_computed}"

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._apply_diffs(so)
        req_ids = list(so.num_scheduled_tokens)
        if not req_ids:
            return ModelRunnerOutput([], [])
        all_reqs = [self.reqs[rid] for rid in req_ids]
        all_lens = [so.num_scheduled_tokens[rid] for rid in req_ids]
        dec = [r for r, n in zip(all_reqs, all_lens) if self._decodes(r, n)]  # decode slots, first rows
        reqs = [r for r, n in zip(all_reqs, all_lens) if not self._decodes(r, n)]
        lens = [so.num_scheduled_tokens[r.req_id] for r in reqs]
        ids, sample_rows, to_sample, row = [], list(range(len(dec))), list(dec), len(dec)
        for r, n in zip(reqs, lens):
            start = r.state.num_tokens
            ids.extend(r.tokens[start:start + n])
            row += n
            if start + n == len(r.tokens):  # reached the end of what it knows: sample its next token
                sample_rows.append(row - 1)
                to_sample.append(r)
        snaps = self._plan_snapshots(so)
        logits = self._forward(dec, reqs, lens, ids, sample_rows)

        sampled: dict[str, int] = {}
        logprobs: dict[str, tuple[float, dict[int, float]] | None] = {}
        self.last_sampled = [r.req_id for r in to_sample]
        if to_sample:
            history = any(r.params.min_tokens or r.params.penalized for r in to_sample)
            outputs = [r.tokens[r.num_prompt_tokens:] for r in to_sample] if history else None
            prompts = [r.tokens[:r.num_prompt_tokens] if r.params.repetition_penalty != 1 else []
                       for r in to_sample] if history else None
            out = self.sampler(logits, [r.params for r in to_sample],
                               [self._generator(r) for r in to_sample], outputs, prompts)
            for r, tok, lp in zip(to_sample, out.token_ids, out.logprobs, strict=True):
                r.tokens.append(tok)
                r.num_sampled += 1
                sampled[r.req_id], logprobs[r.req_id] = tok, lp
        for page_id, (r, b) in snaps.items():
            if r.slot is not None:  # its state lives in its decode slot
                for layer, ls in zip(r.state.layers, self.decode.slots.layers, strict=False):
                    layer.snapshots[b] = ls.snapshot(r.slot, b)
                    layer.snapshot_at = []
            self.cache.store_snapshot(page_id, r.state, b)
        if self.disk is not None:
            self.disk.after_step(snaps)
        any_lp = any(r.params.logprobs is not None for r in all_reqs)
        return ModelRunnerOutput(
            req_ids=req_ids,
            sampled_token_ids=[[sampled[rid]] if rid in sampled else [] for rid in req_ids],
            logprobs=[[logprobs[rid]] if logprobs.get(rid) is not None else None for rid in req_ids]
            if any_lp else None,
        )

    def _plan_snapshots(self, so: SchedulerOutput) -> dict[int, tuple[RunnerRequest, int]]:
        """page id -> (request, boundary position): tell each layer where to capture its state."""
        plan = {}
        for page_id, rid in so.pages_to_snapshot.items():
            r = self.reqs[rid]
            b = (r.page_ids.index(page_id) + 1) * self.cache.page_tokens
            plan[page_id] = (r, b)
            for layer in r.state.layers[: self.model.cfg.num_hidden_layers]:
                layer.snapshot_at.append(b)
        return plan

    def _decodes(self, r: RunnerRequest, n: int) -> bool:
        """Whether this request's token runs in the decode step: one token that ends what it knows (every later
        step of it is one token too, so its state can live in a decode slot for good). Not under the EP `tbo`
        backend (its micro-batches split sequences; eager path only)."""
        if self.decode is None:
            return False
        tbo = self.model.dispatcher is not None and self.model.dispatcher.backend == "tbo"
        if r.slot is not None and tbo:
            raise RuntimeError(f"{r.req_id} decodes from a decode slot, but the tbo backend (which splits sequences "
                               "across micro-batches) runs only the eager path: switch backends between requests")
        return not tbo and n == 1 and r.state.num_tokens + 1 == len(r.tokens)

    def _forward(self, dec: list[RunnerRequest], reqs: list[RunnerRequest], lens: list[int], ids: list[int],
                 sample_rows: list[int]) -> torch.Tensor:
        """Run the step; the logits of `sample_rows` [n, V]. Decode-slot requests (`dec`) come first: alone they
        run the static decode step (`DecodeGraphRunner.run`); with other sequences the same decode path runs
        eagerly inside the packed forward (prefill and mixed steps stay eager)."""
        if not dec:
            h = self.model(torch.tensor(ids, dtype=torch.long), [r.state for r in reqs], lens)
            return self.model.compute_logits(h[torch.tensor(sample_rows, dtype=torch.long, device=h.device)])
        g = self.decode
        n_main = self.model.cfg.num_hidden_layers
        for r in dec:
            if r.slot is None:
                r.slot = g.slots.acquire(r.state.layers[:n_main])
        pt = self.cache.page_tokens
        meta = ([r.tokens[-1] for r in dec], [r.state.num_tokens for r in dec], [r.slot for r in dec],
                [r.page_ids[:r.state.num_tokens // pt + 1] for r in dec])
        if not reqs:
            logits = g.run(*meta)
        else:
            h = self.model(torch.tensor(ids, dtype=torch.long), [r.state for r in reqs], lens,
                           decode=g.eager_batch(*meta))
            logits = self.model.compute_logits(h[torch.tensor(sample_rows, dtype=torch.long, device=h.device)])
        cfg = self.model.cfg
        for r in dec:  # the host-side counters of the slot-resident states
            for i, layer in enumerate(r.state.layers[:n_main]):
                layer.num_tokens += 1
                if layer.comp is not None:
                    layer.comp.store.n = layer.num_tokens // cfg.compress_ratio(i)
                if layer.index is not None:
                    layer.index.store.n = layer.num_tokens // 4
        return logits
