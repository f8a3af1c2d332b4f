"""The `megaserve` command: one subcommand per function, registered in `SUBCOMMANDS`.

    megaserve make-checkpoint --preset tiny --out /tmp/tiny --seed 0 [--no-quantize]
    megaserve manifest --preset v4-pro [--json] [--no-tensors]

To add a subcommand, write `_add_<name>(subparsers)` that builds its parser and sets `func` to a handler
`(args) -> int`, and append it to `SUBCOMMANDS`. Heavy imports stay inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence

from engine.checkpoint import CheckpointError
from engine.config import ConfigError, ModelConfig, get_preset


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
    from engine.make_checkpoint import DEFAULT_SHARD_BYTES, write_checkpoint

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
    from engine.manifest import build_manifest

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


# ---- entry point -------------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_make_checkpoint,
    _add_manifest,
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


if __name__ == "__main__":
    sys.exit(main())
