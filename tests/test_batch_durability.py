"""Durability: kill -9 the server in the middle of a 200-request batch, start it again on the same state
directory; the job completes with 200 distinct custom_ids, none duplicated, none lost. A graceful stop
(SIGTERM) mid-job first shows that a normal restart records no request as failed."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_client import chat_line, free_port, start_server, stop_server

from cluster import Client

N = 200


def _written(path) -> list[str]:
    return [json.loads(x)["custom_id"] for x in path.read_bytes().split(b"\n")[:-1]]  # a torn tail is cut


@pytest.mark.slow
def test_batch_survives_sigterm_and_kill_9(tiny_ckpt, tmp_path):
    state = tmp_path / "state"
    port = free_port()
    proc = start_server(tiny_ckpt, state, port)
    client = Client(f"http://127.0.0.1:{port}")
    lines = [chat_line(f"req-{i:03d}", f"durable {i}", max_tokens=2, model=client.default_model) for i in range(N)]
    job = client.submit_batch(lines)
    out_path = state / "batches" / job.id / "output.jsonl"
    before: list[str] = []
    # SIGTERM (graceful) once 10 are done, then, after a restart, kill -9 once 60 are done
    for sig, at in ((signal.SIGTERM, 10), (signal.SIGKILL, 60)):
        try:
            while (st := job.status()).completed + st.failed < at:
                assert proc.poll() is None and not st.done, st
                time.sleep(0.02)
            proc.send_signal(sig)  # SIGKILL: no cleanup, no flush; whatever is on disk is what survives
            proc.wait(30)
        finally:
            stop_server(proc)
        now = _written(out_path)
        assert now[:len(before)] == before and at <= len(now) < N, f"stopped after {len(now)} of {N}: not mid-job"
        before = now
        # the client waits through the restart: it polls a server that is down, then up again
        waiter = ThreadPoolExecutor(1).submit(job.wait, progress=False, poll_s=0.1, timeout=120)
        proc = start_server(tiny_ckpt, state, port)  # same state dir: the job resumes on start-up
    try:
        st = waiter.result(130)
        assert st.status == "completed" and (st.total, st.completed, st.failed) == (N, N, 0), st
        results = list(job.results())
    finally:
        stop_server(proc)
    counts = Counter(r.custom_id for r in results)
    assert len(results) == N and set(counts) == {f"req-{i:03d}" for i in range(N)}
    assert max(counts.values()) == 1
    assert all(r.ok and r.body["usage"]["completion_tokens"] <= 2 for r in results)
    # what was written before each stop is still there, unchanged, at the head of the file
    assert _written(out_path)[:len(before)] == before and len(_written(out_path)) == N
