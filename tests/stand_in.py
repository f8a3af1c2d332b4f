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


class StandInServer:
    """The real frontend (Router, OpenAIService, aiohttp app with every middleware and the batch routes) over
    one RankWorker driving `engine` (EchoEngine by default), served from a background thread's event loop."""

    def __init__(self, ckpt: Any, settings: Any, engine: Any | None = None, max_model_len: int = 256) -> None:
        self.ckpt = ckpt
        self.settings = settings
        self.engine = engine if engine is not None else EchoEngine()
        self.max_model_len = max_model_len
        self.url = ""
        self.port = 0
        self.service: Any = None
        self.loop: Any = None

    def __enter__(self) -> StandInServer:
        import asyncio
        import threading

        from cluster.rank_server import RankWorker
        from cluster.router import Router
        from cluster.server.app import build_app, serve
        from cluster.server.openai_api import ModelInfo, OpenAIService
        from engine.weights.tokenizer import load_tokenizer

        self.worker = RankWorker(self.engine, "127.0.0.1", 0).start()
        tokenizer = load_tokenizer(self.ckpt)
        info = ModelInfo.from_checkpoint(self.ckpt, "tiny", self.max_model_len)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._stop = asyncio.Event()
        failed: list[BaseException] = []

        async def main() -> None:
            try:
                router = await Router([self.worker.address], secret=self.worker.secret).start()
                self.service = OpenAIService(router, tokenizer, info)
                runner, self.port = await serve(build_app(self.service, self.settings), "127.0.0.1", 0)
            except BaseException as e:
                failed.append(e)
                ready.set()
                raise
            self.url = f"http://127.0.0.1:{self.port}"
            ready.set()
            await self._stop.wait()
            await runner.cleanup()
            await router.close()

        self._thread = threading.Thread(target=lambda: self.loop.run_until_complete(main()), daemon=True)
        self._thread.start()
        if not ready.wait(60) or failed:
            self.worker.stop()
            raise RuntimeError(f"the stand-in server did not start: {failed}")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self.worker.stop()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout_s: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one raw HTTP request (bytes as given: they need not be valid JSON)."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()
