"""Run an N-rank EP engine group on one machine, without Ray: one spawned process per rank.

    result = run_engine_group(model_dir, 4, prompts, SamplingParams(temperature=0, max_tokens=32),
                              backend="wave", placement_config=PlacementConfig(policy="eplb",
                                                                               rebalance_interval_steps=64))
    for out in result.outputs:            # one per prompt, in order
        print(out.rank, out.token_ids, out.text, out.finish_reason)
    result.stats                          # EPEngine.stats() of every rank at the end

Prompts are token-id lists or strings (strings need the checkpoint's tokenizer.json). Request i runs on rank
`ranks[i]` (default: i % world_size). Inside a rank, `serve_until_idle(engine, requests)` is the loop: add
the requests, step until the whole group is idle (every rank leaves the loop at the same step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from comm.launch import run_ranks
from engine.core.engine import EngineConfig
from engine.core.ep.engine import EPEngine, PlacementConfig
from scheduler.sampling import SamplingParams


@dataclass
class GroupOutput:
    req_id: str
    rank: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    text: str | None = None  # decoded, for string prompts
    num_cached_tokens: int = 0


@dataclass
class GroupResult:
    outputs: list[GroupOutput]  # one per prompt, in order
    stats: list[dict]  # EPEngine.stats() per rank, after the group went idle


def serve_until_idle(engine: EPEngine, requests: Sequence[tuple[str, list[int], SamplingParams]],
                     max_steps: int = 1_000_000) -> dict[str, GroupOutput]:
    """Collective: add (req_id, prompt ids, params) requests to this rank's engine and step until no rank of
    the group has work. Every rank must call it (possibly with no requests). Returns this rank's outputs."""
    outs: dict[str, GroupOutput] = {}
    for rid, ids, params in requests:
        engine.add_request(ids, params, rid)
        outs[rid] = GroupOutput(rid, engine.ep_rank, list(ids))
    for _ in range(max_steps):
        for ro in engine.step():
            out = outs[ro.req_id]
            out.token_ids.extend(ro.new_token_ids)
            out.num_cached_tokens = max(out.num_cached_tokens, ro.num_cached_tokens)
            if ro.finished:
                out.finish_reason = ro.finish_reason
        if engine.idle():
            return outs
    raise RuntimeError(f"rank {engine.ep_rank}: the group was still busy after {max_steps} steps")


def _rank_main(rank: int, world_size: int, model_dir: str, requests: list, backend: str,
               engine_config: EngineConfig | None, placement_config: PlacementConfig | None) -> tuple[dict, dict]:
    engine = EPEngine(model_dir, engine_config, rank, world_size, backend=backend, placement_config=placement_config)
    outs = serve_until_idle(engine, requests[rank])
    return outs, engine.stats()


def run_engine_group(model_dir: str | Path, world_size: int, prompts: Sequence[str | Sequence[int]],
                     params: SamplingParams | Sequence[SamplingParams] | None = None, backend: str = "sync",
                     engine_config: EngineConfig | None = None, placement_config: PlacementConfig | None = None,
                     ranks: Sequence[int] | None = None, device: str = "cpu",
                     timeout_s: float = 600.0) -> GroupResult:
    """Spawn `world_size` ranks, each an EPEngine, run every prompt to completion on its rank, return the
    outputs in prompt order and every rank's stats. `device`: "cpu" (gloo) or "cuda" (NCCL, one GPU per rank);
    `engine_config.device` follows it."""
    if isinstance(params, SamplingParams) or params is None:
        params = [params or SamplingParams()] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
    ranks = [i % world_size for i in range(len(prompts))] if ranks is None else list(ranks)
    if len(ranks) != len(prompts) or any(not 0 <= r < world_size for r in ranks):
        raise ValueError(f"ranks must give one rank in [0, {world_size}) per prompt, got {ranks}")
    tokenizer = None
    if any(isinstance(p, str) for p in prompts):
        from engine.weights.checkpoint import open_checkpoint
        from engine.weights.tokenizer import load_tokenizer

        if not (Path(model_dir) / "tokenizer.json").exists():
            raise ValueError(f"string prompts need a tokenizer.json in {model_dir}")
        tokenizer, bos = load_tokenizer(model_dir), open_checkpoint(model_dir).config.bos_token_id
    per_rank: list[list[tuple[str, list[int], SamplingParams]]] = [[] for _ in range(world_size)]
    for i, (prompt, p, r) in enumerate(zip(prompts, params, ranks, strict=True)):
        if isinstance(prompt, str):
            ids = [bos] + tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            ids = [int(t) for t in prompt]
        per_rank[r].append((f"req-{i}", ids, p))
    cfg = engine_config or EngineConfig()
    if cfg.device != device:
        cfg = replace(cfg, device=device)
    results = run_ranks(_rank_main, world_size, str(model_dir), per_rank, backend, cfg, placement_config,
                        device=device, timeout_s=timeout_s)
    merged: dict[str, GroupOutput] = {}
    for outs, _ in results:
        merged.update(outs)
    outputs = [merged[f"req-{i}"] for i in range(len(prompts))]
    if tokenizer is not None:
        for prompt, out in zip(prompts, outputs, strict=True):
            if isinstance(prompt, str):
                out.text = tokenizer.decode(out.token_ids)
    return GroupResult(outputs, [s for _, s in results])
