"""RankClient: one asyncio connection to one rank's RankWorker (comm/wire.py frames both ways).

Outputs and per-request errors are handed to callbacks as they arrive; Ping and StatsRequest are
request/response calls answered in order. When the connection ends (the rank died, or sent garbage),
`on_lost` is called once with the reason. Every connection starts with the mutual HMAC handshake of
comm/auth.py over the launch secret; a rank that cannot prove it holds the secret is never sent a frame.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from comm import auth, wire

log = logging.getLogger(__name__)


class RankConnectionError(ConnectionError):
    """The rank's connection is down (or never came up)."""


class RankClient:
    def __init__(self, rank: int, address: tuple[str, int], on_output: Callable[[wire.Output], None],
                 on_error: Callable[[wire.Error], None], on_lost: Callable[[int, str], None],
                 max_frame_bytes: int = wire.MAX_FRAME_BYTES, *, secret: bytes) -> None:
        self.rank = rank
        self._secret = auth.check_secret(secret)
        self.address = (str(address[0]), int(address[1]))
        self._on_output = on_output
        self._on_error = on_error
        self._on_lost = on_lost
        self.max_frame_bytes = max_frame_bytes
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._stats_waiters: deque[asyncio.Future] = deque()
        self._pong_waiters: dict[int, asyncio.Future] = {}
        self._nonces = itertools.count(1)
        self.connected = False
        self.lost_reason: str | None = None

    async def connect(self, timeout_s: float = 30.0, retry_interval_s: float = 0.1) -> None:
        """Connect, retrying until `timeout_s` (a rank may still be starting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                self._reader, self._writer = await asyncio.open_connection(*self.address, limit=2**20)
                break
            except OSError as e:
                if loop.time() >= deadline:
                    raise RankConnectionError(f"rank {self.rank} at {self.address[0]}:{self.address[1]}: {e}") from e
                await asyncio.sleep(retry_interval_s)
        try:
            await auth.connect(self._reader, self._writer, self._secret)
        except (auth.AuthError, OSError) as e:
            self._writer.close()
            raise RankConnectionError(f"rank {self.rank} at {self.address[0]}:{self.address[1]}: "
                                      f"authentication failed: {e}") from e
        self.connected = True
        self.lost_reason = None
        self._task = asyncio.create_task(self._read_loop(), name=f"rank{self.rank}-reader")

    def send(self, msg: Any) -> None:
        """Queue one frame (no await: the transport buffers; callers need not block on a slow rank)."""
        if not self.connected or self._writer is None:
            raise RankConnectionError(f"rank {self.rank} is not connected ({self.lost_reason or 'not started'})")
        self._writer.write(wire.encode(msg))

    async def stats(self, timeout_s: float = 5.0) -> dict[str, Any]:
        fut = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(fut)
        self.send(wire.StatsRequest())
        return await asyncio.wait_for(fut, timeout_s)

    async def ping(self, timeout_s: float = 5.0) -> wire.Pong:
        nonce = next(self._nonces)
        fut = asyncio.get_running_loop().create_future()
        self._pong_waiters[nonce] = fut
        try:
            self.send(wire.Ping(nonce))
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._pong_waiters.pop(nonce, None)

    async def close(self) -> None:
        """Close without reporting a loss (the owner asked for it)."""
        self._on_lost = lambda rank, reason: None
        task, writer = self._task, self._writer
        self._mark_down("closed")
        if writer is not None:
            writer.close()
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    def _mark_down(self, reason: str) -> None:
        self.connected = False
        self.lost_reason = reason
        err = RankConnectionError(f"rank {self.rank}: {reason}")
        for fut in [*self._stats_waiters, *self._pong_waiters.values()]:
            if not fut.done():
                fut.set_exception(err)
        self._stats_waiters.clear()
        self._pong_waiters.clear()

    async def _read_loop(self) -> None:
        reason = "connection closed by the rank"
        try:
            assert self._reader is not None
            while True:
                msg = await wire.read_frame(self._reader, self.max_frame_bytes)
                if isinstance(msg, wire.Outputs):
                    for out in msg.outputs:
                        self._on_output(out)
                elif isinstance(msg, wire.Error):
                    if msg.req_id is None:
                        reason = f"rank error: {msg.message}"
                    self._on_error(msg)
                elif isinstance(msg, wire.Stats):
                    if self._stats_waiters:
                        fut = self._stats_waiters.popleft()
                        if not fut.done():
                            fut.set_result(msg.stats)
                elif isinstance(msg, wire.Pong):
                    fut = self._pong_waiters.get(msg.nonce)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                else:
                    raise wire.WireError(f"a rank sent an unexpected {type(msg).__name__}")
        except asyncio.CancelledError:
            raise
        except asyncio.IncompleteReadError:
            pass
        except (OSError, wire.WireError) as e:
            reason = f"{type(e).__name__}: {e}"
        if self.connected:
            self._mark_down(reason)
            if self._writer is not None:
                self._writer.close()
            log.warning("rank %d lost: %s", self.rank, reason)
            self._on_lost(self.rank, reason)
