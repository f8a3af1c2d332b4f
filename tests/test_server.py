"""The OpenAI-compatible frontend, driven by the official `openai` package (and raw HTTP for what it cannot send).

The server runs in a background thread on a free port: one tiny LLMEngine behind a RankWorker, the router,
the OpenAIService and the aiohttp app, exactly as `python -m cluster.server --ranks 1` wires them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen as urllib_request

import openai
import pytest
from aiohttp import web

from cluster.rank_server import RankWorker
from cluster.router import Router
from cluster.server.app import build_app, serve
from cluster.server.chat.encoding import encode_messages
from cluster.server.openai_api import ModelInfo, OpenAIService
from cluster.server.settings import ServerSettings
from cluster.server.text import TextStream
from engine.core.engine import EngineConfig, LLMEngine
from engine.weights.tokenizer import load_tokenizer

KEY_ENV = "MEGASERVE_TEST_SERVER_KEY"
KEY = "sk-test-0123"
MAX_MODEL_LEN = 512
MAX_BODY = 64 * 1024
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@dataclass
class Server:
    url: str
    port: int
    worker: RankWorker
    service: OpenAIService
    tokenizer: object
    plain_port: int


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    os.environ[KEY_ENV] = KEY
    engine = LLMEngine(tiny_ckpt, EngineConfig(cache_budget_bytes=32 * 2**20, max_num_seqs=8,
                                               max_model_len=MAX_MODEL_LEN))
    worker = RankWorker(engine, "127.0.0.1", 0).start()
    tokenizer = load_tokenizer(tiny_ckpt)
    settings = ServerSettings(port=0, api_key_env=KEY_ENV, state_dir=tmp_path_factory.mktemp("state"),
                              max_body_bytes=MAX_BODY)
    loop = asyncio.new_event_loop()
    started: dict = {}
    ready = threading.Event()
    stop = asyncio.Event()

    async def main():
        router = await Router([worker.address], secret=worker.secret).start()
        service = OpenAIService(router, tokenizer, ModelInfo.from_checkpoint(tiny_ckpt, "tiny", MAX_MODEL_LEN))
        runner, port = await serve(build_app(service, settings), "127.0.0.1", 0)
        # a second app on the same service under a plain runner (no handler cancellation, as an embedder
        # might build it): client disconnects must still abort
        plain = web.AppRunner(build_app(service, dataclasses.replace(settings, state_dir=settings.state_dir / "b")))
        await plain.setup()
        site = web.TCPSite(plain, "127.0.0.1", 0)
        await site.start()
        started.update(service=service, port=port, plain_port=site._server.sockets[0].getsockname()[1])
        ready.set()
        await stop.wait()
        await plain.cleanup()
        await runner.cleanup()
        await router.close()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert ready.wait(60)
    port = started["port"]
    yield Server(f"http://127.0.0.1:{port}", port, worker, started["service"], tokenizer, started["plain_port"])
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    worker.stop()
    os.environ.pop(KEY_ENV, None)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _raw(server: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _still_serving(client) -> None:
    out = client.completions.create(model="tiny", prompt="still there?", max_tokens=1, **GREEDY)
    assert len(out.choices) == 1 and out.usage.completion_tokens == 1


# ---------------- completions and chat ----------------
def test_completion_greedy_usage_and_determinism(server, client):
    a = client.completions.create(model="tiny", prompt="Hello world", max_tokens=6, **GREEDY)
    b = client.completions.create(model="tiny", prompt="Hello world", max_tokens=6, **GREEDY)
    n_prompt = 1 + len(server.tokenizer.encode("Hello world", add_special_tokens=False).ids)
    assert a.object == "text_completion" and a.model == "tiny" and a.id.startswith("cmpl-")
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text
    assert a.choices[0].finish_reason == "length"
    assert (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.total_tokens) == (n_prompt, 6, n_prompt + 6)


def test_completion_token_id_prompts_and_batches(client):
    ids = client.completions.create(model="tiny", prompt=[0, 72, 101, 108], max_tokens=2, **GREEDY)
    assert ids.usage.prompt_tokens == 4
    many = client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=2, **GREEDY)
    assert [c.index for c in many.choices] == [0, 1] and many.usage.completion_tokens == 4


def test_chat_uses_the_v4_encoding(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, **GREEDY)
    ids = encode_messages(messages, thinking=True).token_ids(server.tokenizer)  # thinking is the default
    assert ids[0] == 0 and 1 not in ids  # bos first; no eos inside a prompt that ends with a user turn
    assert ids[-1] == server.tokenizer.token_to_id("<think>")
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 5
    off = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                         **{**GREEDY, "extra_body": {**GREEDY["extra_body"],
                                                                     "chat_template_kwargs": {"thinking": False}}})
    assert off.usage.prompt_tokens == len(ids)  # `</think>` instead of `<think>`: one token either way


def test_streaming_matches_non_streaming(client):
    full = client.completions.create(model="tiny", prompt="Stream me", max_tokens=6, **GREEDY)
    chunks = list(client.completions.create(model="tiny", prompt="Stream me", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6

    messages = [{"role": "user", "content": "Stream a chat"}]
    no_think = {**GREEDY, "extra_body": {**GREEDY["extra_body"], "chat_template_kwargs": {"thinking": False}}}
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, **no_think)
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}, **no_think))
    with_choices = [c for c in stream if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == chat.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert stream[-1].usage.prompt_tokens == chat.usage.prompt_tokens


def test_n_choices(client):
    out = client.completions.create(model="tiny", prompt="Pick", max_tokens=3, n=3, temperature=1.0, seed=7,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2] and out.usage.completion_tokens == 9
    again = client.completions.create(model="tiny", prompt="Pick", max_tokens=3, n=3, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: reproducible
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=2, n=2, stream=True, **GREEDY))
    finals = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finals == {0, 1}


def _stop_case(client):
    """A greedy text and a stop string that first occurs strictly inside it."""
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, **GREEDY)
    text = full.choices[0].text
    for k in range(1, len(text) - 1):
        sub = text[k:k + 2]
        if "\ufffd" not in sub and text.find(sub) == k:
            return text, sub, k
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop_strings_cut_the_text(client):
    text, stop, k = _stop_case(client)
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, stop=[stop], **GREEDY)
    assert out.choices[0].text == text[:k] and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens <= 10
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, stop=stop,
                                            stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == text[:k]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_text_stream_holds_back_possible_stop_prefixes(server):
    tok = server.tokenizer
    ids = tok.encode("alpha beta gamma delta", add_special_tokens=False).ids
    ts = TextStream(tok, stop=("gamma",))
    pieces = [ts.push([t]) for t in ids]
    pieces.append(ts.finish())
    assert "".join(pieces) == "alpha beta " and ts.stopped
    assert all("g" not in p for p in pieces)  # the 'g' that began the stop string never went out
    ts = TextStream(tok, stop=("gamut",))
    assert "".join([ts.push([t]) for t in ids] + [ts.finish()]) == "alpha beta gamma delta" and not ts.stopped
    text = "héllo wörld ✓ — 数据 end"
    ids = tok.encode(text, add_special_tokens=False).ids
    ts = TextStream(tok)
    pieces = [ts.push([t]) for t in ids]
    assert "".join(pieces) + ts.finish() == text and not any("\ufffd" in p for p in pieces)
    ts = TextStream(tok, stop=["✓", "never"])  # a multi-byte stop string spread over several tokens
    assert "".join([ts.push([t]) for t in ids] + [ts.finish()]) == "héllo wörld " and ts.stopped


def test_logprobs(client):
    out = client.completions.create(model="tiny", prompt="Log me", max_tokens=4, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert all(max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))  # greedy
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


# ---------------- models, health, metrics ----------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    status, body = _raw(server, "GET", "/health", headers={"Authorization": ""})
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_tokenizer_route_and_bench_uses_it(server, capsys):
    """GET /v1/models/{id}/tokenizer serves the model's tokenizer.json; `bench serve` without --tokenizer takes it,
    so random prompts are the asked length in this model's tokens (the server adds bos), with no warning."""
    from tokenizers import Tokenizer

    from cluster.loadtest.runner import run_benchmark

    status, body = _raw(server, "GET", "/v1/models/tiny/tokenizer")
    assert status == 200 and Tokenizer.from_str(body.decode()).to_str() == server.tokenizer.to_str()
    status, body = _raw(server, "GET", "/v1/models/other/tokenizer")
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    assert _raw(server, "GET", "/v1/models/tiny/tokenizer", headers={"Authorization": ""})[0] == 401
    m = run_benchmark({"base_url": server.url, "model": "tiny", "num_prompts": 3, "random_input_len": 60,
                       "random_output_len": 2, "api_key_env": KEY_ENV, "progress": False, "seed": 3})
    assert m["completed"] == 3 and m["warnings"] == [] and "WARNING" not in capsys.readouterr().err
    # 60 prompt tokens + bos; decode -> re-encode may leave a prompt a token or two long, as in vLLM
    assert all(61 <= n <= 63 for n in m["input_lens"]), m["input_lens"]
    assert m["tokenizer_id"] == f"{server.url}/v1/models/tiny/tokenizer (the served model's)"


_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
_SAMPLE = re.compile(rf"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{{{_LABEL}(,{_LABEL})*\}})? (-?[0-9.e+-]+|\+Inf|-Inf|NaN)$")


def test_metrics_parse(server, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=2, **GREEDY)
    status, body = _raw(server, "GET", "/metrics", headers={"Authorization": ""})
    assert status == 200
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        m = _SAMPLE.match(line)
        assert m, f"not Prometheus text format: {line!r}"
        samples[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    assert types["megaserve:time_to_first_token_seconds"] == "histogram"
    assert samples["megaserve:generation_tokens_total"] >= 2 and samples["megaserve:prompt_tokens_total"] > 0
    assert samples['megaserve:rank_up{rank="0"}'] == 1
    assert 0 <= samples['megaserve:kv_cache_usage_perc{rank="0"}'] <= 1
    assert 'megaserve:num_requests_running{rank="0"}' in samples
    assert 'megaserve:num_requests_waiting{rank="0"}' in samples
    buckets = [v for k, v in samples.items() if k.startswith("megaserve:e2e_request_latency_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == samples["megaserve:e2e_request_latency_seconds_count"] > 0


def test_metrics_expert_balancedness_is_bounded():
    from cluster.server.metrics import MAX_BALANCE_LAYERS, Metrics

    rows = [{"layer": i, "mean_tokens_per_rank": 3.0, "max_tokens_per_rank": 4.0, "balancedness": 0.75}
            for i in range(MAX_BALANCE_LAYERS + 50)]
    stats = [{"rank": r, "connected": True, "outstanding_tokens": 0,
              "engine": {"running": 1, "waiting": 2, "held_requests": 1, "pages_used": 3, "pages_free": 1,
                         "expert_balance": rows}} for r in range(72)]
    text = Metrics().render(stats)
    series = [x for x in text.splitlines() if x.startswith("megaserve:expert_balancedness{")]
    assert len(series) == MAX_BALANCE_LAYERS  # per layer, not per layer x rank
    assert 'megaserve:expert_balancedness{layer="5"} 0.75' in series
    assert "megaserve:expert_balancedness_min 0.75" in text
    assert 'megaserve:num_requests_waiting{rank="71"} 3' in text
    assert 'megaserve:kv_cache_usage_perc{rank="0"} 0.75' in text
    assert "expert_balancedness" not in Metrics().render([{"rank": 0, "engine": {"expert_balance": []}}])


def test_metrics_parse_with_the_prometheus_parser():
    from prometheus_client.parser import text_string_to_metric_families

    from cluster.server.metrics import Metrics

    m = Metrics()
    m.record_request(7)
    m.record_choice("length", 3, 0.02, 0.5, cached_prompt_tokens=4)
    m.record_choice("weird", 0, None, 0.1)
    m.record_error(400)
    m.end_request()
    stats = [{"rank": 0, "connected": True, "outstanding_tokens": 5, "engine": {"running": 1, "prefix_hit_rate": 0.5}}]
    fams = {f.name: f for f in text_string_to_metric_families(m.render(stats))}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert value["megaserve:prompt_tokens_total", ()] == 7 and value["megaserve:generation_tokens_total", ()] == 3
    assert value["megaserve:prefix_cache_hit_tokens_total", ()] == 4
    assert value["megaserve:request_success_total", (("finished_reason", "abort"),)] == 1  # unknown reason: abort
    assert value["megaserve:request_success_total", (("finished_reason", "length"),)] == 1
    assert value["megaserve:request_errors_total", (("status", "400"),)] == 1
    assert value["megaserve:requests_in_progress", ()] == 0
    assert value["megaserve:time_to_first_token_seconds_count", ()] == 1
    assert value["megaserve:time_per_output_token_seconds_sum", ()] == pytest.approx(0.24)
    assert value["megaserve:e2e_request_latency_seconds_count", ()] == 2
    assert value["megaserve:prefix_cache_hit_rate", (("rank", "0"),)] == 0.5
    assert fams["megaserve:time_to_first_token_seconds"].type == "histogram"
    assert not any(name.endswith("_created") for name, _ in value)
    assert m.finished == {"abort": 1, "length": 1, "stop": 0}


# ---------------- bad input: 4xx + OpenAI error JSON, and the server keeps serving ----------------
@pytest.mark.parametrize("kwargs, exc, status, needle", [
    ({"model": "nope", "prompt": "x"}, openai.NotFoundError, 404, "does not exist"),
    ({"model": "tiny", "prompt": [5] * (MAX_MODEL_LEN + 1)}, openai.BadRequestError, 400, "maximum context length"),
    ({"model": "tiny", "prompt": "x", "max_tokens": MAX_MODEL_LEN}, openai.BadRequestError, 400,
     "maximum context length"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, openai.BadRequestError, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -3}, openai.BadRequestError, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, openai.BadRequestError, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, openai.BadRequestError, 400, "top_p"),
    ({"model": "tiny", "prompt": [0, 99999]}, openai.BadRequestError, 400, "token ids outside"),
    ({"model": "tiny", "prompt": "x", "n": 0}, openai.BadRequestError, 400, "n must be"),
    ({"model": "tiny", "prompt": "x", "seed": 2**64}, openai.BadRequestError, 400, "seed must be"),
    ({"model": "tiny", "prompt": "x", "stop": [""]}, openai.BadRequestError, 400, "stop must be"),
    ({"model": "tiny", "prompt": "x", "logprobs": 50}, openai.BadRequestError, 400, "logprobs must be"),
], ids=["unknown-model", "prompt-too-long", "prompt-plus-max-tokens", "max-tokens-0", "max-tokens-negative",
        "temperature", "top-p", "token-out-of-vocab", "n-0", "seed-too-big", "empty-stop", "logprobs-too-many"])
def test_bad_requests(client, kwargs, exc, status, needle):
    with pytest.raises(exc) as e:
        client.completions.create(**kwargs)
    assert e.value.status_code == status
    err = e.value.body if isinstance(e.value.body, dict) and "message" in e.value.body else e.value.body["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    _still_serving(client)


def test_bad_chat_messages(client):
    for messages in ([], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}]):
        with pytest.raises(openai.BadRequestError, match="messages"):
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    _still_serving(client)


@pytest.mark.parametrize("body, status, code", [
    (b'{"model": "tiny", "prompt": ', 400, "invalid_json"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, None),
    (b"\xff\xfe not utf-8", 400, "invalid_json"),
    (b'["a", "list"]', 400, None),
    (json.dumps({"model": "tiny", "prompt": "x" * (MAX_BODY + 10)}).encode(), 413, "request_too_large"),
], ids=["malformed", "nan-temperature", "not-utf8", "not-an-object", "too-large"])
def test_bad_bodies(server, client, body, status, code):
    got, raw = _raw(server, "POST", "/v1/completions", body, {"Content-Type": "application/json"})
    err = json.loads(raw)["error"]
    assert got == status and err["code"] == code and err["message"]
    _still_serving(client)


def test_body_limit_without_content_length(server, client):
    """A chunked upload past the limit is cut off while it is read."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        chunks = iter([b'{"model": "tiny", "prompt": "', b"y" * (MAX_BODY + 1), b'"}'])
        conn.request("POST", "/v1/completions", body=chunks, encode_chunked=True,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()
    _still_serving(client)


def test_api_key_required(server, client):
    for key, needle in ((None, "didn't provide"), ("wrong-key", "Incorrect API key")):
        headers = {"Authorization": f"Bearer {key}"} if key else {"Authorization": ""}
        status, raw = _raw(server, "POST", "/v1/completions", b'{"model": "tiny", "prompt": "x"}', headers)
        err = json.loads(raw)["error"]
        assert status == 401 and needle in err["message"] and err["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    _still_serving(client)


def test_unknown_route_is_json(server):
    status, raw = _raw(server, "GET", "/v1/nothing-here")
    assert status == 404 and "no route" in json.loads(raw)["error"]["message"]


# ---------------- client disconnect ----------------
def _wait_rank_idle(server: Server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.worker._stats  # the snapshot the worker serves to StatsRequest
        if stats.get("live_requests") == 0 and stats.get("running") == 0 and stats.get("waiting") == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"the rank still has requests: {server.worker._stats}")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize("runner", ["serve", "plain-runner"])
def test_client_disconnect_aborts_on_the_rank(server, stream, runner):
    aborted_before = server.service.metrics.finished["abort"]
    body = json.dumps({"model": "tiny", "prompt": "never ending", "max_tokens": MAX_MODEL_LEN - 16,
                       "temperature": 0, "ignore_eos": True, "stream": stream}).encode()
    port = server.port if runner == "serve" else server.plain_port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        if stream:
            got = b""
            while b"data: " not in got:  # headers first, then the first chunk: generation is under way
                part = s.recv(65536)
                assert part, got
                got += part
        else:
            deadline = time.monotonic() + 30
            while server.worker._stats.get("live_requests", 0) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.worker._stats.get("live_requests") == 1
    # The rank's stats snapshot can read idle before the service has counted the abort (or be a snapshot
    # taken before the request reached the rank): wait for the count itself, then for the rank to be idle.
    deadline = time.monotonic() + 30
    while server.service.metrics.finished["abort"] == aborted_before and time.monotonic() < deadline:
        time.sleep(0.02)
    _wait_rank_idle(server)
    assert server.service.metrics.finished["abort"] == aborted_before + 1


# ---------------- the entry point ----------------
def test_entry_point_refuses_an_unset_key_variable(tiny_ckpt, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MEGASERVE_UNSET_KEY"}
    proc = subprocess.run([sys.executable, "-m", "cluster.server", "--model", str(tiny_ckpt), "--port", "0",
                           "--state-dir", str(tmp_path), "--api-key-env", "MEGASERVE_UNSET_KEY"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "MEGASERVE_UNSET_KEY" in proc.stderr


def test_entry_point_one_line_errors_before_any_rank(tiny_ckpt, tmp_path):
    """A missing checkpoint or a busy port is one line on stderr and exit 2, found before ranks start."""
    repo = Path(__file__).resolve().parents[1]

    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster.server", "--state-dir", str(tmp_path), *args],
                              cwd=repo, capture_output=True, text=True, timeout=60)

    proc = serve("--model", str(tmp_path / "nope"))
    assert proc.returncode == 2 and proc.stderr == f"error: --model {tmp_path / 'nope'}: no such directory\n"
    proc = serve("--model", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr == f"error: --model {tmp_path}: not a checkpoint (no config.json or tokenizer.json)\n"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = serve("--model", str(tiny_ckpt), "--port", str(port))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: --port: 127.0.0.1:{port} is in use (another server?); choose another, or "
                           f"--port 0 for any free one\n")


def test_entry_point_keeps_its_state_out_of_the_working_directory(tiny_ckpt, tmp_path):
    """Without --state-dir the batch state goes to ~/.megaserve/server/<model name>, not ./.megaserve."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.server", "--model", str(tiny_ckpt), "--port", "0"],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"megaserve: serving {tiny_ckpt.name!r} on http://127.0.0.1:"), line
    finally:
        proc.terminate()
        proc.wait(30)
    assert list(work.iterdir()) == []
    assert (home / ".megaserve" / "server" / tiny_ckpt.name).is_dir()


def test_settings_from_topology():
    from cluster.topology import load_topology

    topo = load_topology(Path(__file__).resolve().parents[1] / "examples" / "local.yaml")
    s = ServerSettings.from_topology(topo)
    assert (s.host, s.port, s.api_key_env) == (topo.server.host, topo.server.port, topo.server.api_key_env)
    assert s.state_dir == topo.server.state_dir and s.max_body_bytes == topo.server.max_body_bytes
    assert s.batch_concurrency == topo.server.batch_concurrency and s.model_name == topo.model.path.name
    assert ServerSettings.from_topology(topo, port=0).port == 0
    with pytest.raises(ValueError, match="port"):
        ServerSettings(port=70000)


@pytest.mark.slow
def test_two_ep_ranks_serve_the_same_greedy_text(tiny_ckpt, tmp_path, client):
    """`--ranks 2`: two local EP rank processes; greedy text equals the one-rank server's."""
    want = [client.completions.create(model="tiny", prompt=p, max_tokens=4, **GREEDY).choices[0].text
            for p in ("expert parallel", "second prompt")]
    proc = subprocess.Popen([sys.executable, "-m", "cluster.server", "--model", str(tiny_ckpt), "--port", "0",
                             "--state-dir", str(tmp_path), "--ranks", "2", "--served-model-name", "tiny",
                             "--kv-cache-bytes", str(32 * 2**20), "--max-model-len", str(MAX_MODEL_LEN)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"serving 'tiny' on (http://\S+) \(2 rank", line):
                url = m.group(1)
                break
        else:
            raise AssertionError("server exited:\n" + "".join(lines))
        two = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        got = two.completions.create(model="tiny", prompt=["expert parallel", "second prompt"], max_tokens=4,
                                     **GREEDY)
        assert [c.text for c in got.choices] == want
        deadline = time.monotonic() + 30
        while True:  # the EP engine reports balancedness once the group has synced its expert load
            with urllib_request(url + "/metrics") as r:
                text = r.read().decode()
            if "megaserve:expert_balancedness{" in text or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert 'megaserve:rank_up{rank="1"} 1' in text
        assert 'megaserve:expert_balancedness{layer="0"}' in text
    finally:
        proc.terminate()
        proc.wait(30)


# ---------------- chat on the real engine, and the logits controls over the wire ----------------
def test_chat_thinking_shape_on_the_real_engine(server, client):
    """Random weights: the shape of a thinking-mode answer (reasoning_content and content strings whose
    tokens add up), full and streamed."""
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, **GREEDY)
    m = out.choices[0].message
    assert isinstance(m.reasoning_content, str) and isinstance(m.content, str) and m.tool_calls is None
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    produced = server.tokenizer.decode(server.tokenizer.encode(m.reasoning_content).ids)
    assert m.reasoning_content == produced
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True,
                                                 **GREEDY))
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == \
        m.reasoning_content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == m.content
    assert all(not (getattr(c.choices[0].delta, "reasoning_content", None) and c.choices[0].delta.content)
               for c in chunks)


def test_min_tokens_and_logit_bias_over_the_wire(server, client):
    eos = 1
    forced = {"temperature": 0, "extra_body": {"min_tokens": 3, "logit_bias": {str(eos): 100}}}
    out = client.completions.create(model="tiny", prompt="Stop early", max_tokens=10, **forced)
    assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "stop"  # 3 tokens, then eos
    plain = client.completions.create(model="tiny", prompt="Stop early", max_tokens=10, temperature=0,
                                      extra_body={"logit_bias": {str(eos): 100}})
    assert plain.usage.completion_tokens == 1 and plain.choices[0].finish_reason == "stop"
    for bad, needle in (({"presence_penalty": 3}, "presence_penalty"), ({"logit_bias": {"99999": 1}}, "logit_bias"),
                        ({"min_tokens": 20}, "min_tokens")):
        with pytest.raises(openai.BadRequestError, match=needle):
            client.completions.create(model="tiny", prompt="x", max_tokens=5,
                                      **{k: v for k, v in bad.items() if k == "presence_penalty"},
                                      extra_body={k: v for k, v in bad.items() if k != "presence_penalty"})
