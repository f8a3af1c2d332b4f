"""Batch demo: submit a batch job through the Python client, show the progress bar, print a few results.

    python -m cluster.batch.demo --url http://127.0.0.1:8000 [--requests 32] [--max-tokens 8]
    python -m cluster.batch.demo --model CHECKPOINT_DIR     # starts `python -m cluster.server` for the demo
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cluster.client import Client

TOPICS = ["the sea", "expert parallelism", "a lighthouse", "continuous batching", "the moon", "prefix caching"]


def run_batch_demo(url: str, requests: int = 32, max_tokens: int = 8, api_key: str | None = None,
                   show: int = 4) -> None:
    client = Client(url, api_key=api_key)
    records = [{"custom_id": f"demo-{i:03d}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": client.default_model, "max_tokens": max_tokens, "temperature": 0,
                         "chat_template_kwargs": {"thinking": False},  # one-line answers, no reasoning part
                         "messages": [{"role": "user", "content": f"Write one line about {TOPICS[i % len(TOPICS)]}."}]}}
               for i in range(requests)]
    t0 = time.perf_counter()
    job = client.submit_batch(records, metadata={"source": "megaserve demo"})
    print(f"submitted batch {job.id}: {requests} chat requests, max_tokens={max_tokens}")
    st = job.wait(progress=True, poll_s=0.2)
    print(f"batch {st.status} in {time.perf_counter() - t0:.1f}s: {st.completed} ok, {st.failed} failed")
    for r in list(job.results())[:show]:
        print(f"    {r.custom_id}: {r.text!r}" if r.ok else f"    {r.custom_id}: error {r.error.get('message')}")


def serve_and_run(model: str | Path, requests: int = 16, max_tokens: int = 8, startup_s: float = 120.0) -> None:
    """Start `python -m cluster.server` on `model` (a free port, a temporary state dir), run the demo, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="megaserve-batch-") as state:
        log = open(Path(state) / "server.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "cluster.server", "--model", str(model), "--port", str(port),
                                 "--state-dir", state], stdout=log, stderr=log,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    text = (Path(state) / "server.log").read_text()
                    raise RuntimeError(f"the server exited ({proc.returncode}):\n{text}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the server did not answer /health within {startup_s:.0f}s") from None
                    time.sleep(0.2)
            run_batch_demo(url, requests, max_tokens)
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    ap.add_argument("--model", default=None, help="serve this checkpoint for the demo instead of using --url")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--api-key", default=None, help="Bearer key (default: $MEGASERVE_API_KEY)")
    args = ap.parse_args(argv)
    if args.model is not None:
        serve_and_run(args.model, args.requests, args.max_tokens)
    else:
        run_batch_demo(args.url, args.requests, args.max_tokens, args.api_key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
