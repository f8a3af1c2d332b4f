"""Ranks for `python -m cluster.server` without Ray: one in-process engine, or N local EP rank processes.

N = 1: an LLMEngine in this process behind a RankWorker (its step loop runs in a thread).
N > 1: N spawned processes form a torch.distributed group (gloo on CPU, NCCL on CUDA), each runs an
EPEngine (engine/core/ep/engine.py) behind its own RankWorker and reports the worker's address back. Every
rank binds to `host` only. A rank process dies with this process (PR_SET_PDEATHSIG on Linux).
Every launch draws one secret (comm/auth.py), passed to the rank processes through the spawn pipe (never a
command line, file or log); the router proves it on every connection (`RankSet.secret`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from multiprocessing.connection import wait as wait_sentinels
from pathlib import Path
from typing import Any

from engine.cache.disk_config import DiskCacheConfig


@dataclass(frozen=True)
class EngineArgs:
    """engine.core.engine.EngineConfig fields the server exposes (plus the EP backend for N > 1)."""

    dtype: str = "float32"
    device: str = "cpu"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    page_tokens: int = 256
    cache_budget_bytes: int = 512 * 2**20
    max_model_len: int | None = None
    ep_backend: str = "sync"
    disk_cache: DiskCacheConfig | None = None  # kv_cache.disk of the topology
    kv_cache_dtype: str | None = None  # kv_cache.dtype of the topology (None: the model dtype)

    def engine_config(self) -> Any:
        from engine.core.engine import EngineConfig

        fields = {f.name: getattr(self, f.name) for f in dataclass_fields(self) if f.name != "ep_backend"}
        return EngineConfig(**fields)


class RankSet:
    """Running ranks: their worker addresses, a way to wait for a death, and stop()."""

    def __init__(self, addresses: list[tuple[str, int]], secret: bytes, workers: list[Any] | None = None,
                 procs: list[Any] | None = None) -> None:
        self.addresses = addresses
        self.secret = secret
        self.workers = workers or []
        self.procs = procs or []
        self._stopped = threading.Event()

    def wait_any_dead(self) -> str:
        """Block until a rank stops (or stop() is called); returns what happened."""
        if self.workers:
            while not self._stopped.is_set():
                for w in self.workers:
                    if w.wait(0.2):
                        return f"rank {w.rank} stopped: {w.failure!r}" if w.failure else f"rank {w.rank} stopped"
            return "stopped"
        sentinels = [p.sentinel for p in self.procs]
        while not self._stopped.is_set():
            ready = wait_sentinels(sentinels, timeout=0.5)
            if ready:
                dead = [p for p in self.procs if p.sentinel in ready]
                return ", ".join(f"rank process {p.name} exited with {p.exitcode}" for p in dead)
        return "stopped"

    def stop(self) -> None:
        self._stopped.set()
        for w in self.workers:
            w.stop()
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


def start_ranks(model_dir: str | Path, num_ranks: int, args: EngineArgs, host: str = "127.0.0.1",
                timeout_s: float = 600.0) -> RankSet:
    from comm.auth import new_secret

    secret = new_secret()
    if num_ranks == 1:
        from cluster.rank_server import RankWorker
        from engine.core.engine import LLMEngine

        worker = RankWorker(LLMEngine(model_dir, args.engine_config()), host, 0, secret=secret).start()
        return RankSet([worker.address], secret, workers=[worker])
    try:
        import engine.core.ep.engine  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"--ranks {num_ranks} needs the expert-parallel engine (engine.core.ep): {e}") from e
    from comm.launch import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, name=f"rank{r}", daemon=True,
                         args=(r, num_ranks, port, str(model_dir), args, host, queue, os.getpid(), secret))
             for r in range(num_ranks)]
    for p in procs:
        p.start()
    ranks = RankSet([], secret, procs=procs)
    addresses: dict[int, tuple[str, int]] = {}
    try:
        while len(addresses) < num_ranks:
            try:
                rank, ok, value = queue.get(timeout=timeout_s)
            except Exception as e:
                raise RuntimeError(f"ranks did not start within {timeout_s} s") from e
            if not ok:
                raise RuntimeError(f"rank {rank} failed to start:\n{value}")
            addresses[rank] = tuple(value)
    except BaseException:
        ranks.stop()
        raise
    ranks.addresses = [addresses[r] for r in range(num_ranks)]
    return ranks


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def _rank_main(rank: int, world_size: int, port: int, model_dir: str, args: EngineArgs, host: str, queue: Any,
               parent_pid: int, secret: bytes) -> None:
    import traceback

    import torch

    _die_with_parent(parent_pid)
    torch.set_num_threads(1)
    try:
        from cluster.rank_server import RankWorker
        from comm.group import init_process_group
        from engine.core.ep.engine import EPEngine

        init_process_group(rank, world_size, "127.0.0.1", port, args.device)
        engine = EPEngine(model_dir, args.engine_config(), rank, world_size, backend=args.ep_backend)
        worker = RankWorker(engine, host, 0, rank=rank, secret=secret).start()
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
        raise
    queue.put((rank, True, worker.address))
    worker.wait()
    worker.stop()
    os._exit(1 if worker.failure else 0)
