"""Batch demo: submit a batch job to a running server through the Python client, show the progress bar,
print a few results.

    python -m cluster.batch.demo --url http://127.0.0.1:8000 [--requests 32] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import time

from cluster.client import Client

TOPICS = ["the sea", "expert parallelism", "a lighthouse", "continuous batching", "the moon", "prefix caching"]


def run_batch_demo(url: str, requests: int = 32, max_tokens: int = 8, api_key: str | None = None,
                   show: int = 4) -> None:
    client = Client(url, api_key=api_key)
    records = [{"custom_id": f"demo-{i:03d}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": client.default_model, "max_tokens": max_tokens, "temperature": 0,
                         "messages": [{"role": "user", "content": f"Write one line about {TOPICS[i % len(TOPICS)]}."}]}}
               for i in range(requests)]
    t0 = time.perf_counter()
    job = client.submit_batch(records, metadata={"source": "megaserve demo"})
    print(f"submitted batch {job.id}: {requests} chat requests, max_tokens={max_tokens}")
    st = job.wait(progress=True, poll_s=0.2)
    print(f"batch {st.status} in {time.perf_counter() - t0:.1f}s: {st.completed} ok, {st.failed} failed")
    for r in list(job.results())[:show]:
        print(f"    {r.custom_id}: {r.text!r}" if r.ok else f"    {r.custom_id}: error {r.error.get('message')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--api-key", default=None, help="Bearer key (default: $MEGASERVE_API_KEY)")
    args = ap.parse_args(argv)
    run_batch_demo(args.url, args.requests, args.max_tokens, args.api_key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
