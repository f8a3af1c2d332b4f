"""Files + batches end to end through the official `openai` package and through our Client.

Two servers: the real one (`python -m cluster.server` on the tiny checkpoint, a subprocess), and an
in-process app that mounts only the batch routes on a fake service (for cancel and progress-bar checks
that need requests to take a while).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cluster import Client, ClientError

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, state_dir: Path, port: int, env: dict[str, str] | None = None,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start `python -m cluster.server` and wait until /health answers (stderr goes to state_dir/server.log)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log = open(state_dir / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.server", "--model", str(model), "--port", str(port),
                             "--state-dir", str(state_dir), *extra], cwd=ROOT, stdout=log, stderr=log,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{(state_dir / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not come up in 90 s:\n{(state_dir / 'server.log').read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chat_line(cid: str, text: str, max_tokens: int = 2, model: str = "tiny") -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                     "temperature": 0}}


# ---- the real server ----

@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    port = free_port()
    proc = start_server(tiny_ckpt, tmp_path_factory.mktemp("state"), port, env={"MEGASERVE_API_KEY": API_KEY},
                        extra=("--api-key-env", "MEGASERVE_API_KEY"))
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def test_openai_package_files_and_batches(server, tmp_path):
    import openai

    oa = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    model = oa.models.list().data[0].id
    lines = [chat_line(f"q{i}", f"question {i}", model=model) for i in range(5)]
    lines.insert(2, "this line is not JSON")
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with open(path, "rb") as fh:
        f = oa.files.create(file=fh, purpose="batch")
    assert f.purpose == "batch" and f.bytes == path.stat().st_size
    assert oa.files.retrieve(f.id).filename == "in.jsonl"
    assert oa.files.content(f.id).read() == path.read_bytes()
    assert f.id in {x.id for x in oa.files.list()}
    b = oa.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                          metadata={"test": "openai"})
    assert b.status == "validating" and b.metadata == {"test": "openai"}
    deadline = time.monotonic() + 60
    while b.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        time.sleep(0.2)
        b = oa.batches.retrieve(b.id)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (6, 5, 1)
    out = [json.loads(x) for x in oa.files.content(b.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == [f"q{i}" for i in range(5)]
    for r in out:
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] <= 2
    err = [json.loads(x) for x in oa.files.content(b.error_file_id).text.splitlines()]
    assert len(err) == 1 and "line 3: not valid JSON" in err[0]["error"]["message"]
    assert b.id in {x.id for x in oa.batches.list(limit=10)}
    with pytest.raises(openai.ConflictError):
        oa.batches.cancel(b.id)
    with pytest.raises(openai.NotFoundError):
        oa.batches.retrieve("batch_does_not_exist")
    assert oa.files.delete(f.id).deleted


def test_openai_package_rejects_missing_key(server):
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).batches.list()


def test_client_batch_generate_stream(server):
    client = Client(server, api_key=API_KEY)
    model = client.default_model
    records = [{"messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 2, "temperature": 0}
               for i in range(6)]
    records.append({"messages": [{"role": "user", "content": "bad"}], "max_tokens": 0})
    job = client.submit_batch(records)
    bar = io.StringIO()
    st = job.wait(poll_s=0.1, timeout=60, out=bar)
    assert st.status == "completed" and (st.total, st.completed, st.failed) == (7, 6, 1)
    assert "7/7" in bar.getvalue() and "req/s" in bar.getvalue()
    results = list(job.results())
    assert [r.custom_id for r in results] == [f"request-{i}" for i in range(7)]
    assert all(r.ok and isinstance(r.text, str) for r in results[:6])
    bad = results[6]
    assert not bad.ok and bad.status_code == 400 and "max_tokens" in bad.error["message"]
    # greedy batch results equal the same requests sent one at a time
    single = client.generate(messages=records[0]["messages"], max_tokens=2, temperature=0)
    assert results[0].text == single
    text = client.generate("Once upon a time", model=model, max_tokens=3, temperature=0)
    assert "".join(client.stream("Once upon a time", max_tokens=3, temperature=0)) == text
    chat = [{"role": "user", "content": "Tell me a story"}]
    no_think = {"chat_template_kwargs": {"thinking": False}}  # the answer is content from the first token
    assert "".join(client.stream(messages=chat, max_tokens=3, temperature=0, **no_think)) == \
        client.generate(messages=chat, max_tokens=3, temperature=0, **no_think)
    with pytest.raises(ClientError) as e:
        client.generate("x", model="no-such-model", max_tokens=2)
    assert e.value.status == 404 and e.value.message
    with pytest.raises(ClientError) as e:
        Client(server, api_key="wrong").submit_batch(records)
    assert e.value.status == 401


def test_submit_batch_takes_the_endpoint_from_the_lines(server, tmp_path):
    """Completion lines (a JSONL file or bare prompt bodies) run as /v1/completions without endpoint=...; mixed
    lines are refused before anything is uploaded; a job whose every request failed says so on the bar."""
    client = Client(server, api_key=API_KEY)
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                        "body": {"model": client.default_model, "prompt": f"Once {i}",
                                                 "max_tokens": 2}}) + "\n"
                            for i in range(3)))
    bar = io.StringIO()
    job = client.submit_batch(path)
    assert job.endpoint == "/v1/completions"
    st = job.wait(poll_s=0.1, timeout=60, out=bar)
    assert (st.status, st.completed, st.failed, st.endpoint) == ("completed", 3, 0, "/v1/completions")
    assert "/v1/completions" in bar.getvalue() and "FAILED" not in bar.getvalue()
    assert [r.ok and isinstance(r.text, str) for r in job.results()] == [True] * 3

    job = client.submit_batch([{"prompt": "Hello", "max_tokens": 2}, {"prompt": [0, 17, 42], "max_tokens": 2}])
    assert job.endpoint == "/v1/completions"
    assert [r.ok for r in (job.wait(progress=False, timeout=60) and job.results())] == [True, True]

    files_before = len(client._json("GET", "/v1/files")["data"])
    with pytest.raises(ValueError, match=r"mixes endpoints: 1 for /v1/completions \(first: record 0 \(prompt\)\); "
                                         r"1 for /v1/chat/completions \(first: record 1 \(messages\)\)"):
        client.submit_batch([{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}])
    with pytest.raises(ValueError, match=r"completions.jsonl mixes endpoints: 3 for /v1/completions \(first: line 1\)"
                                         r"; endpoint='/v1/chat/completions' given"):
        client.submit_batch(path, endpoint="/v1/chat/completions")
    with pytest.raises(ValueError, match="no line says its endpoint"):
        client.submit_batch([{"max_tokens": 2}])
    with pytest.raises(ValueError, match="asks for '/v1/embeddings'"):
        client.submit_batch([{"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {}}])
    assert len(client._json("GET", "/v1/files")["data"]) == files_before  # nothing was uploaded

    bar = io.StringIO()
    st = client.submit_batch([{"prompt": "x", "max_tokens": 0}] * 2).wait(poll_s=0.1, timeout=60, out=bar)
    assert (st.status, st.completed, st.failed) == ("completed", 0, 2) and st.all_failed
    lines = bar.getvalue().strip().splitlines()
    assert lines[-2].endswith("completed: EVERY REQUEST FAILED")
    assert lines[-1].startswith("every request failed; first error (request-0): ") and "max_tokens" in lines[-1]


def test_batch_demo(server, capsys):
    from cluster.batch.demo import run_batch_demo

    run_batch_demo(server, requests=4, max_tokens=2, api_key=API_KEY, show=2)
    out = capsys.readouterr()
    assert "batch completed" in out.out and "4 ok, 0 failed" in out.out
    assert "demo-000: " in out.out and "demo-001: " in out.out and "demo-002" not in out.out
    assert "4/4 (4 ok, 0 failed)" in out.err  # the progress bar


# ---- an in-process app: batch routes on a slow fake service ----

class SlowService:
    def __init__(self, delay: float):
        self.delay = delay

    async def chat_completions(self, body: dict) -> dict:
        await asyncio.sleep(self.delay)
        return {"id": "chatcmpl-x", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": body["messages"][0]["content"]},
                             "finish_reason": "stop"}]}

    async def completions(self, body: dict) -> dict:
        raise AssertionError("chat only")


class _Settings:
    def __init__(self, state_dir: Path):
        self.state_dir, self.max_batch_file_bytes, self.batch_concurrency = state_dir, 1 << 20, 2


@pytest.fixture()
def fake_server(tmp_path):
    from aiohttp import web

    from cluster.batch.routes import add_batch_routes

    loop = asyncio.new_event_loop()
    app = web.Application()
    add_batch_routes(app, SlowService(0.05), _Settings(tmp_path))

    async def models(_):
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_client_cancel_and_progress(fake_server):
    client = Client(fake_server + "/v1")
    job = client.submit_batch([{"messages": [{"role": "user", "content": f"m{i}"}]} for i in range(40)],
                              metadata={"who": "test"})
    assert job.status().raw["metadata"] == {"who": "test"}
    while job.status().completed < 4:
        time.sleep(0.02)
    with pytest.raises(ClientError, match="call wait"):
        next(job.results())
    assert job.cancel().status in ("cancelling", "cancelled")
    st = job.wait(progress=False, timeout=10)
    assert st.status == "cancelled" and st.total == 40 and 4 <= st.completed < 40
    results = list(job.results())
    assert [r.custom_id for r in results] == [f"request-{i}" for i in range(40)]
    assert {r.error["code"] for r in results if not r.ok} == {"batch_cancelled"}
    assert [r.text for r in results if r.ok] == [f"m{r.custom_id[8:]}" for r in results if r.ok]
    assert sum(r.ok for r in results) == st.completed
    with pytest.raises(ClientError) as e:
        job.cancel()
    assert e.value.status == 409 and "cancelled and cannot be cancelled" in e.value.message
    with pytest.raises(ClientError, match="HTTP 404"):
        client.batch("batch_nope").status()


def test_client_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="http://"):
        Client("localhost:8000")
    with pytest.raises(ClientError) as e:
        Client(f"http://127.0.0.1:{free_port()}", api_key="k").batch("b").status()
    assert e.value.status == 0 and e.value.type == "connection_error"
    t0 = time.monotonic()
    with pytest.raises(ClientError, match="connection failed"):
        Client(f"http://127.0.0.1:{free_port()}").batch("b").wait(progress=False, poll_s=0.05, unreachable_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 5
    with pytest.raises(ValueError, match="exactly one of prompt"):
        Client("http://127.0.0.1:1").generate(model="m")
