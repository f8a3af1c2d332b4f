"""Wire protocol: every message round-trips; bad frames raise WireError and cost a rank only that connection."""

from __future__ import annotations

import socket
import struct

import msgpack
import pytest

from cluster.rank_server import RankWorker
from comm import wire
from scheduler.request import RequestOutput
from tests.stand_in import EchoEngine, connect

EXAMPLES = [
    wire.AddRequest("r1", [0, 5, 6], max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, seed=3, ignore_eos=True,
                    logprobs=2, stop_token_ids=[9], priority=1, min_tokens=2, presence_penalty=0.5,
                    frequency_penalty=-1.0, repetition_penalty=1.2, logit_bias_ids=[3, 8],
                    logit_bias_values=[-2.0, 5.5]),
    wire.AddRequest("r2", [1]),
    wire.Abort("r1"),
    wire.Output("r1", [4, 5], True, "length", [wire.TokenLogprob(-0.5, [4, 7], [-0.5, -1.25]),
                                                wire.TokenLogprob(-0.1, [], [])], 256),
    wire.Outputs([wire.Output("a", [1]), wire.Output("b", [], True, "abort")]),
    wire.Error("boom", "r1"),
    wire.Error("connection problem"),
    wire.StatsRequest(),
    wire.Stats(3, {"running": 2, "kv": 0.5, "name": "x", "expert_balancedness": [{"layer": 2, "balancedness": 0.8}],
                   "none": None}),
    wire.Ping(17),
    wire.Pong(17, 99),
    wire.Shutdown(),
]


def _payload(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_examples_cover_every_message_type():
    assert {type(m) for m in EXAMPLES} == set(wire.MESSAGES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frame = wire.encode(msg)
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    assert wire.decode_payload(frame[4:]) == msg


def test_round_trip_over_a_socket():
    a, b = socket.socketpair()
    with a, b:
        for msg in EXAMPLES:
            a.sendall(wire.encode(msg))
        assert [wire.recv_frame(b) for _ in EXAMPLES] == EXAMPLES


@pytest.mark.parametrize("payload, needle", [
    (b"\xc1", "undecodable"),  # never-used msgpack byte
    (_payload(["Abort", {"req_id": "x"}]) + b"\x00", "undecodable"),  # trailing bytes
    (_payload({"tag": "Abort"}), "[tag, fields]"),
    (_payload(["Nope", {}]), "unknown message tag 'Nope'"),
    (_payload(["Abort", {}]), "missing field 'req_id'"),
    (_payload(["Abort", {"req_id": "x", "extra": 1}]), "unknown field(s) ['extra']"),
    (_payload(["Abort", {"req_id": 5}]), "Abort.req_id: expected str, got int"),
    (_payload(["AddRequest", {"req_id": "x", "prompt_token_ids": [1, "2"]}]),
     "AddRequest.prompt_token_ids[1]: expected int, got str"),
    (_payload(["AddRequest", {"req_id": "x", "prompt_token_ids": [1], "ignore_eos": 1}]), "expected bool"),
    (_payload(["AddRequest", {"req_id": "x", "prompt_token_ids": [True]}]), "expected int, got bool"),
    (_payload(["Outputs", {"outputs": [{"req_id": "a", "new_token_ids": [], "logprobs": [{"logprob": "x"}]}]}]),
     "Outputs.outputs[0].logprobs[0].logprob: expected float"),
    (_payload(["Stats", {"rank": 0, "stats": {"a": b"bytes"}}]), "Stats.stats.a: value of type bytes"),
    (_payload(["Stats", {"rank": 0, "stats": {1: 2}}]), "str keys"),
    (msgpack.packb(["Ping", {"nonce": msgpack.ExtType(1, b"x")}]), "extension type 1"),
])
def test_bad_payloads_raise_wire_error(payload, needle):
    with pytest.raises(wire.WireError) as e:
        wire.decode_payload(payload)
    assert needle in str(e.value)


def test_oversized_frame_rejected_before_reading_the_payload(monkeypatch):
    header = struct.pack(">I", wire.MAX_FRAME_BYTES + 1)
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.frame_length(header)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(header)  # no payload follows: the limit must trip on the header alone
        with pytest.raises(wire.WireError, match="exceeds the limit"):
            wire.recv_frame(b)
    monkeypatch.setattr(wire, "MAX_FRAME_BYTES", 1000)
    with pytest.raises(wire.WireError, match="exceeds the limit of 1000"):
        wire.encode(wire.AddRequest("big", list(range(1000))))


def test_truncated_frame_is_a_connection_error():
    a, b = socket.socketpair()
    with b:
        frame = wire.encode(wire.Abort("x"))
        a.sendall(frame[:-2])
        a.close()
        with pytest.raises(ConnectionError):
            wire.recv_frame(b)


def test_encode_refuses_non_messages():
    with pytest.raises(wire.WireError, match="not a wire message"):
        wire.encode({"req_id": "x"})


def _collect(sock: socket.socket, req_id: str) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    while True:
        msg = wire.recv_frame(sock)
        if isinstance(msg, wire.Error):
            raise AssertionError(msg.message)
        for o in msg.outputs:
            assert o.req_id == req_id
            tokens += o.new_token_ids
            if o.finished:
                return tokens, o.finish_reason


@pytest.fixture
def echo_worker():
    engine = EchoEngine()
    worker = RankWorker(engine, "127.0.0.1", 0).start()
    yield worker, engine
    worker.stop()


def test_worker_serves_requests_stats_and_ping(echo_worker):
    worker, _ = echo_worker
    assert worker.address[0] == "127.0.0.1"
    with connect(worker) as s:
        s.sendall(wire.encode(wire.AddRequest("a", [0, 5, 6, 7], max_tokens=3)))
        assert _collect(s, "a") == ([0, 5, 6], "length")
        s.sendall(wire.encode(wire.Ping(5)))
        pong = wire.recv_frame(s)
        assert isinstance(pong, wire.Pong) and pong.nonce == 5 and pong.steps > 0
        s.sendall(wire.encode(wire.StatsRequest()))
        stats = wire.recv_frame(s)
        assert isinstance(stats, wire.Stats) and stats.rank == 0 and "running" in stats.stats
        s.sendall(wire.encode(wire.AddRequest("bad", [-1])))
        err = wire.recv_frame(s)
        assert isinstance(err, wire.Error) and err.req_id == "bad" and "out of range" in err.message
        s.sendall(wire.encode(wire.AddRequest("t", [1], temperature=-1.0)))
        err = wire.recv_frame(s)
        assert isinstance(err, wire.Error) and "temperature" in err.message
        s.sendall(wire.encode(wire.AddRequest("s", [1], seed=2**64 - 1)))  # torch would refuse it mid-step
        err = wire.recv_frame(s)
        assert isinstance(err, wire.Error) and "seed must be" in err.message
        s.sendall(wire.encode(wire.AddRequest("after", [4], max_tokens=1)))
        assert _collect(s, "after") == ([4], "length")


@pytest.mark.parametrize("bad, told", [
    (b"\x00\x00\x00\x05garba", True),  # not msgpack
    (struct.pack(">I", 2**31) + b"x" * 64, True),  # oversized
    (struct.pack(">I", len(_payload(["Nope", {}]))) + _payload(["Nope", {}]), True),  # unknown tag
    (struct.pack(">I", 8) + _payload(["Abort", {"req_id": 1}])[:8], True),  # cut short: decodes to junk
    (wire.encode(wire.Abort("x"))[:-3], False),  # truncated: the peer half-closes mid-frame
], ids=["garbage", "oversized", "unknown-tag", "short", "truncated"])
def test_bad_frame_drops_only_that_connection(echo_worker, bad, told):
    worker, engine = echo_worker
    good = connect(worker)
    evil = connect(worker)
    with good, evil:
        engine_live_before = dict(engine.live)
        good.sendall(wire.encode(wire.AddRequest("g1", [1, 2, 3, 4, 5, 6], max_tokens=6)))
        evil.sendall(wire.encode(wire.AddRequest("e1", list(range(1000)), max_tokens=1000)))
        evil.sendall(bad)
        evil.shutdown(socket.SHUT_WR)
        # the bad connection is told why (unless it just ended mid-frame), then closed; its request is aborted
        tail = b""
        while chunk := evil.recv(65536):
            tail += chunk
        assert (b"bad frame" in tail) == told
        assert _collect(good, "g1") == ([1, 2, 3, 4, 5, 6], "length")
        # the worker still serves: old and new connections
        good.sendall(wire.encode(wire.AddRequest("g2", [7, 8], max_tokens=2)))
        assert _collect(good, "g2") == ([7, 8], "length")
        with connect(worker) as fresh:
            fresh.sendall(wire.encode(wire.AddRequest("f", [3], max_tokens=1)))
            assert _collect(fresh, "f") == ([3], "length")
    assert worker.running and worker.failure is None
    assert "e1" not in engine.live and engine_live_before == {}


def test_closed_connection_aborts_its_requests(echo_worker):
    worker, engine = echo_worker
    with connect(worker) as s:
        s.sendall(wire.encode(wire.AddRequest("long", list(range(100000)), max_tokens=100000)))
        wire.recv_frame(s)  # it is running
    for _ in range(200):
        if "long" in engine.aborted:
            break
        worker.wait(0.02)
    assert "long" in engine.aborted


def test_priority_requests_wait_behind_interactive_ones():
    engine = EchoEngine()
    engine.stats = lambda: {"waiting": 10}  # the engine's queue looks full: background work is held
    worker = RankWorker(engine, "127.0.0.1", 0).start()
    try:
        with connect(worker) as s:
            s.sendall(wire.encode(wire.AddRequest("batch", [1, 2], max_tokens=2, priority=1)))
            s.sendall(wire.encode(wire.AddRequest("chat", [3, 4], max_tokens=2)))
            assert _collect(s, "chat") == ([3, 4], "length")
            assert "batch" not in engine.live
            engine.stats = lambda: {"waiting": 0}
            assert _collect(s, "batch") == ([1, 2], "length")
    finally:
        worker.stop()


def test_shutdown_frame_stops_the_worker(echo_worker):
    worker, _ = echo_worker
    with connect(worker) as s:
        s.sendall(wire.encode(wire.Shutdown()))
    assert worker.wait(5)


class BurstEngine(EchoEngine):
    """Each request's whole output (its prompt, 100 times over) in one step."""

    def step(self):
        outs = [RequestOutput(r, [], True, "abort") for r in self.pending_aborts]
        self.pending_aborts = []
        for rid, rest in list(self.live.items()):
            outs.append(RequestOutput(rid, rest * 100, True, "length"))
            del self.live[rid]
        return outs


def test_an_output_over_the_frame_limit_fails_only_its_request(monkeypatch):
    worker = RankWorker(BurstEngine(), "127.0.0.1", 0).start()
    try:
        with connect(worker) as s:
            monkeypatch.setattr(wire, "MAX_FRAME_BYTES", 300)  # the request fits, its 300-token output does not
            s.sendall(wire.encode(wire.AddRequest("wide", [1, 2, 3], max_tokens=3)))
            err = wire.recv_frame(s)
            assert isinstance(err, wire.Error) and err.req_id == "wide" and "too large" in err.message
            s.sendall(wire.encode(wire.AddRequest("ok", [2], max_tokens=1)))
            assert _collect(s, "ok") == ([2] * 100, "length")
        assert worker.running and worker.failure is None
    finally:
        worker.stop()
