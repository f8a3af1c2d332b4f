"""One long request through the engine: chunked prefill of `--tokens` prompt tokens, then a few decode tokens.

The `tiny` model (random weights) on this machine's CPU, with the checkpoint's context extended honestly: the
same weights, `max_position_embeddings` raised to hold the request and the YaRN factor of the compressed layers'
RoPE raised to match (original 4096 positions x factor = max_position_embeddings, as V4 stretches 64K to 1M).
One request, prefix caching off (nothing to share; its per-page snapshots would be most of the memory), float32,
a page pool sized by engine.cache.accounting for exactly this request.

The JSON (`--out`, rewritten at every progress line so a long run can be followed):
- `prefill`: seconds to the first sampled token (wall and process CPU), tok/s, and `checkpoints`: tokens done,
  elapsed, and the tok/s of the stretch since the previous checkpoint (where the quadratic indexer shows);
- `decode`: per-token seconds of the decode steps after the first token, tok/s;
- `memory`: peak RSS of the process (before the request and at the end), and the sequence's cache as held
  (the bytes of its pages in every pool, of its decode slot in every slot tensor, of the eager state left in
  its layers) against `sequence_cache_bytes` for its token count, with their ratio.

    python bench/long_context.py --tokens 65536 --out out/long_64k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import versions, write_result  # noqa: E402
from engine.cache.accounting import page_bytes, sequence_cache_bytes, slot_bytes  # noqa: E402
from engine.core.engine import EngineConfig, LLMEngine  # noqa: E402
from engine.model.config import TINY, ModelConfig, RopeScaling  # noqa: E402
from engine.weights.make_checkpoint import write_checkpoint  # noqa: E402
from scheduler.sampling import SamplingParams  # noqa: E402

PAGE_TOKENS = 256
CHECKPOINTS = 32  # prefill checkpoints kept in the JSON (evenly spaced in tokens)


def long_config(max_len: int, base: ModelConfig = TINY) -> ModelConfig:
    """`base` with room for `max_len` positions: max_position_embeddings = max_len (rounded up to a page) and the
    YaRN factor = that / original_max_position_embeddings (never below the base's)."""
    rs = base.rope_scaling or RopeScaling()
    max_pos = max(base.max_position_embeddings, -(-max_len // PAGE_TOKENS) * PAGE_TOKENS)
    factor = max(rs.factor, max_pos / rs.original_max_position_embeddings)
    return dataclasses.replace(base, max_position_embeddings=max_pos,
                               rope_scaling=dataclasses.replace(rs, factor=factor))


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def sequence_bytes(engine: LLMEngine, req_id: str) -> dict[str, int]:
    """What the request holds now, from the tensors: `pages` (its pages in every page pool), `slot` (its decode
    slot in every slot tensor), `eager` (window and partial windows left in its layer states: MTP layers, or all
    layers before it decodes); `total`."""
    r = engine.runner.reqs[req_id]
    pools = [*engine.cache.comp_pools.values(), *engine.cache.index_pools.values()]
    pages = len(r.page_ids) * sum(_nbytes(p[0]) for p in pools)
    slot = 0
    if r.slot is not None:
        for ls in engine.runner.decode.slots.layers:
            slot += _nbytes(ls.window[r.slot])
            for cs in (ls.comp, ls.index):
                if cs is not None:
                    slot += sum(_nbytes(t[r.slot]) for t in (cs.pend_kv, cs.pend_gate, cs.prev_kv, cs.prev_gate))
    n_main = engine.model_config.num_hidden_layers
    eager = 0
    for i, st in enumerate(r.state.layers):
        if r.slot is not None and i < n_main:
            continue  # its state lives in the slot
        eager += _nbytes(st.window)
        for cs in (st.comp, st.index):
            if cs is not None:
                eager += sum(_nbytes(t) for t in (cs.pend_kv, cs.pend_gate, cs.prev_kv, cs.prev_gate))
    return {"pages": pages, "slot": slot, "eager": eager, "total": pages + slot + eager}


def run(tokens: int, out: Path | None, chunk: int = 4096, decode_tokens: int = 4, seed: int = 0,
        ckpt: Path | None = None, log=print) -> dict:
    """Serve one `tokens`-token prompt and `decode_tokens` more; returns the result dict (also written to `out`)."""
    cfg = long_config(tokens + decode_tokens + 1)  # the first token comes with the prefill, then one per decode step
    with tempfile.TemporaryDirectory() as tmp:
        path = ckpt or Path(tmp) / "ckpt"
        have = path / "config.json"
        if not have.exists() or ModelConfig.from_json(path) != cfg:
            write_checkpoint(cfg, path, seed=seed)
        n_pages = -(-(tokens + decode_tokens + 1) // PAGE_TOKENS)  # the scheduler caps the request at the pool
        budget = slot_bytes(cfg, "float32") + n_pages * page_bytes(cfg, PAGE_TOKENS, "float32", with_snapshot=False)
        engine = LLMEngine(path, EngineConfig(dtype="float32", max_num_seqs=1, max_num_batched_tokens=chunk,
                                              page_tokens=PAGE_TOKENS, cache_budget_bytes=budget,
                                              enable_prefix_caching=False, max_model_len=cfg.max_position_embeddings,
                                              seed=seed))
    ids = torch.randint(2, cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    rss_before = _rss_peak_bytes()
    rid = engine.add_request(ids, SamplingParams(max_tokens=decode_tokens + 1, temperature=0.0, ignore_eos=True))
    result = {"config": {"tokens": tokens, "chunk": chunk, "decode_tokens": decode_tokens, "page_tokens": PAGE_TOKENS,
                         "num_pages": engine.cache.num_pages, "threads": torch.get_num_threads(),
                         "max_position_embeddings": cfg.max_position_embeddings,
                         "rope_scaling": cfg.rope_scaling.to_dict()},
              "versions": versions(with_transformers=False)}
    every = max(1, tokens // CHECKPOINTS)
    points, step_times = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    last = (0, 0.0)
    prefill = None
    while engine.has_unfinished():
        ts = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - ts
        r = engine.runner.reqs.get(rid)
        done = r.state.num_tokens if r is not None else tokens + decode_tokens
        now = time.perf_counter() - t0
        if prefill is None:
            if done // every > last[0] // every or done >= tokens:
                rate = (done - last[0]) / max(now - last[1], 1e-9)
                points.append({"tokens": done, "elapsed_s": round(now, 2), "tok_s": round(rate, 1)})
                log(f"prefill {done}/{tokens} tokens  {now:.0f}s  {rate:.0f} tok/s now  "
                    f"{done / now:.0f} tok/s overall  rss {_rss_peak_bytes() / 2**30:.2f} GiB")
                last = (done, now)
                if out is not None:  # the progress so far
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps({**result, "summary": {"status": "prefill", "tokens_done": done,
                                                                      "elapsed_s": round(now, 1)},
                                               "prefill": {"checkpoints": points}}, indent=2))
            if any(o.new_token_ids for o in outs):
                prefill = {"wall_s": round(now, 2), "cpu_s": round(time.process_time() - c0, 2),
                           "tok_s": round(tokens / now, 1), "checkpoints": points}
                mem_at_prefill = sequence_bytes(engine, rid)
        elif outs and r is not None:
            step_times.append(dt)
        if r is not None:
            held = sequence_bytes(engine, rid)
            n_held = r.state.num_tokens
    decode = {"tokens": len(step_times), "step_s": [round(x, 4) for x in step_times],
              "tok_s": round(len(step_times) / sum(step_times), 2) if step_times else None}
    predicted = sequence_cache_bytes(cfg, n_held, "float32")
    memory = {"rss_peak_before_request_bytes": rss_before, "rss_peak_bytes": _rss_peak_bytes(),
              "sequence_tokens": n_held, "sequence_held": held, "sequence_at_first_token": mem_at_prefill,
              "accounting": predicted.to_dict(),
              "ratio_total": round(held["total"] / predicted.total, 5),
              "ratio_compressed": round(held["pages"] / predicted.compressed, 5)}
    summary = {"status": "done", "tokens": tokens, "prefill_s": prefill["wall_s"], "prefill_cpu_s": prefill["cpu_s"],
               "prefill_tok_s": prefill["tok_s"], "decode_tok_s": decode["tok_s"],
               "rss_peak_gib": round(memory["rss_peak_bytes"] / 2**30, 3),
               "sequence_bytes": held["total"], "accounting_bytes": predicted.total,
               "memory_ratio": memory["ratio_total"]}
    result.update(summary=summary, prefill=prefill, decode=decode, memory=memory)
    if out is not None:
        write_result(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536, help="prompt tokens")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--chunk", type=int, default=4096, help="prefill tokens per step (max_num_batched_tokens)")
    ap.add_argument("--decode-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt", type=Path, default=None, help="where to keep the checkpoint (default: a temp dir)")
    args = ap.parse_args(argv)
    res = run(args.tokens, args.out, args.chunk, args.decode_tokens, args.seed, args.ckpt,
              log=lambda s: print(s, flush=True))
    print(json.dumps(res["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
