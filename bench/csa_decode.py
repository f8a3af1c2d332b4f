"""Decode time of one CSA layer against context length: the sparse decode step vs the masked reference.

The `tiny` model (random weights) on this machine's CPU. For each context length L the cache state of
`--batch` sequences holding L tokens is filled synthetically (random compressed entries and indexer keys in
the page pools, random window rings and partial windows in the decode slots; page tables shuffled), then
one decode token per sequence runs through the first CSA layer:

- `layer_ms`: the whole layer (mHC, attention, MoE) on the static decode path (engine.model.attention_decode:
  the indexer scores all L/4 entries, attention gathers only `index_topk` of them);
- `attention_ms`: the attention sub-layer alone on that path;
- `reference_attention_ms`: the eager batched path (`Attention._attend_batch`), which applies the top-k as a
  mask over all L/4 entries (up to `--reference-max`).

Median and minimum of `--repeats` runs after one warm-up, in CPU time of the calling thread (torch runs on it
with `--threads 1`; a shared machine's other processes do not count), plus the median wall time. The summary
gives the medians at the shortest and longest context and the growth between them (median and min; the
sparse step's target for the layer: < 2x from 16K to 256K).

    python bench/csa_decode.py --out out/csa_decode.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import versions, write_result  # noqa: E402
from engine.cache.decode_slots import DecodeSlots  # noqa: E402
from engine.cache.kv_cache import PagedKVCache  # noqa: E402
from engine.cache.seq_state import CompressorState, PagedEntries  # noqa: E402
from engine.core.graph_runner import DecodeGraphRunner  # noqa: E402
from engine.model.attention import SeqSlice  # noqa: E402
from engine.model.config import TINY  # noqa: E402
from engine.weights.loader import load_model  # noqa: E402
from engine.weights.make_checkpoint import write_checkpoint  # noqa: E402

PAGE_TOKENS = 256


def _times_ms(fn, repeats: int) -> dict:
    """Median and minimum of `repeats` calls after one warm-up, in CPU time of this thread (torch runs on it
    with one thread: on a shared machine that does not count the time other processes hold the core), and the
    median wall time."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return {"median": round(1e3 * statistics.median(cpu), 3), "min": round(1e3 * min(cpu), 3),
            "wall_median": round(1e3 * statistics.median(wall), 3)}


def _fill(cache: PagedKVCache, slots: DecodeSlots, g: torch.Generator) -> None:
    """Random cache state: every pool page and every slot buffer (finite gates everywhere)."""
    for pool in [*cache.comp_pools.values(), *cache.index_pools.values()]:
        pool.copy_(torch.randn(pool.shape, generator=g))
    for ls in slots.layers:
        ls.window.copy_(torch.randn(ls.window.shape, generator=g))
        for cs in (ls.comp, ls.index):
            if cs is not None:
                for t in (cs.pend_kv, cs.pend_gate, cs.prev_kv, cs.prev_gate):
                    t.copy_(torch.randn(t.shape, generator=g))


def _reference_states(model, layer: int, cache: PagedKVCache, tables: list[list[int]], length: int,
                      g: torch.Generator) -> list:
    """Eager LayerStates of sequences holding `length` tokens over the same pools (for `_attend_batch`)."""
    attn = model.layers[layer].attn
    out = []
    for pages in tables:
        st = attn.new_state("cpu", PagedEntries(cache.comp_pools[layer], pages, length // 4),
                            PagedEntries(cache.index_pools[layer], pages, length // 4))
        st.window = torch.randn(attn.window - 1, attn.head_dim, generator=g)
        st.num_tokens = length
        for cs, comp in ((st.comp, attn.compressor), (st.index, attn.indexer.compressor)):
            width = comp.ape.shape[1]
            fresh = CompressorState(cs.store, torch.zeros(0, width), torch.zeros(0, width),
                                    torch.randn(4, width, generator=g), torch.randn(4, width, generator=g))
            cs.__dict__.update(fresh.__dict__)
        out.append(st)
    return out


def _measure(model, layer: int, length: int, args: argparse.Namespace, g: torch.Generator) -> dict:
    """One context length: fill a fresh cache and slots, time the layer, its attention, and the reference."""
    block = model.layers[layer]
    need = length // PAGE_TOKENS + 1
    cache = PagedKVCache(TINY, args.batch * need, PAGE_TOKENS, torch.float32, "cpu")
    slots = DecodeSlots(model, cache, args.batch)
    _fill(cache, slots, g)
    order = torch.randperm(args.batch * need, generator=g).tolist()
    tables = [order[i * need:(i + 1) * need] for i in range(args.batch)]
    runner = DecodeGraphRunner(model, slots, need, cuda_graphs=False)
    batch = runner.prepare([7] * args.batch, [length] * args.batch, list(range(args.batch)), tables).batch
    if batch.size != args.batch:
        raise SystemExit(f"--batch {args.batch} is not a bucket size ({runner.batch_sizes}); pick a power of 2")
    dec = (batch, slots.layers[layer])
    h = torch.randn(args.batch, TINY.hc_mult, TINY.hidden_size, generator=g)
    x = torch.randn(args.batch, TINY.hidden_size, generator=g)
    with torch.inference_mode():
        row = {"context": length, "entries": length // 4,
               "layer_ms": _times_ms(lambda: block(h, batch.input_ids, batch.pos, [], dec), args.repeats),
               "attention_ms": _times_ms(lambda: block.attn(x, batch.pos, [], dec), args.repeats)}
        if length <= args.reference_max:
            states = _reference_states(model, layer, cache, tables, length, g)

            def reference():
                pos = torch.tensor([st.num_tokens for st in states])
                block.attn(x, pos, [SeqSlice(i, 1, st) for i, st in enumerate(states)])

            row["reference_attention_ms"] = _times_ms(reference, args.repeats)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--contexts", default="16384,32768,65536,131072,262144", help="context lengths (tokens)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--reference-max", type=int, default=262144, help="longest context the reference runs at")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is exact only with 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(TINY, Path(d), seed=0)
        model = load_model(d, dtype=torch.float32)
    layer = next(i for i, r in enumerate(TINY.compress_ratios[:TINY.num_hidden_layers]) if r == 4)
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in contexts:
        rows.append(_measure(model, layer, length, args, g))
        print(rows[-1], flush=True)
    first, last = rows[0], rows[-1]
    summary = {"layer": layer, "batch": args.batch, "threads": args.threads, "contexts": [first["context"],
                                                                                         last["context"]]}
    for key in ("layer_ms", "attention_ms", "reference_attention_ms"):
        if key in first and key in last:
            summary[key] = [first[key]["median"], last[key]["median"]]
            summary[key.replace("_ms", "_growth")] = {
                stat: round(last[key][stat] / first[key][stat], 2) for stat in ("median", "min")}
    write_result(args.out, {"summary": summary, "rows": rows, "versions": versions(with_transformers=False)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
