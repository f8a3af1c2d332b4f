"""`python -m cluster.server --model DIR`: serve a checkpoint over the OpenAI API without Ray.

--ranks 1 (default) runs one LLMEngine in this process behind a RankWorker (its step loop in a thread);
--ranks N > 1 starts N local rank processes running the expert-parallel engine (cluster/server/ranks.py).
The frontend then reaches the ranks only through the wire protocol, exactly as under `megaserve up`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from cluster.server.settings import DEFAULT_MAX_BODY_BYTES, ServerSettings
from comm.backends.registry import backend_names
from engine.model.config import MODEL_DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.server", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="checkpoint directory (config.json, tokenizer.json)")
    p.add_argument("--topology", type=Path, default=None,
                   help="take model, ranks (world size, all local), scheduler, KV budget, EP backend and server "
                        "settings from a topology YAML; explicit flags below still override host/port/state dir")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (printed on start)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="batch job state (SQLite, files); default ~/.megaserve/server/<served model name>")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key (Bearer)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--page-tokens", type=int, default=256)
    p.add_argument("--kv-cache-bytes", type=int, default=512 * 2**20)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="chat requests without max_tokens generate at most this many (default: the context left)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--ep-backend", default="sync", choices=backend_names(),
                   help="EP dispatch backend for --ranks > 1 (comm.backends.registry)")
    args = p.parse_args(argv)
    if args.topology is None and args.model is None:
        p.error("one of --model or --topology is required")
    if args.ranks < 1:
        p.error(f"--ranks must be >= 1, got {args.ranks}")
    return args


def _explicit(argv: list[str] | None, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in (sys.argv[1:] if argv is None else argv))


def apply_topology(args: argparse.Namespace, argv: list[str] | None) -> ServerSettings:
    """Fill args from --topology (flags given on the command line win for host, port and state dir)."""
    from cluster.topology import load_topology

    topo = load_topology(args.topology)
    if topo.model.path is None:
        raise ValueError(f"{args.topology}: model.path is required to serve")
    if args.model is None:
        args.model = topo.model.path
    args.ranks = topo.world_size
    args.dtype = topo.model.dtype
    args.device = topo.nodes[0].device
    sch = topo.scheduler
    args.max_num_seqs, args.max_num_batched_tokens, args.page_tokens = (sch.max_num_seqs, sch.max_num_batched_tokens,
                                                                        sch.page_tokens)
    args.max_model_len = sch.max_model_len or args.max_model_len
    if topo.kv_cache.budget_bytes is not None:
        args.kv_cache_bytes = topo.kv_cache.budget_bytes
    args.ep_backend = topo.parallel.ep_backend
    args.kv_disk = topo.kv_cache.disk
    args.kv_dtype = topo.kv_cache.dtype
    flags = (("host", "--host"), ("port", "--port"), ("state_dir", "--state-dir"), ("api_key_env", "--api-key-env"),
             ("max_body_bytes", "--max-body-bytes"))
    overrides = {k: getattr(args, k) for k, flag in flags if _explicit(argv, flag)}
    if args.served_model_name:
        overrides["model_name"] = args.served_model_name
    return ServerSettings.from_topology(topo, **overrides)


async def run(args: argparse.Namespace, settings: ServerSettings) -> int:
    """Serve until SIGINT/SIGTERM (exit code 0) or until a rank dies (1)."""
    from cluster.router import Router
    from cluster.server.app import build_app, serve
    from cluster.server.openai_api import ModelInfo, OpenAIService
    from cluster.server.ranks import EngineArgs, start_ranks
    from engine.weights.tokenizer import load_tokenizer

    engine_args = EngineArgs(dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
                             max_num_batched_tokens=args.max_num_batched_tokens, page_tokens=args.page_tokens,
                             cache_budget_bytes=args.kv_cache_bytes, max_model_len=args.max_model_len,
                             ep_backend=args.ep_backend, disk_cache=getattr(args, "kv_disk", None),
                             kv_cache_dtype=getattr(args, "kv_dtype", None))
    info = ModelInfo.from_checkpoint(args.model, settings.model_name or args.model.resolve().name, args.max_model_len)
    tokenizer = load_tokenizer(args.model)
    # Local ranks listen on loopback only, whatever interface the HTTP server is exposed on.
    ranks = await asyncio.to_thread(start_ranks, args.model, args.ranks, engine_args, "127.0.0.1")
    router = None
    runner = None
    code = 0
    try:
        router = await Router(ranks.addresses, affinity_tokens=args.page_tokens, secret=ranks.secret).start()
        service = OpenAIService(router, tokenizer, info, default_max_tokens=args.default_max_tokens)
        app = build_app(service, settings)
        runner, port = await serve(app, settings.host, settings.port)
        print(f"megaserve: serving {info.name!r} on http://{settings.host}:{port} ({args.ranks} rank(s))", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        dead = asyncio.create_task(asyncio.to_thread(ranks.wait_any_dead))
        done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), dead], return_when=asyncio.FIRST_COMPLETED)
        if dead in done:
            print(f"megaserve: a rank died ({dead.result()}); shutting down", file=sys.stderr, flush=True)
            code = 1
    finally:
        if runner is not None:
            await runner.cleanup()
        if router is not None:
            await router.close()
        await asyncio.to_thread(ranks.stop)
    return code


def checkpoint_problem(model: Path) -> str | None:
    """Why `model` cannot be served (no such directory, no config.json or tokenizer.json), or None."""
    if not model.is_dir():
        return f"--model {model}: no such directory"
    missing = [name for name in ("config.json", "tokenizer.json") if not (model / name).is_file()]
    if missing:
        return f"--model {model}: not a checkpoint (no {' or '.join(missing)})"
    return None


def main(argv: list[str] | None = None) -> int:
    from cluster.service import port_in_use
    from engine.model.config import ConfigError
    from engine.weights.checkpoint import CheckpointError

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.topology is not None:
            settings = apply_topology(args, argv)
        else:
            name = args.served_model_name or args.model.resolve().name
            state_dir = args.state_dir or Path.home() / ".megaserve" / "server" / name
            settings = ServerSettings(host=args.host, port=args.port, api_key_env=args.api_key_env,
                                      state_dir=state_dir, max_body_bytes=args.max_body_bytes,
                                      model_name=args.served_model_name)
        settings.api_key()  # a named but unset key variable is an error now, not an open server
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = checkpoint_problem(Path(args.model))
    if problem is None and (busy := port_in_use(settings.host, settings.port)):  # before any rank starts
        problem = f"--port: {busy} (another server?); choose another, or --port 0 for any free one"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    try:
        return (uvloop.run if uvloop is not None else asyncio.run)(run(args, settings))
    except (ConfigError, CheckpointError) as e:
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
