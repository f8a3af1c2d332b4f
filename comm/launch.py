"""Run a function on N local ranks without Ray: spawned processes joined in one torch.distributed group.

Public API:
    run_ranks(fn, world_size, *args, device="cpu", timeout_s=120.0) -> list   (result of rank r at index r)
    RankError                                                             (a rank raised; .rank, .remote_traceback)
    MissingMainGuardError                     (the calling script lacks `if __name__ == "__main__":`)
    free_port(host="127.0.0.1") -> int

``fn(rank, world_size, *args)`` runs in a fresh ``spawn`` process per rank after the default process group
is formed on a free TCP port of 127.0.0.1 (gloo for ``device="cpu"``, NCCL for ``device="cuda"``, one GPU
per rank; see comm.group). ``fn`` and ``args`` must be picklable (module-level function). Each rank runs with
``torch.set_num_threads(1)``. Results are pickled back by value; CUDA tensors inside lists/tuples/dicts come
back on the CPU.

Failure handling: the first rank that raises makes run_ranks terminate every rank and raise ``RankError``
naming that rank and carrying its traceback; a rank that dies without reporting (killed, segfault) raises
RankError too; a script that calls run_ranks at its top level, outside ``if __name__ == "__main__":``, gets
``MissingMainGuardError`` (each spawned rank re-imports the script and would call run_ranks again; the ranks
notice it and exit with ``NO_MAIN_GUARD_EXIT``). Passing ``timeout_s`` terminates every rank and raises
``TimeoutError``. Ranks also die with the parent (PR_SET_PDEATHSIG on Linux), and their collectives time out
after ``timeout_s``, so no process is left behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue as queue_mod
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from comm.group import backend_for, destroy_process_group, init_process_group

_JOIN_GRACE_S = 10.0
NO_MAIN_GUARD_EXIT = 86  # a spawned rank's exit status when it found itself re-running the parent's script


class RankError(RuntimeError):
    """A rank raised (or died) inside run_ranks; ``remote_traceback`` is the rank's formatted traceback."""

    def __init__(self, rank: int, world_size: int, remote_traceback: str):
        self.rank = rank
        self.world_size = world_size
        self.remote_traceback = remote_traceback
        super().__init__(f"rank {rank} of {world_size} failed:\n{remote_traceback}")

    def __reduce__(self):
        return (RankError, (self.rank, self.world_size, self.remote_traceback))


class MissingMainGuardError(RuntimeError):
    """The script that called run_ranks has no `if __name__ == "__main__":` guard around the call."""

    def __init__(self, script: str | None):
        where = f"{script} calls" if script else "the calling script calls"
        super().__init__(f"{where} run_ranks/run_engine_group at import time: its ranks are spawned processes that "
                         f"re-import the script, so put the call under `if __name__ == \"__main__\":`")


def _main_script() -> str | None:
    main = sys.modules.get("__main__")
    return getattr(main, "__file__", None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, list):
        return [_to_cpu(o) for o in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, device: str, timeout_s: float,
               results: Any, parent_pid: int, args: tuple) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # parent already gone before prctl took effect
        os._exit(1)
    torch.set_num_threads(1)
    try:
        init_process_group(rank, world_size, "127.0.0.1", port, device, timeout_s=timeout_s)
        out = fn(rank, world_size, *args)
        payload = pickle.dumps(_to_cpu(out), protocol=pickle.HIGHEST_PROTOCOL)
        results.put((rank, True, payload))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            destroy_process_group()


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5.0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, device: str = "cpu",
              timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return the per-rank results."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # NOTE: we are a spawned child still importing the parent's main script (spawn re-imports it), and that
        # script called us at its top level. Starting ranks from here would fail deep in multiprocessing; exit
        # with a status the parent turns into MissingMainGuardError.
        os._exit(NO_MAIN_GUARD_EXIT)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if backend_for(device) == "nccl":  # rejects unsupported devices before spawning anything
        n_gpu = torch.cuda.device_count()
        if world_size > n_gpu:
            raise ValueError(f"world_size={world_size} ranks on device={device!r} need one GPU each; "
                             f"{n_gpu} visible")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    pctx = mp.start_processes(
        _rank_main,
        args=(fn, world_size, port, str(device), float(timeout_s), results, os.getpid(), args),
        nprocs=world_size,
        join=False,
        daemon=True,
        start_method="spawn",
    )
    procs = list(pctx.processes)
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(got))
                raise TimeoutError(f"run_ranks: rank(s) {missing} of {world_size} did not finish within {timeout_s}s")
            try:
                rank, ok, payload = results.get(timeout=min(0.2, remaining))
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if r not in got and p.exitcode is not None:
                        # It may have reported just before exiting: give the pipe a moment.
                        try:
                            rank, ok, payload = results.get(timeout=1.0)
                        except queue_mod.Empty:
                            if p.exitcode == NO_MAIN_GUARD_EXIT:
                                raise MissingMainGuardError(_main_script()) from None
                            raise RankError(r, world_size, f"process exited with code {p.exitcode} "
                                            "without reporting a result") from None
                        break
                else:
                    continue
            if not ok:
                raise RankError(rank, world_size, payload)
            got[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout=_JOIN_GRACE_S)
    finally:
        _stop(procs)
        results.close()
        results.join_thread()
    return [got[r] for r in range(world_size)]
