"""A stand-in rank for tests that need the wire protocol and the frontend but not the model: EchoEngine (the
engine surface RankWorker drives, answering each request with its own prompt, one token per step), and
`connect(worker)` (a blocking socket that has passed the worker's authentication handshake)."""

from __future__ import annotations

import socket
from typing import Any

from comm import auth
from scheduler.request import RequestOutput


class EchoEngine:
    """The engine surface the worker needs: each request yields its prompt back, one token per step."""

    def __init__(self) -> None:
        self.live: dict[str, list[int]] = {}
        self.aborted: list[str] = []
        self.pending_aborts: list[str] = []

    def add_request(self, prompt_token_ids: list[int], params: Any, req_id: str) -> str:
        if any(t < 0 for t in prompt_token_ids):
            raise ValueError(f"prompt token ids out of range: {[t for t in prompt_token_ids if t < 0]}")
        self.live[req_id] = list(prompt_token_ids)[: params.max_tokens]
        return req_id

    def abort_request(self, req_id: str) -> bool:
        if self.live.pop(req_id, None) is None:
            return False
        self.aborted.append(req_id)
        self.pending_aborts.append(req_id)
        return True

    def step(self) -> list[RequestOutput]:
        outs = [RequestOutput(r, [], True, "abort") for r in self.pending_aborts]
        self.pending_aborts = []
        for rid, rest in list(self.live.items()):
            tok = rest.pop(0)
            outs.append(RequestOutput(rid, [tok], not rest, "length" if not rest else None))
            if not rest:
                del self.live[rid]
        return outs

    def idle(self) -> bool:
        return not self.live and not self.pending_aborts

    def stats(self) -> dict[str, int]:
        return {"running": len(self.live), "waiting": 0}


def connect(worker: Any, timeout_s: float = 10.0) -> socket.socket:
    """A blocking socket to `worker` that has passed its authentication handshake."""
    sock = socket.create_connection(worker.address, timeout=timeout_s)
    try:
        auth.connect_socket(sock, worker.secret)
    except BaseException:
        sock.close()
        raise
    return sock
