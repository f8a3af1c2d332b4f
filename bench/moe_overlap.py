"""Dispatch/combine overlap: how much communication each EP backend (every registered one: sync, tbo, wave, ll,
...) leaves exposed.

For each world size (ranks as local processes on gloo, one thread each) and each number of tokens per
rank, every backend runs

- "layer": one MoE layer (learned gate, routed experts spread over the ranks, shared expert), and
- "model": one full model step (embedding, every block's attention and MoE, head) over the EP engine path,

and the same computation with no communication: the gate, the shared expert and exactly the expert calls
the backend made (their inputs are recorded during the timed run and replayed locally). Per point:

- median time with p10/p90 and min/max over repeats (a repeat's time is the slowest rank's, since the ranks
  step in lock-step), the compute-only time, exposed communication = backend time - compute-only time,
- bytes moved between ranks per step (dispatch + combine, summed over ranks) and collectives per step.

`summary`: per part, backend and world size, the best speedup over `sync` among the points where
communication is at least 20% of the sync time (exposed / sync time >= 0.2).

Model: the `small` preset with a wider hidden size (1536), narrower experts (moe_intermediate_size 256) and
no MTP block (a step does not run it): the bytes per token on the wire are those of a real hidden size while
the expert matmuls stay small enough for a 2-core CPU. Placement: static round robin, no redundancy. Each
rank runs one thread on gloo. A fixed-capacity backend (ll) gets max_tokens_per_rank = the largest --tokens, so
it moves and computes its whole padded buffer at every token count.
`--preset/--hidden-size/--moe-intermediate-size` change the model. `--quick`
(tiny preset, 2 ranks, 1 and 8 tokens, 2 repeats) only checks that everything runs; its numbers mean nothing.

    python bench/moe_overlap.py --out out/moe_overlap.json [--world-sizes 2,4] [--tokens 1,8,64,512]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import versions, write_result  # noqa: E402
from comm.backends.registry import backend_capabilities, backend_names  # noqa: E402
from engine.model.config import ModelConfig, get_preset  # noqa: E402

COMM_SHARE_MIN = 0.2  # points where sync's exposed communication is at least this share of its time
# every registered backend that runs on the CPU, sync (the reference) first
DEFAULT_BACKENDS = ("sync", *(b for b in backend_names() if b != "sync" and "cpu" in backend_capabilities(b).devices))


@dataclasses.dataclass(frozen=True)
class Spec:
    """What every rank runs (pickled to the spawned ranks)."""

    cfg: ModelConfig
    tokens: tuple[int, ...]
    backends: tuple[str, ...]
    parts: tuple[str, ...]
    repeats: int
    warmup: int
    seed: int
    checkpoint: str | None  # the model part loads it (written once by the driver)


def bench_config(preset: str, hidden_size: int | None, moe_intermediate_size: int | None) -> ModelConfig:
    """The preset, optionally wider/narrower, without the MTP block (a model step does not run it)."""
    cfg = get_preset(preset)
    changes: dict = {"num_nextn_predict_layers": 0, "compress_ratios": cfg.compress_ratios[:cfg.num_hidden_layers]}
    if hidden_size:
        changes["hidden_size"] = hidden_size
    if moe_intermediate_size:
        changes["moe_intermediate_size"] = moe_intermediate_size
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------------- per rank


class _Recorder:
    """Wraps an expert_fn: remembers every call's inputs so the same expert work can be replayed locally."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor, **kw) -> torch.Tensor:
        self.calls.append((x, slot, weight))
        return self.fn(x, slot, weight, **kw)

    def replay(self) -> None:
        for x, slot, weight in self.calls:
            self.fn(x, slot, weight)


def _record_experts(moes: list) -> dict[int, _Recorder]:
    """Patch each MoE layer's expert function (``experts.forward_slots``, the callable every backend is handed)
    with a recorder, whatever path the model takes (layer by layer, or model-level two-batch overlap)."""
    recorders = {}
    for moe in moes:
        rec = _Recorder(type(moe.experts).forward_slots.__get__(moe.experts))
        moe.experts.forward_slots = rec  # instance attribute: shadows the method
        recorders[moe.layer_id] = rec
    return recorders


class _Replay:
    """A dispatcher with no communication: each MoE layer re-runs the expert calls its layer made in the timed
    step (same rows, same slots) and its shared expert, and returns the shared expert's output."""

    backend = "replay"  # not "tbo": a model holding it runs layer by layer

    def __init__(self, recorders: dict[int, _Recorder]) -> None:
        self.recorders = recorders
        self.layers_run = 0

    def __call__(self, layer, x, topk_idx, topk_weights, expert_fn, shared_fn=None):
        self.recorders[layer].replay()
        self.layers_run += 1
        return shared_fn(x) if shared_fn is not None else torch.zeros_like(x)


def _stats(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return {"median": statistics.median(xs), "p10": q[0], "p90": q[8], "min": min(xs), "max": max(xs)}


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure(moes: list, step, use_backend, use_replay, spec: Spec) -> dict:
    """Time ``step()`` under every backend (interleaved within each repeat, so drift hits all alike) and under
    the local replay of the expert work that backend's step did.

    ``use_backend(name) -> Dispatcher`` switches the MoE layers to a backend; ``use_replay(replay)`` swaps
    in the no-communication stand-in.
    """
    recorders = _record_experts(moes)
    res = {b: {"time_s": [], "compute_s": [], "stats": None} for b in spec.backends}
    with torch.inference_mode():
        for i in range(spec.warmup + spec.repeats):
            for backend in spec.backends:
                d = use_backend(backend)
                d.reset_stats()
                for rec in recorders.values():
                    rec.calls.clear()
                t = _timed(step)
                stats = d.totals.as_dict()
                rows = sum(call[0].shape[0] for rec in recorders.values() for call in rec.calls)
                want = stats["assignments_recv"]
                if d.capabilities.fixed_capacity:  # expert_fn also ran the padding of every fixed buffer
                    want = stats["calls"] * d.ep_size * d.impl.capacity_for(spec.cfg.num_experts_per_tok)
                if rows != want:
                    raise RuntimeError(f"{backend}: recorded {rows} expert rows, the dispatcher received {want}; "
                                       "the replay would not match the step")
                replay = _Replay(recorders)
                use_replay(replay)
                c = _timed(step)
                if replay.layers_run != len(moes):
                    raise RuntimeError(f"the replay ran {replay.layers_run} MoE layers, expected {len(moes)}")
                if i >= spec.warmup:
                    res[backend]["time_s"].append(t)
                    res[backend]["compute_s"].append(c)
                    res[backend]["stats"] = stats
    for moe in moes:
        del moe.experts.forward_slots  # back to the method
    return res


def _random_moe(cfg: ModelConfig, layer_id: int, local_experts: list[int], seed: int, rank: int):
    """An EP MoE layer with random weights: gate and shared expert equal on every rank, experts per rank."""
    from engine.model.moe import MoE

    moe = MoE(cfg, layer_id, local_experts, torch.float32)
    g = torch.Generator().manual_seed(seed)
    moe.gate.weight.data.normal_(0.0, cfg.hidden_size ** -0.5, generator=g)
    if moe.shared_experts is not None:
        for p in moe.shared_experts.parameters():
            p.data.normal_(0.0, 0.02, generator=g)
    ge = torch.Generator().manual_seed(seed + 1 + rank)
    for p in moe.experts.parameters():
        p.data.normal_(0.0, 0.02, generator=ge)
    return moe


def _layer_part(rank: int, world: int, spec: Spec) -> dict:
    """One MoE layer (learned gate) per backend and token count."""
    from comm.dispatch import Dispatcher
    from comm.placement import Placement

    cfg = spec.cfg
    layer_id = cfg.num_hash_layers  # the first learned-gate layer
    placement = Placement.static(layer_id + 1, cfg.n_routed_experts, world)
    moe = _random_moe(cfg, layer_id, placement.local_logical(layer_id, rank), spec.seed, rank)

    def use_backend(name: str) -> Dispatcher:
        moe.dispatcher = Dispatcher(placement, rank, world, backend=name, max_tokens_per_rank=max(spec.tokens))
        return moe.dispatcher

    def use_replay(replay: _Replay) -> None:
        moe.dispatcher = replay

    gx = torch.Generator().manual_seed(spec.seed + 1000 + rank)
    out = {}
    for tokens in spec.tokens:
        x = torch.randn(tokens, cfg.hidden_size, generator=gx)
        ids = torch.zeros(tokens, dtype=torch.int64)
        res = _measure([moe], lambda x=x, ids=ids: moe(x, ids), use_backend, use_replay, spec)
        for backend, r in res.items():
            out[(tokens, backend)] = r
    return out


def _model_part(rank: int, world: int, spec: Spec) -> dict:
    """One full model step per backend and token count: a prefill chunk of `tokens` new tokens of one sequence
    per rank (fresh state each time), embedding through the last token's logits. The compute-only run goes
    layer by layer (the model's own tbo splits the batch in two; attention costs the same either way)."""
    from comm.placement import Placement
    from engine.model.moe import EPContext
    from engine.weights.loader import load_model

    cfg = spec.cfg
    placement = Placement.static(cfg.num_hidden_layers, cfg.n_routed_experts, world)
    model = load_model(spec.checkpoint, dtype=torch.float32,
                       ep=EPContext(rank, world, placement, max_tokens_per_rank=max(spec.tokens)))
    moes = model.moe_layers()

    def use_backend(name: str):
        model.set_backend(name)
        return model.dispatcher

    def use_replay(replay: _Replay) -> None:
        model.dispatcher = replay  # set_backend puts a real dispatcher back
        for moe in moes:
            moe.dispatcher = replay

    g = torch.Generator().manual_seed(spec.seed + 2000 + rank)
    out = {}
    for tokens in spec.tokens:
        ids = torch.randint(2, cfg.vocab_size, (tokens,), generator=g)

        def step(ids=ids, tokens=tokens) -> None:
            h = model(ids, [model.new_state()], [tokens])
            model.compute_logits(h[-1:])

        res = _measure(moes, step, use_backend, use_replay, spec)
        for backend, r in res.items():
            out[(tokens, backend)] = r
    model.set_backend(spec.backends[0])
    return out


def _rank_main(rank: int, world: int, spec: Spec) -> dict:
    torch.manual_seed(spec.seed)
    out = {}
    if "layer" in spec.parts:
        out["layer"] = _layer_part(rank, world, spec)
    if "model" in spec.parts:
        out["model"] = _model_part(rank, world, spec)
    return out


# ---------------------------------------------------------------------------------------------- driver


def _aggregate(per_rank: list[dict], part: str, world: int, spec: Spec) -> list[dict]:
    """Per (tokens, backend): repeat times = slowest rank per repeat; bytes summed over ranks."""
    rows = []
    for tokens in spec.tokens:
        sync_median = None
        for backend in spec.backends:
            runs = [r[part][(tokens, backend)] for r in per_rank]
            step = [max(ts) for ts in zip(*(r["time_s"] for r in runs))]
            compute = [max(cs) for cs in zip(*(r["compute_s"] for r in runs))]
            st = [r["stats"] for r in runs]
            t, c = _stats(step), _stats(compute)
            exposed = t["median"] - c["median"]
            if backend == "sync":
                sync_median = t["median"]
            rows.append({
                "part": part, "world_size": world, "tokens_per_rank": tokens, "backend": backend,
                "time_s": t, "compute_only_s": c, "exposed_comm_s": exposed,
                "comm_share": exposed / t["median"] if t["median"] > 0 else 0.0,
                "speedup_vs_sync": (sync_median / t["median"]) if sync_median and t["median"] > 0 else None,
                "bytes_moved": sum(x["bytes_sent_remote"] for x in st),
                "bytes_incl_local": sum(x["bytes_sent"] for x in st),
                "collectives_per_rank": st[0]["collectives"],
                "assignments": sum(x["assignments_sent"] for x in st),
                "repeats": len(step),
            })
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per part, backend (other than sync) and world size: best speedup over sync where comm >= 20% of sync."""
    sync = {(r["part"], r["world_size"], r["tokens_per_rank"]): r for r in rows if r["backend"] == "sync"}
    out: dict = {}
    for r in rows:
        if r["backend"] == "sync":
            continue
        base = sync.get((r["part"], r["world_size"], r["tokens_per_rank"]))
        entry = out.setdefault(r["part"], {}).setdefault(r["backend"], {}).setdefault(
            f"ws{r['world_size']}", {"best_speedup_vs_sync": None, "tokens_per_rank": None, "points": 0})
        if base is None or base["comm_share"] < COMM_SHARE_MIN:
            continue
        entry["points"] += 1
        speedup = base["time_s"]["median"] / r["time_s"]["median"]
        if entry["best_speedup_vs_sync"] is None or speedup > entry["best_speedup_vs_sync"]:
            entry["best_speedup_vs_sync"] = round(speedup, 3)
            entry["tokens_per_rank"] = r["tokens_per_rank"]
    out["rule"] = (f"best median(sync)/median(backend) over points whose sync exposed communication is at least "
                   f"{COMM_SHARE_MIN:.0%} of sync time; null when no point qualifies")
    return out


def format_table(rows: list[dict]) -> str:
    head = (f"{'part':<6} {'ws':>2} {'tok':>4} {'backend':<7} {'median ms':>10} {'p10-p90 ms':>15} "
            f"{'compute ms':>10} {'exposed ms':>10} {'comm %':>6} {'vs sync':>7} {'MB moved':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r["time_s"]
        sp = "" if r["speedup_vs_sync"] is None else f"{r['speedup_vs_sync']:.2f}x"
        lines.append(f"{r['part']:<6} {r['world_size']:>2} {r['tokens_per_rank']:>4} {r['backend']:<7} "
                     f"{t['median'] * 1e3:>10.2f} {t['p10'] * 1e3:>7.2f}-{t['p90'] * 1e3:<7.2f} "
                     f"{r['compute_only_s']['median'] * 1e3:>10.2f} {r['exposed_comm_s'] * 1e3:>10.2f} "
                     f"{r['comm_share'] * 100:>6.1f} {sp:>7} {r['bytes_moved'] / 1e6:>9.3f}")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        vals = tuple(v for v in text.split(",") if v)
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
        return vals
    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--world-sizes", type=_ints, default=(2, 4))
    ap.add_argument("--tokens", type=_ints, default=(1, 8, 64, 512), help="tokens per rank")
    ap.add_argument("--backends", type=_names(backend_names()), default=DEFAULT_BACKENDS,
                    help=f"comma-separated, from the registry (default: {','.join(DEFAULT_BACKENDS)})")
    ap.add_argument("--parts", type=_names(("layer", "model")), default=("layer", "model"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--hidden-size", type=int, default=1536)
    ap.add_argument("--moe-intermediate-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per world size")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny preset, 2 ranks, 1 and 8 tokens, 2 repeats (checks it runs; no numbers)")
    args = ap.parse_args(argv)
    if "sync" not in args.backends:
        ap.error("--backends must include sync (the reference every speedup is measured against)")
    if args.quick:
        args.world_sizes, args.tokens, args.repeats, args.warmup = (2,), (1, 8), 2, 1
        args.preset, args.hidden_size, args.moe_intermediate_size = "tiny", None, None
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    cfg = bench_config(args.preset, args.hidden_size, args.moe_intermediate_size)
    bad = [w for w in args.world_sizes if cfg.n_routed_experts % w]
    if bad:
        ap.error(f"world sizes {bad} do not divide the {cfg.n_routed_experts} routed experts")

    from comm.launch import run_ranks
    from engine.weights.make_checkpoint import write_checkpoint

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="moe_overlap_") as tmp:
        if "model" in args.parts:
            write_checkpoint(cfg, tmp, seed=args.seed)
        spec = Spec(cfg, args.tokens, args.backends, args.parts, args.repeats, args.warmup, args.seed,
                    tmp if "model" in args.parts else None)
        for world in args.world_sizes:
            per_rank = run_ranks(_rank_main, world, spec, timeout_s=args.timeout_s)
            for part in args.parts:
                rows.extend(_aggregate(per_rank, part, world, spec))
    print(format_table(rows))
    result = {
        "benchmark": "moe_overlap",
        "workload": {
            "model": {"preset": args.preset, "hidden_size": cfg.hidden_size,
                      "moe_intermediate_size": cfg.moe_intermediate_size, "n_routed_experts": cfg.n_routed_experts,
                      "num_experts_per_tok": cfg.num_experts_per_tok, "num_hidden_layers": cfg.num_hidden_layers,
                      "n_shared_experts": cfg.n_shared_experts},
            "world_sizes": list(args.world_sizes), "tokens_per_rank": list(args.tokens),
            "backends": list(args.backends), "parts": list(args.parts), "repeats": args.repeats,
            "warmup": args.warmup, "seed": args.seed, "dtype": "float32", "device": "cpu",
            "process_group": "gloo", "threads_per_rank": 1, "placement": "static round_robin, no redundancy",
            "quick": args.quick,
            "definitions": {
                "time_s": "per repeat, the slowest rank's wall time for the step (ranks start after a barrier)",
                "compute_only_s": "the same gate, shared expert and recorded expert calls, run locally",
                "exposed_comm_s": "median time_s - median compute_only_s",
                "comm_share": "exposed_comm_s / median time_s",
                "bytes_moved": "dispatch + combine payload sent to other ranks, summed over ranks, per step",
            },
        },
        "versions": versions(with_transformers=False),
        "results": rows,
        "summary": summarize(rows),
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
