"""Helpers for the benches that drive a live `megaserve up` (bench/chaos.py, bench/soak.py): start and stop it,
plain HTTP calls (urllib: no client library in the way of what the server answers), batch files, and what
/proc says about a process (resident memory, open file descriptors)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RETRIABLE_STATUSES = frozenset({429, 503})


def cli(*args: str, timeout_s: float = 600.0) -> subprocess.CompletedProcess:
    """`megaserve ARGS` (python -m cluster.cli) in the repository, output captured."""
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)


def up(topology: Path, ready_timeout_s: float = 300.0) -> dict[str, Any]:
    """`megaserve up --detach --port 0`; returns up.json once ready (raises with the log's tail if it fails)."""
    from cluster.service import read_state
    from cluster.topology import load_topology

    r = cli("up", str(topology), "--detach", "--port", "0", "--ready-timeout", str(ready_timeout_s),
            timeout_s=ready_timeout_s + 120)
    if r.returncode != 0:
        raise RuntimeError(f"megaserve up failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    state = read_state(load_topology(topology).server.state_dir)
    if state is None or state.get("phase") != "ready":
        raise RuntimeError(f"megaserve up returned but its state is {state}")
    return state


def down(topology: Path) -> None:
    r = cli("down", str(topology), timeout_s=180)
    if r.returncode != 0:
        raise RuntimeError(f"megaserve down failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


def status(topology: Path, timeout_s: float = 30.0) -> dict[str, Any]:
    """status.json of the running `up` (waits for it to appear)."""
    from cluster.service import STATUS_FILE, read_state
    from cluster.topology import load_topology

    state_dir = load_topology(topology).server.state_dir
    deadline = time.monotonic() + timeout_s
    while True:
        st = read_state(state_dir, STATUS_FILE)
        if st is not None or time.monotonic() > deadline:
            if st is None:
                raise RuntimeError(f"no status.json in {state_dir} after {timeout_s:g}s")
            return st
        time.sleep(0.2)


@dataclass
class Reply:
    status: int  # 0 = no HTTP answer (connection refused / reset, timeout)
    body: Any  # parsed JSON, or the raw text, or the exception's description
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def retriable(self) -> bool:
        """A failure a client should retry: 429/503 with an error body, or the server's connection going away."""
        return self.status in RETRIABLE_STATUSES or self.status == 0

    def error(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("message"))
        return str(self.body)[:300]


def call(base_url: str, method: str, path: str, body: Any = None, timeout_s: float = 300.0,
         raw: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            text = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        text, status = e.read(), e.code
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError, OSError) as e:
        return Reply(0, f"{type(e).__name__}: {getattr(e, 'reason', e)}", time.monotonic() - t0)
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        parsed = text.decode(errors="replace")
    return Reply(status, parsed, time.monotonic() - t0)


def stream_completion(base_url: str, body: dict[str, Any], timeout_s: float = 300.0) -> Reply:
    """A streaming completion read to its end; body = {"text": ..., "chunks": n} or the error. A stream cut
    off before `data: [DONE]` is a lost connection (status 0), never a short success."""
    req = urllib.request.Request(base_url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    text, chunks, done = "", 0, False
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            for line in resp:
                line = line.strip()
                if line == b"data: [DONE]":
                    done = True
                    break
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Reply(503, event, time.monotonic() - t0)
                chunks += 1
                text += "".join(c.get("text", "") for c in event.get("choices", []))
    except urllib.error.HTTPError as e:
        try:
            return Reply(e.code, json.loads(e.read()), time.monotonic() - t0)
        except ValueError:
            return Reply(e.code, "", time.monotonic() - t0)
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError, OSError) as e:
        return Reply(0, f"{type(e).__name__}: {getattr(e, 'reason', e)}", time.monotonic() - t0)
    if not done:  # the connection ended mid-stream (e.g. the server died): the text is partial
        return Reply(0, f"the stream ended after {chunks} chunks without data: [DONE]", time.monotonic() - t0)
    return Reply(200, {"text": text, "chunks": chunks}, time.monotonic() - t0)


def upload_batch_file(base_url: str, lines: list[dict[str, Any]]) -> str:
    """Upload a batch input JSONL (purpose batch); its file id."""
    boundary = uuid.uuid4().hex
    content = "".join(json.dumps(x) + "\n" for x in lines).encode()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"input.jsonl\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    r = call(base_url, "POST", "/v1/files", raw=body, headers={"Content-Type": f"multipart/form-data; "
                                                                               f"boundary={boundary}"})
    if not r.ok:
        raise RuntimeError(f"upload failed: {r.status} {r.error()}")
    return r.body["id"]


def file_lines(base_url: str, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    req = urllib.request.Request(f"{base_url}/v1/files/{file_id}/content")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return [json.loads(line) for line in resp.read().splitlines() if line.strip()]


def completion_body(model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """A greedy completion that runs exactly max_tokens (ignore_eos): its text is a deterministic function of
    the prompt, so a changed output after a failure is visible."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n distinct token-id prompts of 6..30 tokens."""
    return [[(7 * i + 3 * j + seed) % (vocab - 2) + 2 for j in range(6 + (i * 5) % 25)] for i in range(n)]


# ---- /proc -------------------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid` (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
