"""Property-based fuzzing (hypothesis): hostile HTTP bodies against the real frontend, hostile bytes and
frames against a rank before and after authentication, hostile AddRequest fields against the real engine.

Bounded: a fixed number of cases per test (MEGASERVE_FUZZ_EXAMPLES scales them), derandomized so CI is
reproducible (MEGASERVE_FUZZ_RANDOM=1 draws fresh cases), no per-case deadline; the module runs in well under a
minute. What must hold: no 5xx other than a deliberate 503, an OpenAI-style error body on every 4xx, no crash,
and the server / rank answers a normal request after every case. Each test prints its case count.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.rank_server import RankWorker
from cluster.server.settings import ServerSettings
from comm import auth, wire
from tests.stand_in import EchoEngine, StandInServer, connect

EXAMPLES = int(os.environ.get("MEGASERVE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("MEGASERVE_FUZZ_RANDOM") != "1",
                database=None, suppress_health_check=list(HealthCheck), print_blob=True)
CASES: dict[str, int] = {}


def _count(name: str) -> None:
    CASES[name] = CASES.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    total = sum(CASES.values())
    print(f"\nfuzz: {total} cases run ({', '.join(f'{k} {v}' for k, v in sorted(CASES.items()))}), 0 failures")


# ======================= HTTP bodies =======================
BIG = st.sampled_from([2**31, 2**63, 2**64, 2**70, 10**30, -(2**63) - 1, -(2**70), 1e308, -1e308, 1e-320])
NUMBER = st.one_of(st.integers(-(2**80), 2**80), BIG, st.floats(allow_nan=False, allow_infinity=False), st.just(0),
                   st.just(-1))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, st.text(max_size=40))
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
TOKEN_IDS = st.lists(st.one_of(st.integers(-5, 600), BIG, st.booleans()), min_size=0, max_size=12)
PROMPT = st.one_of(st.text(max_size=60), st.lists(st.text(max_size=20), max_size=4), TOKEN_IDS,
                   st.lists(TOKEN_IDS, max_size=4), JSON)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "nobody"]),
                           "content": st.one_of(st.text(max_size=60), JSON)},
                          optional={"name": JSON, "extra": JSON}),
    JSON)
MESSAGES = st.one_of(st.lists(MESSAGE, max_size=4), JSON)
FIELDS = {  # every field the endpoints read, each with good and hostile values
    "max_tokens": st.one_of(st.integers(-3, 40), BIG, JSON),
    "max_completion_tokens": st.one_of(st.integers(-3, 40), BIG, JSON),
    "temperature": st.one_of(st.floats(-2, 3), NUMBER, JSON),
    "top_p": st.one_of(st.floats(-1, 2), NUMBER, JSON),
    "top_k": st.one_of(st.integers(-3, 100), BIG, JSON),
    "n": st.one_of(st.integers(-2, 6), BIG, JSON),
    "best_of": st.one_of(st.integers(-2, 6), JSON),
    "seed": st.one_of(st.integers(-(2**64), 2**64), JSON),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=20), JSON),
    "stop_token_ids": st.one_of(TOKEN_IDS, JSON),
    "logprobs": st.one_of(st.integers(-2, 30), st.booleans(), BIG, JSON),
    "top_logprobs": st.one_of(st.integers(-2, 30), JSON),
    "ignore_eos": st.one_of(st.booleans(), JSON),
    "priority": st.one_of(st.integers(-5, 5), BIG, JSON),
    "echo": st.one_of(st.booleans(), JSON),
    "suffix": st.one_of(st.none(), st.text(max_size=5), JSON),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), JSON)}), JSON),
    "user": JSON,
}


@st.composite
def bodies(draw) -> tuple[bytes, bool]:
    """(request body bytes, whether it asks to stream) for one endpoint."""
    kind = draw(st.sampled_from(["object"] * 8 + ["json", "bytes", "truncated", "deep", "utf8"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), False
    if kind == "deep":
        depth = draw(st.sampled_from([100, 1000, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = opener * depth + "1" + closer * depth
        return ('{"model": "tiny", "prompt": "x", "messages": ' + inner + "}").encode(), False
    if kind == "json":
        return json.dumps(draw(JSON)).encode(), False
    # Mostly a valid request with a few hostile fields: hostile values get past the first check that way.
    obj: dict = {"model": "tiny", "max_tokens": draw(st.integers(1, 8))}
    if draw(st.booleans()):
        obj["prompt"] = draw(st.one_of(st.text(max_size=40), st.lists(st.integers(0, 500), min_size=1, max_size=8)))
    else:
        obj["messages"] = [{"role": "user", "content": draw(st.text(max_size=40))}]
    if not draw(st.integers(0, 7)):
        obj["model"] = draw(JSON)
    if not draw(st.integers(0, 3)):
        obj["prompt"] = draw(PROMPT)
    if not draw(st.integers(0, 3)):
        obj["messages"] = draw(MESSAGES)
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
        obj[key] = draw(FIELDS[key])
    for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=1)):
        del obj[key]  # a missing field
    for key in draw(st.lists(st.text(max_size=10), max_size=2)):
        obj.setdefault(key, draw(JSON))  # unknown fields
    stream = draw(st.one_of(st.none(), st.booleans(), JSON))
    if stream is not None:
        obj["stream"] = stream
    raw = json.dumps(obj).encode()
    if kind == "truncated":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif kind == "utf8":  # an invalid UTF-8 byte inside a string value
        at = raw.find(b'"', 1)
        raw = raw[: at + 1] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])) + raw[at + 1:]
    return raw, stream is True


@pytest.fixture(scope="module")
def http_server(tiny_ckpt, tmp_path_factory):
    settings_ = ServerSettings(port=0, state_dir=tmp_path_factory.mktemp("fuzz"), max_body_bytes=2**20,
                               max_choices_per_request=32)
    with StandInServer(tiny_ckpt, settings_, max_model_len=128) as srv:
        yield srv


def _check_http(server: StandInServer, path: str, raw: bytes, stream: bool) -> None:
    status, headers, body = server.request("POST", path, raw, timeout_s=60)
    assert status < 500 or status == 503, (status, body[:500])
    if status >= 400:
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["message"] and {"type", "param", "code"} <= set(err)
    elif headers.get("Content-Type", "").startswith("text/event-stream"):
        assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
        for event in body.split(b"\n\n")[:-2]:
            chunk = json.loads(event.removeprefix(b"data: "))
            assert "choices" in chunk or ("error" in chunk and chunk["error"]["message"]), chunk
    else:
        assert not stream
        assert json.loads(body)["choices"] is not None


@FUZZ
@given(body=bodies())
def test_fuzz_completions(http_server, body):
    _count("http /v1/completions")
    _check_http(http_server, "/v1/completions", *body)


@FUZZ
@given(body=bodies())
def test_fuzz_chat_completions(http_server, body):
    _count("http /v1/chat/completions")
    _check_http(http_server, "/v1/chat/completions", *body)


def test_http_server_still_serves_after_fuzzing(http_server):
    for path, body in (("/v1/completions", {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3}),
                       ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2})):
        status, _, out = http_server.request("POST", path, json.dumps(body).encode())
        assert status == 200, out
    assert http_server.request("GET", "/health")[0] == 200
    assert http_server.worker.running and http_server.worker.failure is None


# ======================= frames against a rank =======================
@pytest.fixture(scope="module")
def rank():
    worker = RankWorker(EchoEngine(), "127.0.0.1", 0, auth_timeout_s=2.0).start()
    yield worker
    worker.stop()


def _still_serving(worker: RankWorker) -> None:
    with connect(worker) as s:
        s.sendall(wire.encode(wire.AddRequest(f"ok-{time.monotonic_ns()}", [3, 4], max_tokens=2)))
        got: list[int] = []
        while True:
            msg = wire.recv_frame(s)
            assert isinstance(msg, wire.Outputs), msg
            got += [t for o in msg.outputs for t in o.new_token_ids]
            if any(o.finished for o in msg.outputs):
                break
        assert got == [3, 4]
    assert worker.running and worker.failure is None


def _drain(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """What the rank sends until it closes (or goes quiet for `timeout_s`: a valid frame may get no answer)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


MSGPACK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20),
              st.binary(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1)), inner,
                                            max_size=4)),
    max_leaves=10)
# Every tag but Shutdown (an authenticated driver may stop its rank; that is what it is for).
TAGGED = st.tuples(st.sampled_from([c.__name__ for c in wire.MESSAGES if c is not wire.Shutdown] + ["Nope"]),
                   st.dictionaries(st.sampled_from(["req_id", "prompt_token_ids", "max_tokens", "nonce", "outputs",
                                                    "temperature", "top_k", "seed", "priority", "extra"]),
                                   MSGPACK, max_size=4)).map(list)


@st.composite
def frames(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "msgpack", "tagged", "truncated", "oversized", "lying"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=300))
    if kind == "oversized":
        return struct.pack(">I", draw(st.integers(wire.MAX_FRAME_BYTES + 1, 2**32 - 1))) + draw(st.binary(max_size=64))
    payload = msgpack.packb(draw(TAGGED if kind in ("tagged", "truncated", "lying") else MSGPACK), use_bin_type=True)
    frame = struct.pack(">I", len(payload)) + payload
    if kind == "truncated":
        return frame[: draw(st.integers(1, len(frame) - 1))]
    if kind == "lying":  # the header announces fewer bytes than follow
        cut = draw(st.integers(0, len(payload)))
        return struct.pack(">I", cut) + payload
    return frame


@FUZZ
@given(data=frames())
def test_fuzz_frames_before_authentication(rank, data):
    _count("rank frames before auth")
    failures = rank.auth_failures
    with socket.create_connection(rank.address, timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = _drain(s, 10)
    assert len(got) <= auth.CHALLENGE_BYTES  # the challenge, then nothing: no frame was decoded or answered
    deadline = time.monotonic() + 5
    while rank.auth_failures == failures and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rank.auth_failures == failures + 1
    _still_serving(rank)


@FUZZ
@given(data=frames())
def test_fuzz_frames_after_authentication(rank, data):
    _count("rank frames after auth")
    with connect(rank) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        _drain(s, 2)
    _still_serving(rank)


# ======================= AddRequest fields against the real engine =======================
@pytest.fixture(scope="module")
def real_rank(tiny_ckpt):
    from engine.core.engine import EngineConfig, LLMEngine

    engine = LLMEngine(tiny_ckpt, EngineConfig(cache_budget_bytes=16 * 2**20, max_num_seqs=4, max_model_len=64))
    worker = RankWorker(engine, "127.0.0.1", 0).start()
    yield worker
    worker.stop()


INT_ANY = st.one_of(st.integers(-5, 5), st.integers(-(2**63), 2**64 - 1))
FLOAT_ANY = st.one_of(st.floats(), st.floats(-2, 2), st.integers(-3, 3))


@st.composite
def add_requests(draw) -> dict:
    fields = {"req_id": draw(st.text(max_size=12)),
              "prompt_token_ids": draw(st.lists(st.one_of(st.integers(0, 600), INT_ANY), min_size=0, max_size=10)),
              "max_tokens": draw(st.one_of(st.integers(1, 2), INT_ANY))}
    for key, strat in (("temperature", FLOAT_ANY), ("top_p", FLOAT_ANY), ("top_k", INT_ANY),
                       ("seed", st.one_of(st.none(), INT_ANY)), ("ignore_eos", st.booleans()),
                       ("logprobs", st.one_of(st.none(), INT_ANY)), ("stop_token_ids", st.lists(INT_ANY, max_size=3)),
                       ("priority", INT_ANY)):
        if draw(st.booleans()):
            fields[key] = draw(strat)
    return fields


@settings(FUZZ, max_examples=max(10, EXAMPLES // 4))
@given(fields=add_requests())
def test_fuzz_add_request_fields_on_the_real_engine(real_rank, fields):
    """Whatever values a (authenticated) frontend sends, the rank refuses them or serves them; it never dies.
    max_tokens is only bounded by the model's context here, so long valid requests are aborted after a while."""
    _count("rank AddRequest fields (real engine)")
    payload = msgpack.packb(["AddRequest", fields], use_bin_type=True)
    with connect(real_rank) as s:
        s.sendall(struct.pack(">I", len(payload)) + payload)
        s.settimeout(30)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            msg = wire.recv_frame(s)
            if isinstance(msg, wire.Error):
                break
            if any(o.finished for o in msg.outputs):
                break
    assert real_rank.running and real_rank.failure is None, real_rank.failure
    with connect(real_rank) as s:
        s.sendall(wire.encode(wire.Ping(1)))
        assert isinstance(wire.recv_frame(s), wire.Pong)
