"""Mutual HMAC authentication of a connection to a rank, before any wire frame is exchanged.

Every launch (`megaserve up`, `python -m cluster.server`) draws one secret (`new_secret()`) and hands it to its
ranks (through Ray's actor calls, or the spawn pipe of local rank processes) and to its router; it is never
logged or written to a file. A connection to a rank then starts with this exchange of fixed-size raw bytes:

    rank   -> peer : MAGIC | rank_nonce                                         (8 + 32 bytes)
    peer   -> rank : MAGIC | peer_nonce | HMAC(secret, "peer" | rank_nonce | peer_nonce)   (8 + 32 + 32 bytes)
    rank   -> peer : HMAC(secret, "rank" | peer_nonce | rank_nonce)             (32 bytes)

Both sides prove they hold the secret, each over a nonce the other chose (no replay), with a role label in
the MAC (a rank's answer cannot be reflected back as a peer's). MACs are compared with
`hmac.compare_digest`. The whole exchange has a deadline (`HANDSHAKE_TIMEOUT_S`). Nothing here is msgpack: a
peer without the secret is dropped before a single frame is decoded.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import socket

from comm import wire

MAGIC = b"MSAUTH1\n"
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
MIN_SECRET_BYTES = 16
HANDSHAKE_TIMEOUT_S = 5.0
CHALLENGE_BYTES = len(MAGIC) + NONCE_BYTES
RESPONSE_BYTES = len(MAGIC) + NONCE_BYTES + MAC_BYTES


class AuthError(ConnectionError):
    """The peer did not prove it holds the launch secret (wrong secret, wrong protocol, or too slow)."""


def new_secret() -> bytes:
    """A fresh per-launch secret (32 random bytes)."""
    return secrets.token_bytes(32)


def check_secret(secret: object) -> bytes:
    """`secret` as bytes, or ValueError when it is not bytes of at least MIN_SECRET_BYTES."""
    if not isinstance(secret, (bytes, bytearray)):
        raise ValueError(f"the rank secret must be bytes, got {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the rank secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
    return bytes(secret)


def _mac(secret: bytes, role: bytes, theirs: bytes, mine: bytes) -> bytes:
    return hmac.new(secret, role + b"|" + theirs + b"|" + mine, hashlib.sha256).digest()


def challenge() -> tuple[bytes, bytes]:
    """(the rank's nonce, the bytes the rank sends first)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce, MAGIC + nonce


def answer(secret: bytes, challenge_bytes: bytes) -> tuple[bytes, bytes]:
    """The peer's side: (its nonce, its response) to a rank's challenge; AuthError if it is not one."""
    if len(challenge_bytes) != CHALLENGE_BYTES or not challenge_bytes.startswith(MAGIC):
        raise AuthError("the rank did not open with an authentication challenge")
    rank_nonce = challenge_bytes[len(MAGIC):]
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce, MAGIC + nonce + _mac(secret, b"peer", rank_nonce, nonce)


def verify_response(secret: bytes, rank_nonce: bytes, response: bytes) -> bytes:
    """The rank's side: check a peer's response; returns the rank's proof to send back (AuthError if bad)."""
    if len(response) != RESPONSE_BYTES or not response.startswith(MAGIC):
        raise AuthError("the peer did not answer the authentication challenge")
    peer_nonce = response[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    mac = response[len(MAGIC) + NONCE_BYTES:]
    if not hmac.compare_digest(mac, _mac(secret, b"peer", rank_nonce, peer_nonce)):
        raise AuthError("the peer's proof does not match the launch secret")
    if hmac.compare_digest(peer_nonce, rank_nonce):
        raise AuthError("the peer echoed the rank's nonce")
    return _mac(secret, b"rank", peer_nonce, rank_nonce)


def verify_proof(secret: bytes, rank_nonce: bytes, peer_nonce: bytes, proof: bytes) -> None:
    """The peer's side: check the rank's proof (AuthError if the rank does not hold the secret)."""
    if len(proof) != MAC_BYTES or not hmac.compare_digest(proof, _mac(secret, b"rank", peer_nonce, rank_nonce)):
        raise AuthError("the rank's proof does not match the launch secret")


# ======================= asyncio transports =======================
async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes,
                 timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """The rank's side of the handshake on a new connection; AuthError (or EOF/OSError) if the peer fails it."""
    nonce, first = challenge()

    async def run() -> None:
        writer.write(first)
        await writer.drain()
        proof = verify_response(secret, nonce, await reader.readexactly(RESPONSE_BYTES))
        writer.write(proof)
        await writer.drain()

    try:
        await asyncio.wait_for(run(), timeout_s)
    except asyncio.TimeoutError:
        raise AuthError(f"the peer did not authenticate within {timeout_s:g}s") from None
    except asyncio.IncompleteReadError as e:
        raise AuthError(f"the peer closed during authentication after {len(e.partial)} bytes") from None


async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes,
                  timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """The peer's side of the handshake on a fresh connection to a rank; AuthError if either proof fails."""

    async def run() -> None:
        first = await reader.readexactly(CHALLENGE_BYTES)
        nonce, response = answer(secret, first)
        writer.write(response)
        await writer.drain()
        verify_proof(secret, first[len(MAGIC):], nonce, await reader.readexactly(MAC_BYTES))

    try:
        await asyncio.wait_for(run(), timeout_s)
    except asyncio.TimeoutError:
        raise AuthError(f"the rank did not complete authentication within {timeout_s:g}s") from None
    except asyncio.IncompleteReadError:
        raise AuthError("the rank closed the connection during authentication (wrong secret?)") from None


# ======================= blocking sockets (scripts, tests) =======================
def connect_socket(sock: socket.socket, secret: bytes, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """The peer's side of the handshake on a connected blocking socket."""
    old = sock.gettimeout()
    sock.settimeout(timeout_s)
    try:
        first = _recv_exact(sock, CHALLENGE_BYTES)
        nonce, response = answer(secret, first)
        sock.sendall(response)
        verify_proof(secret, first[len(MAGIC):], nonce, _recv_exact(sock, MAC_BYTES))
    except TimeoutError:
        raise AuthError(f"the rank did not complete authentication within {timeout_s:g}s") from None
    finally:
        sock.settimeout(old)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    try:
        return wire.recv_exact(sock, n)
    except ConnectionError as e:
        raise AuthError(f"the rank closed the connection during authentication ({e})") from None
