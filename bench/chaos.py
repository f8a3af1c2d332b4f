"""Chaos under load: kill a rank, then the driver, while `megaserve up` serves a `megaserve bench serve` load.

    python -m bench.chaos [--topology examples/local.yaml] [--out out/bench/chaos.json]

1. `megaserve up` (detached). Greedy reference outputs for --prompts distinct prompts.
2. Rank kill: `megaserve bench serve` runs in the background; --rounds rounds of the checked greedy prompts
   run meanwhile; once they are in flight, one rank actor's process is SIGKILLed by its PID (from status.json).
   The launcher restarts the EP group and the router resubmits what was in flight. Every checked request
   must come back with the reference text, or fail with a retriable error (429/503, or the connection lost).
3. Driver kill: a batch job of --batch-lines lines runs (plus a few checked requests); once some lines are
   done, the driver (`up`'s PID) is SIGKILLed. `megaserve down` cleans up what it left, `megaserve up` starts
   again on the same state directory; the job resumes. Every custom_id must appear exactly once in the
   job's output and error files. Checked requests that failed with a retriable error are retried once and
   must then match the reference.
4. `megaserve down`. The figures (kills injected, requests lost, outputs changed, retriable failures,
   batch ids missing / duplicated, recovery times) go to --out as JSON and are printed.

Exit status 0 when nothing was lost or changed and the batch came out exactly once; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import live

REPO = live.REPO


class Checked:
    """The checked interactive requests: each outcome against its greedy reference."""

    def __init__(self, base_url: str, model: str, prompts: list[list[int]], reference: list[str],
                 max_tokens: int) -> None:
        self.base_url = base_url
        self.model = model
        self.prompts = prompts
        self.reference = reference
        self.max_tokens = max_tokens
        self.outcomes: Counter[str] = Counter()
        self.retry_later: list[int] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def one(self, i: int, stream: bool = False) -> str:
        body = live.completion_body(self.model, self.prompts[i], self.max_tokens)
        if stream:
            r = live.stream_completion(self.base_url, body)
            text = r.body.get("text") if r.ok else None
        else:
            r = live.call(self.base_url, "POST", "/v1/completions", body)
            text = r.body["choices"][0]["text"] if r.ok else None
        if r.ok:
            kind = "same" if text == self.reference[i] else "changed"
        elif r.retriable:
            kind = "retriable"
        else:
            kind = "lost"
        with self._lock:
            self.outcomes[kind] += 1
            if kind == "retriable":
                self.retry_later.append(i)
            if kind in ("changed", "lost", "retriable"):
                self.errors.append(f"prompt {i}: {kind}: HTTP {r.status}: "
                                   f"{r.error() if not r.ok else repr(text)[:120]}")
        return kind

    def round(self, pool: ThreadPoolExecutor, stream_every: int = 2) -> list[Any]:
        return [pool.submit(self.one, i, i % stream_every == 0) for i in range(len(self.prompts))]


def _wait_generation(topology: Path, generation: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            st = live.status(topology, timeout_s=5)
        except RuntimeError:
            st = {}
        if st.get("generation", -1) >= generation:
            return st
        time.sleep(0.5)
    raise RuntimeError(f"the EP group did not restart (generation {generation}) within {timeout_s:g}s")


def _bench_serve(base_url: str, model: str, out: Path, num_prompts: int, rate: float, vocab: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "bench", "serve", "--base-url", base_url, "--model", model,
         "--num-prompts", str(num_prompts), "--request-rate", str(rate), "--random-input-len", "24",
         "--random-output-len", "12", "--random-token-ids", "--vocab-size", str(vocab), "--ignore-eos",
         "--out", str(out), "--no-plots", "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _bench_figures(proc: subprocess.Popen, out: Path, timeout_s: float) -> dict[str, Any]:
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        return {"error": f"bench serve did not finish within {timeout_s:g}s", "log_tail": log[-2000:]}
    if proc.returncode != 0 or not out.exists():
        return {"error": f"bench serve exited with {proc.returncode}", "log_tail": log[-2000:]}
    res = json.loads(out.read_text())
    errors = [e for e in res.get("errors", []) if e]
    retriable = sum(1 for e in errors if any(s in e for s in ("503", "429", "onnect", "isconnect", "eset")))
    return {"completed": res["completed"], "failed": res["failed"], "failed_retriable": retriable,
            "failed_other": len(errors) - retriable, "first_errors": sorted(set(errors))[:5]}


def run(topology: Path, out: Path | None = None, n_prompts: int = 8, rounds: int = 3, max_tokens: int = 24,
        load_prompts: int = 40, load_rate: float = 3.0, batch_lines: int = 40, ready_timeout_s: float = 300.0,
        kill_rank: int = 1) -> dict[str, Any]:
    """The whole chaos run (steps 1-4 of the module doc); returns the figures."""
    from cluster.topology import load_topology

    topo = load_topology(topology)
    t_start = time.monotonic()
    figures: dict[str, Any] = {"topology": str(topology), "kills": [], "world_size": topo.world_size}
    state = live.up(topology, ready_timeout_s)
    started = True
    try:
        base = state["http"]
        model = live.call(base, "GET", "/v1/models").body["data"][0]["id"]
        vocab = json.loads((Path(topo.model.path) / "config.json").read_text())["vocab_size"]
        prompts = live.prompts(n_prompts, vocab)
        ref = []
        for p in prompts:
            r = live.call(base, "POST", "/v1/completions", live.completion_body(model, p, max_tokens))
            if not r.ok:
                raise RuntimeError(f"reference request failed: {r.status} {r.error()}")
            ref.append(r.body["choices"][0]["text"])
        checked = Checked(base, model, prompts, ref, max_tokens)

        # ---- 2. a rank's process, SIGKILLed under load ----
        st = live.status(topology)
        gen0 = int(st["generation"])
        victim = next(r for r in st["ranks"] if r["rank"] == kill_rank % topo.world_size)
        with tempfile.TemporaryDirectory() as tmp:
            bench_out = Path(tmp) / "bench.json"
            bench = _bench_serve(base, model, bench_out, load_prompts, load_rate, vocab)
            with ThreadPoolExecutor(max_workers=2 * n_prompts) as pool:
                futures = checked.round(pool)
                time.sleep(1.0)  # the first round is in flight
                os.kill(int(victim["pid"]), signal.SIGKILL)
                killed_at = time.monotonic()
                for _ in range(rounds - 1):
                    futures += checked.round(pool)
                    time.sleep(0.5)
                _wait_generation(topology, gen0 + 1, ready_timeout_s)
                restart_s = time.monotonic() - killed_at  # kill -> a new generation serves (status.json)
                for f in futures:
                    f.result()
            time.sleep(2 * topo.health.ping_interval_s)  # status.json lists the recovery by now
            st = live.status(topology)
            rec = st["recoveries"][-1] if st.get("recoveries") else {}
            figures["kills"].append({"what": f"rank {victim['rank']} actor process", "pid": victim["pid"],
                                     "signal": "SIGKILL", "restart_s": round(restart_s, 2),
                                     "recovery_s": rec.get("recovery_s"), "reason": rec.get("reason")})
            figures["bench_serve_during_rank_kill"] = _bench_figures(bench, bench_out, ready_timeout_s + 300)

        # ---- 3. the driver, SIGKILLed during a batch job ----
        lines = [{"custom_id": f"chaos-{i}", "method": "POST", "url": "/v1/completions",
                  "body": live.completion_body(model, prompts[i % n_prompts], max_tokens)}
                 for i in range(batch_lines)]
        fid = live.upload_batch_file(base, lines)
        r = live.call(base, "POST", "/v1/batches", {"input_file_id": fid, "endpoint": "/v1/completions",
                                                    "completion_window": "24h"})
        if not r.ok:
            raise RuntimeError(f"batch create failed: {r.status} {r.error()}")
        bid = r.body["id"]
        deadline = time.monotonic() + ready_timeout_s
        done_before = 0
        while time.monotonic() < deadline:
            b = live.call(base, "GET", f"/v1/batches/{bid}").body
            done_before = b["request_counts"]["completed"] + b["request_counts"]["failed"]
            if done_before >= max(1, batch_lines // 5) or b["status"] in ("completed", "failed"):
                break
            time.sleep(0.2)
        with ThreadPoolExecutor(max_workers=n_prompts) as pool:
            futures = checked.round(pool)
            time.sleep(0.3)
            driver_pid = int(state["pid"])
            os.kill(driver_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            for f in futures:
                f.result()
        started = False
        live.down(topology)  # what the killed driver left behind (Ray, ranks)
        state = live.up(topology, ready_timeout_s)
        started = True
        base = state["http"]
        restart_s = time.monotonic() - killed_at
        checked.base_url = base
        deadline = time.monotonic() + ready_timeout_s + 10 * batch_lines
        while time.monotonic() < deadline:
            b = live.call(base, "GET", f"/v1/batches/{bid}").body
            if b["status"] in ("completed", "failed", "cancelled", "expired"):
                break
            time.sleep(0.5)
        out_lines = live.file_lines(base, b.get("output_file_id")) + live.file_lines(base, b.get("error_file_id"))
        seen = Counter(x["custom_id"] for x in out_lines)
        want = {x["custom_id"] for x in lines}
        batch_texts_changed = sum(1 for x in out_lines if x["response"]["status_code"] == 200 and
                                  x["response"]["body"]["choices"][0]["text"] !=
                                  ref[int(x["custom_id"].split("-")[1]) % n_prompts])
        figures["kills"].append({"what": "driver (megaserve up)", "pid": driver_pid, "signal": "SIGKILL",
                                 "restart_s": round(restart_s, 2), "batch_lines_done_before_kill": done_before})
        figures["batch"] = {"id": bid, "status": b["status"], "lines": batch_lines,
                            "ok": sum(1 for x in out_lines if x["response"]["status_code"] == 200),
                            "missing": len(want - set(seen)), "duplicated": sum(1 for v in seen.values() if v > 1),
                            "unexpected": len(set(seen) - want), "outputs_changed": batch_texts_changed}

        # ---- retry what failed retriably: it must now match ----
        retries = sorted(set(checked.retry_later))
        checked.retry_later = []
        retried = Counter(checked.one(i) for i in retries)
        figures["interactive"] = {
            "requests": sum(checked.outcomes.values()) - sum(retried.values()),
            "same_output": checked.outcomes["same"] - retried["same"],
            "outputs_changed": checked.outcomes["changed"],
            "failed_retriable": checked.outcomes["retriable"] - retried["retriable"],
            "lost": checked.outcomes["lost"],
            "retried_same": retried["same"], "retried_failed": len(retries) - retried["same"],
            "errors": checked.errors[:20],
        }
    finally:
        if started:
            live.down(topology)
    figures["seconds"] = round(time.monotonic() - t_start, 1)
    figures["summary"] = summarize(figures)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2))
    return figures


def summarize(f: dict[str, Any]) -> dict[str, Any]:
    it, b = f.get("interactive", {}), f.get("batch", {})
    bench = f.get("bench_serve_during_rank_kill", {})
    lost = it.get("lost", 0) + it.get("retried_failed", 0) + bench.get("failed_other", 0)
    changed = it.get("outputs_changed", 0) + b.get("outputs_changed", 0)
    batch_ok = b.get("missing", 1) == 0 and b.get("duplicated", 1) == 0 and b.get("unexpected", 1) == 0
    return {"kills_injected": len(f.get("kills", [])), "interactive_requests": it.get("requests", 0),
            "bench_serve_requests": bench.get("completed", 0) + bench.get("failed", 0),
            "requests_lost": lost, "outputs_changed": changed,
            "failed_retriable": it.get("failed_retriable", 0) + bench.get("failed_retriable", 0),
            "batch_lines": b.get("lines", 0), "batch_missing": b.get("missing"),
            "batch_duplicated": b.get("duplicated"), "passed": lost == 0 and changed == 0 and batch_ok}


def print_figures(f: dict[str, Any]) -> None:
    s = f["summary"]
    print(f"chaos: {s['kills_injected']} kills injected ({', '.join(k['what'] for k in f['kills'])}); "
          f"{s['interactive_requests']} checked + {s['bench_serve_requests']} bench serve requests: "
          f"{s['requests_lost']} lost, {s['outputs_changed']} outputs changed, {s['failed_retriable']} failed "
          f"retriably; batch {s['batch_lines']} lines: {s['batch_missing']} missing, {s['batch_duplicated']} "
          f"duplicated; {f['seconds']}s")
    for k in f["kills"]:
        print(f"  kill {k['what']} (pid {k['pid']}): serving again after {k['restart_s']}s")
    for e in f.get("interactive", {}).get("errors", [])[:10]:
        print(f"  {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    p.add_argument("--topology", type=Path, default=REPO / "examples" / "local.yaml")
    p.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "chaos.json")
    p.add_argument("--prompts", type=int, default=8, help="distinct checked greedy prompts")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the checked prompts around the rank kill")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--load-prompts", type=int, default=40, help="requests of the background bench serve load")
    p.add_argument("--load-rate", type=float, default=3.0, help="their rate (requests/s)")
    p.add_argument("--batch-lines", type=int, default=40)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    f = run(a.topology, a.out, a.prompts, a.rounds, a.max_tokens, a.load_prompts, a.load_rate, a.batch_lines,
            a.ready_timeout)
    print_figures(f)
    print(f"figures in {a.out}")
    return 0 if f["summary"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
