"""Authenticated ranks: a peer without the launch secret is dropped before any frame is decoded, a forged
Shutdown does nothing, and the rank keeps serving the authenticated frontend meanwhile (comm/auth.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time

import pytest

from cluster.rank_client import RankConnectionError
from cluster.rank_server import RankWorker
from cluster.router import Router
from comm import auth, wire
from scheduler.sampling import SamplingParams
from tests.stand_in import EchoEngine, connect


@pytest.fixture
def worker():
    w = RankWorker(EchoEngine(), "127.0.0.1", 0, auth_timeout_s=1.0).start()
    yield w
    w.stop()


@pytest.fixture
def decodes(monkeypatch):
    """Every payload the rank decodes (wire.decode_payload is wrapped)."""
    seen: list[bytes] = []
    real = wire.decode_payload

    def counting(payload: bytes):
        seen.append(payload)
        return real(payload)

    monkeypatch.setattr(wire, "decode_payload", counting)
    return seen


def _collect(sock: socket.socket, req_id: str) -> list[int]:
    tokens: list[int] = []
    while True:
        msg = wire.recv_frame(sock)
        assert not isinstance(msg, wire.Error), msg.message
        for o in msg.outputs:
            assert o.req_id == req_id
            tokens += o.new_token_ids
            if o.finished:
                return tokens


def _read_until_closed(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_raw_socket_without_the_secret_is_dropped_and_others_keep_being_served(worker, decodes):
    with connect(worker) as good:
        good.sendall(wire.encode(wire.AddRequest("g1", [5, 6, 7, 8], max_tokens=4)))
        assert _collect(good, "g1") == [5, 6, 7, 8]
        decoded_before = len(decodes)
        for frame in (wire.encode(wire.AddRequest("evil", list(range(50)), max_tokens=50)),
                      wire.encode(wire.Ping(1)), wire.encode(wire.StatsRequest())):
            with socket.create_connection(worker.address, timeout=10) as raw:
                raw.sendall(frame)  # a well-formed frame, but no handshake
                got = _read_until_closed(raw)
            # all it ever saw is the challenge; nothing it sent was decoded or answered
            assert got.startswith(auth.MAGIC) and len(got) == auth.CHALLENGE_BYTES
        assert len(decodes) == decoded_before
        assert worker.auth_failures == 3 and "evil" not in worker.engine.live
        good.sendall(wire.encode(wire.AddRequest("g2", [9, 10], max_tokens=2)))
        assert _collect(good, "g2") == [9, 10]
    with connect(worker) as fresh:
        fresh.sendall(wire.encode(wire.AddRequest("f", [3], max_tokens=1)))
        assert _collect(fresh, "f") == [3]
    assert worker.running and worker.failure is None


def test_a_forged_shutdown_does_nothing(worker, decodes):
    # 1. straight onto the socket
    with socket.create_connection(worker.address, timeout=10) as raw:
        raw.sendall(wire.encode(wire.Shutdown()))
        _read_until_closed(raw)
    # 2. after answering the challenge with the wrong secret
    with socket.create_connection(worker.address, timeout=10) as raw:
        with pytest.raises(auth.AuthError):
            auth.connect_socket(raw, b"not-the-launch-secret-at-all")
        try:
            raw.sendall(wire.encode(wire.Shutdown()))
            _read_until_closed(raw)
        except OSError:
            pass  # already reset by the rank
    # 3. replaying a response captured from someone else's handshake (the nonce differs every time)
    with socket.create_connection(worker.address, timeout=10) as a:
        challenge = a.recv(auth.CHALLENGE_BYTES)
        _, response = auth.answer(worker.secret, challenge)
    with socket.create_connection(worker.address, timeout=10) as b:
        b.recv(auth.CHALLENGE_BYTES)
        b.sendall(response + wire.encode(wire.Shutdown()))
        assert _read_until_closed(b) == b""
    assert not worker.wait(0.5), "a forged Shutdown stopped the rank"
    assert worker.running and decodes == []
    assert worker.auth_failures == 4  # the silent first connection of case 3 counts too
    with connect(worker) as good:  # still serving
        good.sendall(wire.encode(wire.Ping(7)))
        pong = wire.recv_frame(good)
        assert isinstance(pong, wire.Pong) and pong.nonce == 7
    # ... while the authenticated driver's Shutdown is obeyed
    with connect(worker) as driver:
        driver.sendall(wire.encode(wire.Shutdown()))
    assert worker.wait(5)


def test_a_silent_peer_is_dropped_after_the_handshake_timeout(worker):
    with socket.create_connection(worker.address, timeout=10) as raw:
        t0 = time.monotonic()
        got = _read_until_closed(raw)
        waited = time.monotonic() - t0
    assert len(got) == auth.CHALLENGE_BYTES and 0.5 < waited < 8
    assert worker.auth_failures == 1 and worker.running


def test_the_client_refuses_a_rank_without_the_secret():
    """Mutual: a listener that cannot prove the secret (here: answers with random bytes) is refused."""
    async def main():
        async def impostor(reader, writer):
            _, first = auth.challenge()
            writer.write(first)
            await reader.readexactly(auth.RESPONSE_BYTES)
            writer.write(os.urandom(auth.MAC_BYTES))
            await writer.drain()
            await asyncio.sleep(1)
            writer.close()

        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()[:2]
        try:
            router = Router([addr], secret=b"the-right-secret-0123")
            with pytest.raises(RankConnectionError, match="authentication failed.*proof"):
                await router.start()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_router_with_the_wrong_secret_is_refused_and_the_right_one_served(worker):
    async def main():
        with pytest.raises(RankConnectionError, match="authentication failed"):
            await Router([worker.address], secret=b"a-different-secret-0123").start()
        router = await Router([worker.address], secret=worker.secret).start()
        try:
            toks = []
            async for out in router.submit([4, 5, 6], SamplingParams(temperature=0, max_tokens=3)):
                toks += out.new_token_ids
            return toks
        finally:
            await router.close()

    assert asyncio.run(asyncio.wait_for(main(), 30)) == [4, 5, 6]


def test_secrets_are_checked_and_fresh():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        auth.check_secret(b"short")
    with pytest.raises(ValueError, match="must be bytes"):
        auth.check_secret("a string secret")
    assert auth.new_secret() != auth.new_secret() and len(auth.new_secret()) == 32
    with pytest.raises(ValueError, match="at least 16 bytes"):
        RankWorker(EchoEngine(), "127.0.0.1", 0, secret=b"x")


def test_state_files_are_private(tmp_path):
    from cluster.service import _write_json

    _write_json(tmp_path / "up.json", {"pid": 1})
    (tmp_path / "status.json").write_text("{}")
    os.chmod(tmp_path / "status.json", 0o644)
    _write_json(tmp_path / "status.json", {"pid": 2})
    for name in ("up.json", "status.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
