"""cluster.service's process bookkeeping (psutil): descendants with create times, a reused PID told apart."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from cluster.service import _same_process, pid_alive, process_tree


def test_process_tree_sees_grandchildren_and_tells_a_reused_pid_apart():
    # a child that starts a grandchild and waits on it
    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not process_tree(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (grandchild, _), = process_tree(child.pid)
        created = {int(p): t for p, t in process_tree(os.getpid())}
        assert {child.pid, grandchild} <= set(created)
        assert all(pid_alive(p) and _same_process(p, created[p]) for p in (child.pid, grandchild))
        assert not _same_process(child.pid, created[child.pid] + 1.0)  # another process under the same PID
    finally:
        for p, _ in process_tree(child.pid):
            os.kill(p, 9)
        child.kill()
        child.wait()
    assert not pid_alive(child.pid) and not _same_process(child.pid, created[child.pid])
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(grandchild) and process_tree(child.pid) == []
    assert not pid_alive(0) and not pid_alive(-1)
