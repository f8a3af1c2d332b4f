"""The `megaserve` command: one subcommand per function, registered in `SUBCOMMANDS`.

    megaserve make-checkpoint --preset tiny --out /tmp/tiny --seed 0 [--no-quantize]
    megaserve manifest --preset v4-pro [--json] [--no-tensors]

To add a subcommand, write `_add_<name>(subparsers)` that builds its parser and sets `func` to a handler
`(args) -> int`, and append it to `SUBCOMMANDS`. Heavy imports stay inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence

from engine.model.config import MODEL_DTYPES, ConfigError, ModelConfig, get_preset
from engine.weights.checkpoint import CheckpointError


def _model_config(args: argparse.Namespace) -> ModelConfig:
    """--config PATH wins over --preset NAME."""
    if getattr(args, "config", None):
        return ModelConfig.from_json(args.config)
    return get_preset(args.preset)


def _add_model_choice(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help="a built-in config: v4-pro, v4-flash, tiny, small")
    group.add_argument("--config", metavar="PATH", help="a config.json (or a directory holding one)")


# ---- make-checkpoint --------------------------------------------------------------------------------
def _add_make_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-checkpoint", help="write a random model in the official checkpoint layout")
    _add_model_choice(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if needed)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes identical files")
    p.add_argument("--no-quantize", action="store_true", help="write FP8/FP4 weights as BF16, without scales")
    p.add_argument("--shard-bytes", type=int, default=None, help="maximum bytes per shard (default 4 GiB)")
    p.set_defaults(func=_make_checkpoint)


def _make_checkpoint(args: argparse.Namespace) -> int:
    from engine.weights.make_checkpoint import DEFAULT_SHARD_BYTES, write_checkpoint

    cfg = _model_config(args)
    out = write_checkpoint(cfg, args.out, seed=args.seed, shard_bytes=args.shard_bytes or DEFAULT_SHARD_BYTES,
                           quantize=not args.no_quantize)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    n_shards = len(set(index["weight_map"].values()))
    print(f"wrote {out}: {len(index['weight_map'])} tensors, {index['metadata']['total_size']:,} bytes "
          f"in {n_shards} shards ({'quantized' if not args.no_quantize else 'unquantized'}, seed {args.seed})")
    return 0


# ---- manifest ----------------------------------------------------------------------------------------
def _add_manifest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifest", help="list every tensor of a checkpoint for a config, or summarise them")
    _add_model_choice(p)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--no-tensors", action="store_true", help="with --json: totals only, no tensor list")
    p.set_defaults(func=_manifest)


def _manifest(args: argparse.Namespace) -> int:
    from engine.weights.manifest import build_manifest

    m = build_manifest(_model_config(args))
    if args.json:
        # dumps + one write: json.dump streams through the pure-Python encoder (4x slower at 145k tensors)
        sys.stdout.write(json.dumps(m.to_json(with_tensors=not args.no_tensors), separators=(",", ":")) + "\n")
        return 0
    by_dtype: dict[str, int] = defaultdict(int)
    for t in m.tensors:
        by_dtype[t.dtype] += t.nbytes
    print(f"tensors:       {len(m.tensors):,}")
    print(f"bytes:         {m.bytes / 1e9:,.2f} GB ({m.bytes:,})")
    print(f"params total:  {m.params_total / 1e9:,.2f}B (main {m.params_main / 1e9:,.2f}B + MTP)")
    print(f"params active: {m.params_active / 1e9:,.2f}B per token ({m.params_active_mtp / 1e9:,.2f}B with MTP)")
    print("bytes by dtype:")
    for dtype, n in sorted(by_dtype.items(), key=lambda kv: -kv[1]):
        print(f"  {dtype:8s} {n / 1e9:12,.3f} GB  {100 * n / m.bytes:5.1f}%")
    return 0


# ---- bench serve / sweep / offline -------------------------------------------------------------------
def _add_serve_options(s: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The options of `bench serve`; `bench sweep` takes the same, less the rate, ramp-up and trace replay."""
    s.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    s.add_argument("--model", required=True, help="model name sent in each request")
    s.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    s.add_argument("--dataset", choices=["random", "sharegpt"] + ([] if sweep else ["trace"]), default="random")
    s.add_argument("--dataset-path", help="ShareGPT JSON" + ("" if sweep else " or trace JSONL (timestamp, "
                                                                           "input_len, output_len)"))
    s.add_argument("--num-prompts", type=int, default=1000)
    s.add_argument("--random-input-len", type=int, default=1024)
    s.add_argument("--random-output-len", type=int, default=128)
    s.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L*(1-r), L*(1+r)] (vLLM semantics; 0 = fixed)")
    s.add_argument("--random-token-ids", action="store_true", help="send prompts as token-id lists (completions)")
    s.add_argument("--vocab-size", type=int, default=32000, help="token-id range for --random-token-ids")
    s.add_argument("--sharegpt-output-len", type=int, default=None, help="fix the output length of ShareGPT")
    if not sweep:
        s.add_argument("--trace-timestamp-unit", choices=["s", "ms"], default="s")
    s.add_argument("--tokenizer", metavar="PATH", help="the server's tokenizer.json (or a directory with one): exact "
                   "random/trace prompt lengths, ShareGPT token counts, output counts without usage")
    if not sweep:
        s.add_argument("--request-rate", type=float, default=float("inf"),
                       help="requests/s (default inf: all at once)")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals (1 = Poisson)")
    s.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    if not sweep:
        s.add_argument("--ramp-up", "--ramp-up-strategy", dest="ramp_up", choices=["linear", "exponential"],
                       default=None, help="ramp the rate from --ramp-up-start-rps to --ramp-up-end-rps over the run")
        s.add_argument("--ramp-up-start-rps", type=float, default=None)
        s.add_argument("--ramp-up-end-rps", type=float, default=None)
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--goodput", nargs="+", default=None, required=sweep, metavar="METRIC:MS",
                   help="SLOs, e.g. ttft:200 tpot:50 (ms; a request is good iff it meets all)")
    s.add_argument("--percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    s.add_argument("--api-key-env", default=None, help="environment variable holding the API key (Bearer)")
    if sweep:
        s.add_argument("--out", default=None, metavar="FILE", help="the sweep JSON (every point)")
    else:
        s.add_argument("--out", default=None, metavar="FILE",
                       help="result JSON (a .requests.csv and plots beside it)")
        s.add_argument("--no-plots", action="store_true")
    s.add_argument("--no-progress", dest="progress", action="store_false")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: serve (load test), sweep (rates vs SLOs), offline (offline API)")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    s = bench_sub.add_parser("serve", help="load-test an OpenAI-compatible server (vLLM's metric definitions)")
    _add_serve_options(s)
    s.set_defaults(func=_bench_serve)

    w = bench_sub.add_parser("sweep", help="bench serve at each request rate; prints the highest rate meeting the "
                                           "goodput SLOs")
    _add_serve_options(w, sweep=True)
    w.add_argument("--rates", required=True, help="comma-separated request rates (req/s), e.g. 1,2,4,8 (inf allowed)")
    w.add_argument("--slo-attainment", type=float, default=0.9,
                   help="a rate meets the SLOs when good_requests / (completed + failed) >= this (default 0.9)")
    w.add_argument("--keep-going", action="store_true", help="run every rate, even after one misses the SLOs")
    w.set_defaults(func=_bench_sweep, no_plots=True)

    o = bench_sub.add_parser("offline", help="offline-API throughput (bench/offline.py's workload)")
    group = o.add_mutually_exclusive_group()
    group.add_argument("--model", metavar="DIR", help="a checkpoint directory")
    group.add_argument("--preset", help="write a random checkpoint of this preset to a temporary directory "
                                        "(default: small)")
    o.add_argument("--num-prompts", type=int, default=32)
    o.add_argument("--prompt-len", type=int, default=128)
    o.add_argument("--new-tokens", type=int, default=64)
    o.add_argument("--repeats", type=int, default=3, help="timed runs; the summary is their median")
    o.add_argument("--seed", type=int, default=0, help="prompt ids (and the random checkpoint's weights)")
    o.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    o.add_argument("--device", default="cpu")
    o.add_argument("--max-num-batched-tokens", type=int, default=8192)
    o.add_argument("--page-tokens", type=int, default=128)
    o.add_argument("--out", default=None, metavar="FILE", help="result JSON")
    o.set_defaults(func=_bench_offline)


def _bench_serve(args: argparse.Namespace) -> int:
    from cluster.loadtest.runner import run_benchmark

    a = {k: v for k, v in vars(args).items() if k not in ("func", "command", "bench_command")}
    try:
        result = run_benchmark(a)
    except (ValueError, OSError) as e:
        print(f"megaserve bench serve: error: {e}", file=sys.stderr)
        return 2
    return 0 if result["completed"] > 0 else 1


def _bench_sweep(args: argparse.Namespace) -> int:
    """Exit status 0 when some rate meets the SLOs, 1 when none does, 2 for bad arguments."""
    from cluster.loadtest.sweep import run_sweep

    a = {k: v for k, v in vars(args).items() if k not in ("func", "command", "bench_command")}
    try:
        sweep = run_sweep(a)
    except (ValueError, OSError) as e:
        print(f"megaserve bench sweep: error: {e}", file=sys.stderr)
        return 2
    return 0 if sweep["best_rate"] is not None else 1


def _bench_offline(args: argparse.Namespace) -> int:
    import tempfile

    from cluster.loadtest.offline import OfflineWorkload, print_offline_summary, run_offline

    try:
        workload = OfflineWorkload(args.num_prompts, args.prompt_len, args.new_tokens, args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = args.model
            if model_dir is None:
                from engine.weights.make_checkpoint import write_checkpoint

                preset = args.preset or "small"
                write_checkpoint(get_preset(preset), tmp, seed=args.seed)
                model_dir = tmp
            result = run_offline(model_dir, workload, args.repeats, dtype=args.dtype, device=args.device,
                                 max_num_batched_tokens=args.max_num_batched_tokens, page_tokens=args.page_tokens)
            if args.model is None:
                result["model"] = f"random {preset} checkpoint (seed {args.seed})"
    except (ValueError, OSError, RuntimeError) as e:
        print(f"megaserve bench offline: error: {e}", file=sys.stderr)
        return 2
    print_offline_summary(result)
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


# ---- plan ----------------------------------------------------------------------------------------------
def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="what each rank of a topology holds and how fast it will run (capacity planner)")
    p.add_argument("topology", metavar="TOPOLOGY", help="topology YAML (cuda nodes need an accelerator profile; "
                                                        "cpu nodes are planned for memory only)")
    p.add_argument("--isl", type=int, default=1024, help="input tokens per request (default 1024)")
    p.add_argument("--osl", type=int, default=1024, help="output tokens per request (default 1024)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight over the whole EP group (default: max_num_seqs x ranks)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from cluster.plan.hardware import HardwareError
    from cluster.plan.planner import from_topology, make_plan
    from cluster.plan.report import format_plan
    from cluster.topology import TopologyError, load_topology

    try:
        plan = make_plan(from_topology(load_topology(args.topology)), isl=args.isl, osl=args.osl,
                         concurrency=args.concurrency)
    except (TopologyError, HardwareError, ValueError) as e:
        print(f"megaserve plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(plan.to_dict(), indent=1) + "\n")
    else:
        print(format_plan(plan))
    return 0


# ---- up / status / down (the Ray cluster) --------------------------------------------------------------
def _add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="launch a topology's ranks on Ray and serve HTTP (foreground; --detach)")
    p.add_argument("topology", help="topology YAML, e.g. examples/local.yaml")
    p.add_argument("--detach", action="store_true", help="run in the background; return once ready")
    p.add_argument("--port", type=int, default=None, help="override server.port (0 = any free port)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the ranks")
    p.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    from cluster import service

    start = service.up_detached if args.detach else service.up
    return _on_topology("up", lambda: start(args.topology, ready_timeout_s=args.ready_timeout, port=args.port))


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="ranks, nodes, experts per rank, queue and cache use of a running `up`")
    p.add_argument("topology", help="the topology YAML given to `up`")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    from cluster import service

    return _on_topology("status", lambda: service.status(args.topology, as_json=args.json))


def _add_down(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("down", help="stop a running `up` and every process it started")
    p.add_argument("topology", help="the topology YAML given to `up`")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait before killing")
    p.set_defaults(func=_down)


def _down(args: argparse.Namespace) -> int:
    from cluster import service

    return _on_topology("down", lambda: service.down(args.topology, timeout_s=args.timeout))


def _on_topology(command: str, run: Callable[[], int]) -> int:
    """Run a topology command; a bad topology file is a one-line error and exit status 2."""
    from cluster.topology import TopologyError

    try:
        return run()
    except TopologyError as e:
        print(f"megaserve {command}: error: {e}", file=sys.stderr)
        return 2


# ---- entry point -------------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_make_checkpoint,
    _add_manifest,
    _add_bench,
    _add_plan,
    _add_up,
    _add_status,
    _add_down,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaserve", description="DeepSeek-V4 expert-parallel inference")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (2 for a bad config or checkpoint)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"megaserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader left (`megaserve status | head`): stop quietly; stdout is pointed at devnull so the
        # interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
