"""The per-rank engine: the step loop `schedule -> execute -> update` over a loaded model."""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.cache.accounting import KV_CACHE_DTYPES, plan_cache
from engine.cache.decode_slots import DecodeSlots
from engine.cache.disk import DiskCacheConfig, DiskTier
from engine.cache.kv_cache import PagedKVCache
from engine.core.graph_runner import DecodeGraphRunner
from engine.core.runner import ModelRunner
from engine.core.sampler import Sampler
from engine.model.config import MODEL_DTYPES
from engine.model.model import Transformer
from engine.model.weight_format import check_mode
from engine.weights.loader import load_model
from scheduler.config import SchedulerConfig
from scheduler.request import Request, RequestOutput
from scheduler.sampling import SamplingParams
from scheduler.scheduler import Scheduler

_DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "float32"
    device: str = "cpu"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024  # the token budget of one step
    page_tokens: int = 256  # tokens per cache page (a multiple of every compress ratio)
    cache_budget_bytes: int = 512 * 2**20  # sizes the page pool (engine.cache.accounting.plan_cache)
    num_pages: int | None = None  # overrides the budget (tests: force preemption)
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    seed: int = 0  # for requests without their own seed
    disk_cache: DiskCacheConfig | None = None  # a disk tier under the prefix cache (engine.cache.disk)
    # The KV cache's dtype, a topology `kv_cache.dtype` name (engine.cache.accounting.KV_CACHE_DTYPES): None (the
    # model dtype), "bfloat16"/"float32" (entries cast to it), or "fp8" (the fp8_ds_mla layout, engine.cache.fp8).
    kv_cache_dtype: str | None = None
    weights: str = "native"  # "native": checkpoint precision in memory; "dequantized": every weight in `dtype`
    # The decode step: False runs decode tokens in decode slots at padded batch buckets with static buffers
    # (engine.core.graph_runner); True runs every step through the eager per-sequence paths (the reference).
    enforce_eager: bool = False
    cuda_graphs: bool = True  # capture each decode bucket as a CUDA graph (device="cuda"; False: run it eagerly)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for key in ("max_num_seqs", "max_num_batched_tokens", "page_tokens", "cache_budget_bytes"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)!r}")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {self.num_pages!r}")
        if self.disk_cache is not None and not isinstance(self.disk_cache, DiskCacheConfig):
            raise ValueError(f"disk_cache must be a DiskCacheConfig or None, got {self.disk_cache!r}")
        if self.disk_cache is not None and not self.enable_prefix_caching:
            raise ValueError("disk_cache needs enable_prefix_caching: the disk tier sits under the prefix cache")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be None or one of {sorted(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        check_mode(self.weights)


class LLMEngine:
    """One rank's step loop. `model`: an already loaded model to serve instead of loading `model_dir`
    whole (the EP engine passes the model holding only this rank's experts)."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, *,
                 model: Transformer | None = None) -> None:
        c = config or EngineConfig()
        self.config = c
        dtype = _DTYPES[c.dtype]
        if model is not None and model.dtype != dtype:
            raise ValueError(f"model has dtype {model.dtype}, config.dtype is {c.dtype!r}")
        self.model = model if model is not None else load_model(model_dir, dtype=dtype, device=c.device,
                                                                weights=c.weights)
        cfg = self.model.cfg
        self.model_config = cfg
        num_pages = c.num_pages
        if num_pages is None:
            plan = plan_cache(cfg, c.cache_budget_bytes, c.page_tokens, c.max_num_seqs,
                              cache_dtype=KV_CACHE_DTYPES[c.kv_cache_dtype or c.dtype],
                              with_snapshot=c.enable_prefix_caching)
            num_pages = plan.num_pages
        self.cache = PagedKVCache(cfg, num_pages, c.page_tokens, dtype, c.device, kv_dtype=c.kv_cache_dtype)
        self.cache.bind(self.model)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
            page_tokens=c.page_tokens, num_pages=num_pages, enable_prefix_caching=c.enable_prefix_caching,
            max_model_len=c.max_model_len or cfg.max_position_embeddings,
        ))
        decode = None
        if not c.enforce_eager:
            max_len = c.max_model_len or cfg.max_position_embeddings
            slots = DecodeSlots(self.model, self.cache, c.max_num_seqs)
            decode = DecodeGraphRunner(self.model, slots, -(-max_len // c.page_tokens), c.cuda_graphs)
        self.runner = ModelRunner(self.model, self.cache, Sampler(seed=c.seed, eos_token_id=cfg.eos_token_id), decode)
        self.disk = DiskTier(c.disk_cache, self.cache, self.model) if c.disk_cache is not None else None
        self.scheduler.prefix_store = self.runner.disk = self.disk
        self._ids = itertools.count()
        # Everything built so far lives as long as the engine: keep it out of the cyclic GC's full
        # collections, which otherwise walk it every few hundred steps (a p99 step-time spike).
        gc.collect()
        gc.freeze()

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    req_id: str | None = None) -> str:
        params = params or SamplingParams()
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        bad = [t for t, _ in params.logit_bias if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias token ids out of range [0, {vocab}): {bad[:5]}")
        rid = req_id if req_id is not None else f"req-{next(self._ids)}"
        self.scheduler.add_request(Request(rid, [int(t) for t in prompt_token_ids], params, time.monotonic(),
                                           eos_token_id=self.model_config.eos_token_id))
        return rid

    def abort_request(self, req_id: str) -> bool:
        return self.scheduler.abort_request(req_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def idle(self) -> bool:
        """True when a step would do nothing (the rank worker then waits for input instead of stepping)."""
        return not self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """The one step loop: schedule, run the packed batch, update; returns the new tokens and finished requests.

        An expert-parallel rank (engine.core.ep.EPEngine) adds only what is collective, through the three hooks
        below: the ranks agree whether any of them has work, a rank without tokens joins the MoE exchanges with an
        empty forward, and the step ends at the rebalance point.
        """
        sched = self.scheduler
        group_busy = self._agree(sched.num_waiting > 0 or sched.num_running > 0)
        if not group_busy and not sched.has_unfinished():
            return []
        so = sched.schedule()
        ro = self.runner.execute(so)
        if group_busy and so.total_num_scheduled_tokens == 0:
            self._empty_forward()
        outputs = sched.update_from_output(so, ro)
        if group_busy:
            self._end_step()
        return outputs

    # ---- the collective hooks (one rank alone: nothing to agree on, nobody to wait for) ----
    def _agree(self, has_work: bool) -> bool:
        """Whether any rank of the group has work this step (here: this rank)."""
        return has_work

    def _empty_forward(self) -> None:
        """Run when the group is busy but this rank scheduled no tokens (alone: never needed)."""

    def _end_step(self) -> None:
        """After a busy step's update (alone: nothing)."""

    def stats(self) -> dict:
        """Scheduler figures (running, waiting, pages, prefix hits, preemptions) and the cache's size."""
        out = {**self.scheduler.stats(), "cache_pool_bytes": self.cache.pool_bytes(),
               "cache_snapshots": len(self.cache.snapshots)}
        if self.disk is not None:
            out["disk"] = self.disk.summary()
        return out
