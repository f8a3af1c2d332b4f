"""comm.launch.run_ranks / comm.group: results per rank, errors with rank + traceback, no orphans."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from comm.group import backend_for, rank_device
from comm.launch import RankError, free_port, run_ranks


def _sum_ranks(rank: int, world_size: int, scale: int) -> dict:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world_size, "sum": t * scale, "backend": dist.get_backend(),
            "threads": torch.get_num_threads()}


def _record_pid(pid_dir: str, rank: int) -> None:
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))


def _fail_on_one(rank: int, world_size: int, pid_dir: str) -> None:
    _record_pid(pid_dir, rank)
    dist.barrier()
    if rank == 1:
        raise ValueError("boom from the test")
    dist.all_reduce(torch.ones(1))  # peers block here until the parent terminates them
    time.sleep(60)


def _sleep_forever(rank: int, world_size: int, pid_dir: str) -> None:
    _record_pid(pid_dir, rank)
    time.sleep(600)


def _die_hard(rank: int, world_size: int) -> None:
    if rank == 0:
        os._exit(3)
    time.sleep(600)


def _assert_all_gone(pid_dir: Path, n: int, all_started: bool = True) -> None:
    import multiprocessing

    pids = [int(p.read_text()) for p in sorted(pid_dir.glob("*.pid"))]
    assert len(pids) == n if all_started else len(pids) <= n
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert multiprocessing.active_children() == []


def test_backend_follows_device():
    assert backend_for("cpu") == "gloo"
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for("cuda") == "nccl"
    assert backend_for("cuda:1") == "nccl"
    assert rank_device(3, "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="meta"):
        backend_for("meta")
    with pytest.raises(ValueError, match="not a valid torch device"):
        backend_for("tpu-ish")


def test_bad_arguments_fail_before_spawning():
    with pytest.raises(ValueError, match="world_size"):
        run_ranks(_sum_ranks, 0, 1)
    with pytest.raises(ValueError, match="timeout_s"):
        run_ranks(_sum_ranks, 2, 1, timeout_s=0)
    with pytest.raises(ValueError, match="meta"):
        run_ranks(_sum_ranks, 2, 1, device="meta")


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_results_per_rank_on_gloo():
    out = run_ranks(_sum_ranks, 3, 2, timeout_s=60)
    assert [o["rank"] for o in out] == [0, 1, 2]
    for o in out:
        assert o["world"] == 3
        assert o["backend"] == "gloo"
        assert o["threads"] == 1
        assert torch.equal(o["sum"], torch.tensor([12.0]))  # (1 + 2 + 3) * 2


def test_rank_exception_reraised_with_rank_and_traceback(tmp_path):
    with pytest.raises(RankError) as ei:
        run_ranks(_fail_on_one, 3, str(tmp_path), timeout_s=60)
    err = ei.value
    assert err.rank == 1
    assert "rank 1 of 3" in str(err)
    assert "ValueError: boom from the test" in err.remote_traceback
    assert "_fail_on_one" in err.remote_traceback
    _assert_all_gone(tmp_path, 3)


def test_timeout_kills_every_rank(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0, 1\]"):
        run_ranks(_sleep_forever, 2, str(tmp_path), timeout_s=6)
    assert time.monotonic() - t0 < 30
    _assert_all_gone(tmp_path, 2, all_started=False)  # on a busy machine a rank may not have started yet


def test_rank_dying_without_result_is_reported():
    with pytest.raises(RankError, match="exited with code 3") as ei:
        run_ranks(_die_hard, 2, timeout_s=60)
    assert ei.value.rank == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpus_is_refused_before_spawning():
    with pytest.raises(ValueError, match="need one GPU each"):
        run_ranks(_sum_ranks, 2, 1, device="cuda")


_UNGUARDED_SCRIPT = """
from comm.launch import run_ranks


def rank_id(rank, world_size):
    return rank


print(run_ranks(rank_id, 2, timeout_s=60))
"""


def test_script_without_main_guard_gets_one_clear_line(tmp_path):
    """Pasted into a script without `if __name__ == "__main__":`, run_ranks says so instead of 'exited with code 1'."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("comm.launch.MissingMainGuardError: ") and str(script) in last, r.stderr
    assert 'if __name__ == "__main__":' in last
    assert "without reporting a result" not in r.stderr

    guarded = tmp_path / "guarded.py"
    guarded.write_text(_UNGUARDED_SCRIPT.replace("print(run_ranks", 'if __name__ == "__main__":\n    print(run_ranks'))
    r = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[0, 1]"
