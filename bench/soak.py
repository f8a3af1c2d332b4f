"""Soak: steady mixed load on `megaserve up` for N minutes, and what it does to the processes over time.

    python -m bench.soak --minutes 5 --out out/bench/soak.json [--topology examples/local.yaml]

Load (threads, each one request at a time, paced): chat completions, streaming completions, and a batch job
every --batch-every-s seconds (--batch-lines lines; its custom_ids are checked exactly once, then its files
are deleted so storage does not grow). Every --sample-every-s seconds the load pauses until nothing is in
flight, and a sample is taken: resident memory (RSS) and open file descriptors of the driver and of every
rank process (PIDs from status.json), KV pages still in use on each rank (idle: anything above 0 is
leaked), and the errors and requests so far. The JSON has every sample and a summary: RSS drift (last idle
sample minus the first, per process), fd drift, leaked pages, errors by kind.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import live

REPO = live.REPO


class Load:
    """The paced load threads and their counters; `pause()` / `resume()` around a sample."""

    def __init__(self, base_url: str, model: str, vocab: int, batch_lines: int, batch_every_s: float,
                 pace_s: float) -> None:
        self.base_url = base_url
        self.model = model
        self.prompts = live.prompts(16, vocab, seed=3)
        self.batch_lines = batch_lines
        self.batch_every_s = batch_every_s
        self.pace_s = pace_s
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_examples: list[str] = []
        self.batch_jobs = Counter()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._inflight = 0
        self._cv = threading.Condition()
        self._threads: list[threading.Thread] = []

    # ---- pacing ----
    def _enter(self) -> bool:
        self._running.wait()
        with self._cv:
            if self._stop.is_set():
                return False
            self._inflight += 1
            return True

    def _leave(self) -> None:
        with self._cv:
            self._inflight -= 1
            self._cv.notify_all()

    def pause(self, timeout_s: float = 600.0) -> bool:
        """Stop starting requests and wait until none is in flight; False if that took over `timeout_s`."""
        self._running.clear()
        with self._cv:
            return self._cv.wait_for(lambda: self._inflight == 0, timeout_s)

    def resume(self) -> None:
        self._running.set()

    def _record(self, kind: str, r: live.Reply) -> None:
        self.requests[kind] += 1
        if not r.ok:
            key = f"{kind}: HTTP {r.status}" if r.status else f"{kind}: no answer"
            self.errors[key] += 1
            if len(self.error_examples) < 20:
                self.error_examples.append(f"{time.strftime('%H:%M:%S')} {key}: {r.error()}")

    # ---- workers ----
    def _chat(self) -> None:
        i = 0
        while not self._stop.is_set():
            if not self._enter():
                return
            try:
                body = {"model": self.model, "max_tokens": 12, "temperature": 0.7, "seed": i,
                        "messages": [{"role": "user", "content": f"soak message {i}: tell me something"}]}
                self._record("chat", live.call(self.base_url, "POST", "/v1/chat/completions", body))
            finally:
                self._leave()
            i += 1
            self._stop.wait(self.pace_s)

    def _stream(self) -> None:
        i = 0
        while not self._stop.is_set():
            if not self._enter():
                return
            try:
                body = live.completion_body(self.model, self.prompts[i % len(self.prompts)], 16)
                self._record("stream", live.stream_completion(self.base_url, body))
            finally:
                self._leave()
            i += 1
            self._stop.wait(self.pace_s)

    def _batch(self) -> None:
        n = 0
        while not self._stop.wait(self.batch_every_s if n else 1.0):
            if not self._enter():
                return
            try:
                self._one_batch(n)
            finally:
                self._leave()
            n += 1

    def _one_batch(self, n: int) -> None:
        lines = [{"custom_id": f"soak-{n}-{i}", "method": "POST", "url": "/v1/completions",
                  "body": live.completion_body(self.model, self.prompts[i % len(self.prompts)], 8)}
                 for i in range(self.batch_lines)]
        try:
            fid = live.upload_batch_file(self.base_url, lines)
        except RuntimeError as e:
            self.errors["batch: upload"] += 1
            self.error_examples.append(str(e))
            return
        r = live.call(self.base_url, "POST", "/v1/batches", {"input_file_id": fid, "endpoint": "/v1/completions",
                                                             "completion_window": "24h"})
        self._record("batch create", r)
        if not r.ok:
            return
        bid = r.body["id"]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            b = live.call(self.base_url, "GET", f"/v1/batches/{bid}")
            if b.ok and b.body["status"] in ("completed", "failed", "cancelled", "expired"):
                break
            time.sleep(0.5)
        else:
            self.errors["batch: not finished in 600s"] += 1
            return
        body = b.body
        got = Counter(x["custom_id"] for x in live.file_lines(self.base_url, body.get("output_file_id")) +
                      live.file_lines(self.base_url, body.get("error_file_id")))
        exact = body["status"] == "completed" and set(got) == {x["custom_id"] for x in lines} and \
            all(v == 1 for v in got.values())
        self.batch_jobs["exactly_once" if exact else "wrong"] += 1
        self.batch_jobs["lines_failed"] += body["request_counts"]["failed"]
        for f in (fid, body.get("output_file_id"), body.get("error_file_id")):
            if f:
                live.call(self.base_url, "DELETE", f"/v1/files/{f}")

    def start(self) -> None:
        for fn in (self._chat, self._stream, self._batch):
            t = threading.Thread(target=fn, name=f"soak-{fn.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        for t in self._threads:
            t.join(600)


def sample(topology: Path, driver_pid: int, load: Load, t0: float) -> dict[str, Any]:
    time.sleep(2.5)  # status.json is rewritten every ping interval: let it see the idle ranks
    st = live.status(topology)
    procs = {"driver": driver_pid, **{f"rank{r['rank']}": int(r["pid"]) for r in st["ranks"]}}
    return {"t_s": round(time.monotonic() - t0, 1), "generation": st.get("generation"),
            "rss_mib": {k: round((live.rss_bytes(p) or 0) / 2**20, 1) for k, p in procs.items()},
            "open_fds": {k: live.open_fds(p) for k, p in procs.items()},
            "pids": procs,
            "pages_in_use_idle": {f"rank{r['rank']}": r["stats"].get("pages_used") for r in st["ranks"]},
            "pages_cached": {f"rank{r['rank']}": r["stats"].get("pages_cached") for r in st["ranks"]},
            "requests": dict(load.requests), "errors": dict(load.errors), "batch_jobs": dict(load.batch_jobs)}


def summarize(samples: list[dict[str, Any]], minutes: float) -> dict[str, Any]:
    first, last = samples[0], samples[-1]
    same_pids = {k for k in first["pids"] if first["pids"][k] == last["pids"].get(k)}
    drift = {k: round(last["rss_mib"][k] - first["rss_mib"][k], 1) for k in sorted(same_pids)}
    fd_drift = {k: (last["open_fds"][k] or 0) - (first["open_fds"][k] or 0) for k in sorted(same_pids)}
    leaked = sum(v or 0 for v in last["pages_in_use_idle"].values())
    # The first sample precedes any load; the second follows the first requests (allocators and caches warm up).
    warm = samples[1] if len(samples) > 2 else first
    warm_drift = {k: round(last["rss_mib"][k] - warm["rss_mib"][k], 1) for k in sorted(same_pids)
                  if warm["pids"].get(k) == last["pids"].get(k)}
    return {"minutes": minutes, "samples": len(samples), "requests": sum(last["requests"].values()),
            "requests_by_kind": last["requests"], "errors": sum(last["errors"].values()),
            "errors_by_kind": last["errors"], "batch_jobs": last["batch_jobs"],
            "rss_first_mib": first["rss_mib"], "rss_last_mib": last["rss_mib"],
            "rss_drift_mib": drift, "max_rank_rss_drift_mib": max((v for k, v in drift.items() if k != "driver"),
                                                                  default=0.0),
            "driver_rss_drift_mib": drift.get("driver"), "rss_drift_after_warmup_mib": warm_drift,
            "warmup_sample_t_s": warm["t_s"], "open_fds_drift": fd_drift,
            "leaked_pages": leaked, "restarts": (last["generation"] or 0) - (first["generation"] or 0)}


def run(topology: Path, minutes: float, out: Path | None, sample_every_s: float = 30.0, batch_lines: int = 12,
        batch_every_s: float = 45.0, pace_s: float = 0.2, ready_timeout_s: float = 300.0) -> dict[str, Any]:
    from cluster.topology import load_topology

    topo = load_topology(topology)
    state = live.up(topology, ready_timeout_s)
    samples: list[dict[str, Any]] = []
    try:
        base = state["http"]
        model = live.call(base, "GET", "/v1/models").body["data"][0]["id"]
        vocab = json.loads((Path(topo.model.path) / "config.json").read_text())["vocab_size"]
        load = Load(base, model, vocab, batch_lines, batch_every_s, pace_s)
        t0 = time.monotonic()
        samples.append(sample(topology, int(state["pid"]), load, t0))  # before any load
        load.start()
        end = t0 + minutes * 60
        while time.monotonic() < end:
            time.sleep(min(sample_every_s, max(0.0, end - time.monotonic())))
            if not load.pause():
                load.errors["sample: load did not drain in 600s"] += 1
            samples.append(sample(topology, int(state["pid"]), load, t0))
            s = samples[-1]
            print(f"soak t={s['t_s']:.0f}s requests={sum(s['requests'].values())} errors={sum(s['errors'].values())}"
                  f" rss={s['rss_mib']} pages_idle={s['pages_in_use_idle']}", flush=True)
            load.resume()
        load.stop()
        load.pause()
        samples.append(sample(topology, int(state["pid"]), load, t0))
        result = {"topology": str(topology), "minutes": minutes, "samples": samples,
                  "error_examples": load.error_examples, "summary": summarize(samples, minutes)}
    finally:
        live.down(topology)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--topology", type=Path, default=REPO / "examples" / "local.yaml")
    p.add_argument("--sample-every-s", type=float, default=30.0)
    p.add_argument("--batch-lines", type=int, default=12)
    p.add_argument("--batch-every-s", type=float, default=45.0)
    p.add_argument("--pace-s", type=float, default=0.2, help="pause of each load thread between its requests")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    if a.minutes <= 0:
        p.error(f"--minutes must be > 0, got {a.minutes}")
    res = run(a.topology, a.minutes, a.out, a.sample_every_s, a.batch_lines, a.batch_every_s, a.pace_s,
              a.ready_timeout)
    print(json.dumps(res["summary"], indent=1))
    print(f"samples in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
