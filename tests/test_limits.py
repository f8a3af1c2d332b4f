"""Bounded fan-out: the caps answer 413/429 with OpenAI-style errors, /health and /metrics come from a snapshot,
and a slow SQLite call does not stall the event loop. The frontend is the real one over a stand-in rank."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid

import pytest

from cluster.server.settings import ServerSettings
from tests.stand_in import EchoEngine, StandInServer


class SlowEcho(EchoEngine):
    """EchoEngine whose steps take 20 ms (long requests stay in flight for seconds)."""

    def step(self):
        time.sleep(0.02)
        return super().step()


def _error(status: int, body: bytes, want_status: int, code: str) -> dict:
    assert status == want_status, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    return err


def _completion(**over) -> bytes:
    return json.dumps({"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3, **over}).encode()


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    settings = ServerSettings(port=0, state_dir=tmp_path_factory.mktemp("limits"), max_choices_per_request=16,
                              max_requests_in_flight=3, max_file_storage_bytes=1000, status_interval_s=0.5,
                              retry_after_s=2)
    with StandInServer(tiny_ckpt, settings, SlowEcho()) as srv:
        yield srv


def test_fanout_cap_answers_413(server):
    status, _, body = server.request("POST", "/v1/completions", _completion(prompt=[[5, 6]] * 5, n=4))
    err = _error(status, body, 413, "too_many_choices")
    assert "20 completions" in err["message"] and "16" in err["message"] and err["param"] == "n"
    chat = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 17}).encode()
    _error(*server.request("POST", "/v1/chat/completions", chat)[::2], 413, "too_many_choices")
    # the request: 500 prompts x n=64 is refused at once, and /health still answers
    t0 = time.monotonic()
    status, _, body = server.request("POST", "/v1/completions", _completion(prompt=["hi"] * 500, n=64))
    _error(status, body, 413, "too_many_choices")
    assert time.monotonic() - t0 < 10
    assert server.request("GET", "/health")[0] == 200
    status, _, body = server.request("POST", "/v1/completions", _completion(prompt=[[5, 6]] * 4, n=4))
    assert status == 200 and len(json.loads(body)["choices"]) == 16


def test_requests_in_flight_cap_answers_429_with_retry_after(server):
    conns = []
    try:
        for _ in range(3):  # fill the server: three streams that run for seconds
            c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            c.request("POST", "/v1/completions", _completion(prompt=list(range(5, 125)), max_tokens=120,
                                                             stream=True), {"Content-Type": "application/json"})
            resp = c.getresponse()
            assert resp.status == 200 and resp.readline().startswith(b"data: ")
            conns.append((c, resp))
        status, headers, body = server.request("POST", "/v1/completions", _completion())
        err = _error(status, body, 429, "rate_limit_exceeded")
        assert headers["Retry-After"] == "2" and err["type"] == "rate_limit_error"
        assert server.request("GET", "/health")[0] == 200  # probes are not counted
    finally:
        for c, _ in conns:
            c.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the streams' handlers end once their clients are gone
        status, _, body = server.request("POST", "/v1/completions", _completion())
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200, body


def _upload(server, content: bytes) -> tuple[int, bytes]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    status, _, out = server.request("POST", "/v1/files", body,
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, out


def test_file_storage_quota_answers_413(server):
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "tiny", "prompt": "x"}}).encode() + b"\n"
    first = line * (600 // len(line))
    status, body = _upload(server, first)
    assert status == 200, body
    fid = json.loads(body)["id"]
    err = _error(*_upload(server, first), 413, "storage_quota_exceeded")
    assert "1000 bytes" in err["message"]
    assert len(json.loads(server.request("GET", "/v1/files")[2])["data"]) == 1  # nothing half-stored
    assert server.request("DELETE", f"/v1/files/{fid}")[0] == 200
    status, body = _upload(server, first)
    assert status == 200, body
    assert server.request("DELETE", f"/v1/files/{json.loads(body)['id']}")[0] == 200


def test_health_and_metrics_come_from_the_snapshot(server):
    router = server.service.router
    calls = []
    real = router.stats

    async def counting(*a, **kw):
        calls.append(time.monotonic())
        return await real(*a, **kw)

    router.stats = counting
    try:
        t0 = time.monotonic()
        for _ in range(40):
            status, _, body = server.request("GET", "/health")
            assert status == 200 and json.loads(body)["ranks"][0]["ok"]
            assert server.request("GET", "/metrics")[0] == 200
        elapsed = time.monotonic() - t0
    finally:
        router.stats = real
    # one refresh per 0.5 s interval at most, whatever 80 probes asked
    assert len(calls) <= elapsed / 0.5 + 2, (len(calls), elapsed)


def test_a_slow_store_call_does_not_stall_the_event_loop(server, monkeypatch):
    from cluster.batch.store import BatchStore

    real = BatchStore.list_batches

    def slow(self, *a, **kw):
        time.sleep(1.5)
        return real(self, *a, **kw)

    monkeypatch.setattr(BatchStore, "list_batches", slow)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=server.request("GET", "/v1/batches")))
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert server.request("GET", "/health")[0] == 200
    assert time.monotonic() - t0 < 1.0  # answered while the store call sleeps in its thread
    t.join(10)
    assert result["r"][0] == 200
