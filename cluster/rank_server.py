"""RankWorker: one rank's step loop plus a TCP server speaking comm/wire.py frames.

Two threads. The step thread owns the engine (nothing else touches it):

    drain inbox -> admit by priority -> engine.step() -> send outputs -> if engine.idle(): wait for input
                                                                          (<= 5 ms when the step is collective)

The server thread runs an asyncio loop that accepts connections (bound to the given host only), authenticates
each peer (comm/auth.py: a mutual HMAC challenge over the launch secret; a peer that fails it is dropped before
a single frame is decoded, and at most MAX_PENDING_AUTH connections may be mid-handshake), decodes frames and
puts requests into the inbox; Shutdown is obeyed only on an authenticated connection, like every message.
Ping and StatsRequest are answered there from the latest stats
snapshot, so a long step never delays a health check. A connection that sends a bad frame gets an Error
and is closed; its requests are aborted, and every other connection carries on.

Works with LLMEngine (world 1) and with the EP engine, whose step() is collective: every rank runs a
RankWorker and each loop iteration calls step() whether or not this rank has work.

Priority: requests with priority <= 0 (interactive) go to the engine at once; others (batch jobs) are
held here and admitted only while the engine's own queue is short, so interactive requests overtake them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import socket
import threading
import time
from collections import deque
from typing import Any

from comm import auth, wire
from scheduler.sampling import SamplingParams

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.005
SOLO_IDLE_WAIT_S = 0.5
STATS_INTERVAL_S = 0.05
BACKGROUND_QUEUE = 4  # admit priority > 0 requests only while fewer than this many wait in the engine
MAX_PENDING_AUTH = 64  # connections allowed to be mid-handshake at once; more are closed at once


SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.Generator.manual_seed takes on every platform


def sampling_params(msg: wire.AddRequest) -> SamplingParams:
    """The engine's SamplingParams for a wire AddRequest (raises ValueError on bad values)."""
    if msg.seed is not None and not SEED_RANGE[0] <= msg.seed <= SEED_RANGE[1]:
        raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {msg.seed}")
    return SamplingParams(temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k, max_tokens=msg.max_tokens,
                          stop_token_ids=tuple(msg.stop_token_ids), seed=msg.seed, ignore_eos=msg.ignore_eos,
                          logprobs=msg.logprobs, min_tokens=msg.min_tokens, presence_penalty=msg.presence_penalty,
                          frequency_penalty=msg.frequency_penalty, repetition_penalty=msg.repetition_penalty,
                          logit_bias=_logit_bias(msg))


def _logit_bias(msg: wire.AddRequest) -> dict[int, float]:
    if len(msg.logit_bias_ids) != len(msg.logit_bias_values):
        raise ValueError(f"logit_bias_ids ({len(msg.logit_bias_ids)}) and logit_bias_values "
                         f"({len(msg.logit_bias_values)}) differ in length")
    return dict(zip(msg.logit_bias_ids, msg.logit_bias_values))


def _plain_stats(value: Any) -> Any:
    """Engine stats as plain msgpack types (tensors and numpy scalars become numbers or lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain_stats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_stats(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain_stats(value.tolist())
    return str(value)


class _Conn:
    """One client connection (lives in the server thread; the step thread only calls `send` through the loop)."""

    def __init__(self, cid: int, writer: asyncio.StreamWriter) -> None:
        self.cid = cid
        self.writer = writer
        self.closed = False
        self.drop_posted = False  # the step thread saw the transport close and asked for this connection's aborts

    @property
    def gone(self) -> bool:
        """The peer went away: the handler finished, or a failed write already closed the transport."""
        return self.closed or self.writer.transport.is_closing()

    def send(self, data: bytes) -> None:
        if not self.gone:
            self.writer.write(data)


def build_cpu_kernels(engine: Any) -> None:
    """Compile the C routed-expert kernel now when the engine computes on the CPU. Its first use on a machine
    compiles it (seconds; a minute or more on a loaded CPU); inside the first step that time would count
    against the launcher's step watchdog (`health.step_timeout_s`), whose restart kills the compile, so every
    new generation would start it afresh and none would finish (cached afterwards: a no-op)."""
    if getattr(getattr(engine, "config", None), "device", None) != "cpu":
        return
    from engine.kernels.cpu import moe_mlp_available

    moe_mlp_available()


class RankWorker:
    def __init__(self, engine: Any, host: str = "127.0.0.1", port: int = 0, rank: int = 0,
                 max_frame_bytes: int = wire.MAX_FRAME_BYTES, idle_wait_s: float = IDLE_WAIT_S,
                 secret: bytes | None = None, auth_timeout_s: float = auth.HANDSHAKE_TIMEOUT_S) -> None:
        """`secret`: the launch secret every peer must prove it holds (None: a fresh one, read `.secret`)."""
        self.engine = engine
        self.secret = auth.new_secret() if secret is None else auth.check_secret(secret)
        self.auth_timeout_s = auth_timeout_s
        self.auth_failures = 0  # connections dropped for failing the handshake
        self._pending_auth = 0
        self.rank = rank
        self.max_frame_bytes = max_frame_bytes
        self.idle_wait_s = idle_wait_s
        # Bound here so `address` is known before start(); only the given host's interface listens.
        self._sock = socket.create_server((host, port), reuse_port=False)
        self._sock.setblocking(False)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._inbox: deque[tuple] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server_ready = threading.Event()
        self._conns: dict[int, _Conn] = {}
        self._handlers: set[asyncio.Task] = set()
        self._cids = itertools.count()
        # step-thread state
        self._owner: dict[str, int] = {}  # live req_id -> connection id
        self._held: list[tuple[int, int, int, wire.AddRequest]] = []  # (priority, seq, cid, msg) not yet admitted
        self._seq = itertools.count()
        self.steps = 0
        self.failure: BaseException | None = None
        self._stats: dict[str, Any] = {}
        self._stats_time = 0.0
        self._threads: list[threading.Thread] = []

    # ---------------- lifecycle ----------------
    def start(self) -> RankWorker:
        build_cpu_kernels(self.engine)
        self._refresh_stats(force=True)
        server = threading.Thread(target=self._serve, name=f"rank{self.rank}-server", daemon=True)
        server.start()
        self._server_ready.wait(10)
        step = threading.Thread(target=self._step_loop, name=f"rank{self.rank}-step", daemon=True)
        step.start()
        self._threads = [server, step]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker stops (a Shutdown frame, stop(), or a failed step); True if it stopped."""
        return self._stop.wait(timeout)

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    # ---------------- server thread ----------------
    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve_async())
        finally:
            loop.close()

    async def _serve_async(self) -> None:
        server = await asyncio.start_server(self._handle, sock=self._sock, limit=2**20)
        self._server_ready.set()
        try:
            while not self._stop.is_set():
                await asyncio.sleep(0.02)
        finally:
            server.close()
            for conn in list(self._conns.values()):
                conn.closed = True
                conn.writer.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Run the handshake; False (the connection is closed, nothing was decoded) if the peer fails it."""
        if self._pending_auth >= MAX_PENDING_AUTH:
            self.auth_failures += 1
            writer.close()
            return False
        self._pending_auth += 1
        try:
            await auth.accept(reader, writer, self.secret, self.auth_timeout_s)
            return True
        except (auth.AuthError, OSError) as e:
            self.auth_failures += 1
            peer = writer.get_extra_info("peername")
            log.warning("rank %d: dropping unauthenticated connection from %s: %s", self.rank, peer, e)
            writer.close()
            return False
        finally:
            self._pending_auth -= 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            if not await self._authenticate(reader, writer):
                return
            await self._serve_conn(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(next(self._cids), writer)
        self._conns[conn.cid] = conn
        try:
            while not self._stop.is_set():
                try:
                    msg = await wire.read_frame(reader, self.max_frame_bytes)
                except wire.WireError as e:
                    log.warning("rank %d: dropping connection %d: %s", self.rank, conn.cid, e)
                    conn.send(wire.encode(wire.Error(f"bad frame: {e}")))
                    return
                self._on_message(conn, msg)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the peer went away
        finally:
            conn.closed = True
            self._conns.pop(conn.cid, None)
            self._post(("drop", conn.cid))
            writer.close()  # the transport flushes what is buffered (e.g. the Error above), then closes

    def _on_message(self, conn: _Conn, msg: Any) -> None:
        if isinstance(msg, wire.AddRequest):
            self._post(("add", conn.cid, msg))
        elif isinstance(msg, wire.Abort):
            self._post(("abort", conn.cid, msg.req_id))
        elif isinstance(msg, wire.Ping):
            conn.send(wire.encode(wire.Pong(msg.nonce, self.steps)))
        elif isinstance(msg, wire.StatsRequest):
            conn.send(wire.encode(wire.Stats(self.rank, self._stats)))
        elif isinstance(msg, wire.Shutdown):
            self._stop.set()
            self._wake.set()
        else:
            conn.send(wire.encode(wire.Error(f"a rank does not accept {type(msg).__name__} messages")))

    def _post(self, item: tuple) -> None:
        self._inbox.append(item)
        self._wake.set()

    def _send(self, cid: int, msg: Any) -> None:
        """From the step thread: queue one frame to connection `cid` (dropped if it has gone)."""
        conn = self._conns.get(cid)
        loop = self._loop
        if conn is None or loop is None or loop.is_closed():
            return
        if conn.gone:
            # Abort its requests now, from this thread: the server thread may sit behind a backlog of sends
            # queued for this very connection, and would see the close only after working through it.
            if not conn.drop_posted:
                conn.drop_posted = True
                self._post(("drop", cid))
            return
        try:
            data = wire.encode(msg)
        except wire.WireError as e:  # over the frame limit: fail those requests, never the step loop
            log.error("rank %d: cannot send %s: %s", self.rank, type(msg).__name__, e)
            for out in getattr(msg, "outputs", []):
                if not out.finished:
                    self.engine.abort_request(out.req_id)
                self._owner.pop(out.req_id, None)
                self._send(cid, wire.Error(f"output too large for the wire: {e}", out.req_id))
            return
        try:
            loop.call_soon_threadsafe(conn.send, data)
        except RuntimeError:  # loop closing
            pass

    # ---------------- step thread ----------------
    def _step_loop(self) -> None:
        engine = self.engine
        # A collective engine must step again soon (a peer may have work); a world-1 engine can sleep until
        # input arrives (the inbox sets the event, so waiting longer adds no latency).
        wait_s = self.idle_wait_s if getattr(engine, "ep_size", 1) > 1 else SOLO_IDLE_WAIT_S
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._drain()
                self._admit()
                outs = engine.step()
                self.steps += 1
                if outs:
                    self._deliver(outs)
                self._refresh_stats()
                if engine.idle() and not self._inbox and not self._held:
                    self._refresh_stats(force=wait_s > STATS_INTERVAL_S)  # current while a long wait lasts
                    self._wake.wait(wait_s)
        except BaseException as e:  # a failed step ends this rank: its peers see the sockets close
            log.exception("rank %d: step loop failed", self.rank)
            self.failure = e
            for cid in set(self._owner.values()):
                self._send(cid, wire.Error(f"rank {self.rank} failed: {type(e).__name__}: {e}"))
            self._stop.set()

    def _drain(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            kind = item[0]
            if kind == "add":
                _, cid, msg = item
                if msg.priority <= 0:
                    self._add(cid, msg)
                else:
                    heapq.heappush(self._held, (msg.priority, next(self._seq), cid, msg))
            elif kind == "abort":
                _, cid, req_id = item
                self._abort(req_id, cid)
            elif kind == "drop":
                _, cid = item
                for req_id in [r for r, c in self._owner.items() if c == cid]:
                    self._abort(req_id, cid)
                self._held = [h for h in self._held if h[2] != cid]
                heapq.heapify(self._held)

    def _admit(self) -> None:
        if not self._held:
            return
        waiting = int(self.engine.stats().get("waiting", 0))
        while self._held and waiting < BACKGROUND_QUEUE:
            _, _, cid, msg = heapq.heappop(self._held)
            if self._add(cid, msg):
                waiting += 1

    def _add(self, cid: int, msg: wire.AddRequest) -> bool:
        if msg.req_id in self._owner:
            self._send(cid, wire.Error(f"duplicate req_id {msg.req_id!r}: a request with this id is live",
                                       msg.req_id))
            return False
        try:
            self.engine.add_request(list(msg.prompt_token_ids), sampling_params(msg), msg.req_id)
        except (ValueError, TypeError, OverflowError) as e:  # a bad request must not end the step loop
            self._send(cid, wire.Error(str(e), msg.req_id))
            return False
        self._owner[msg.req_id] = cid
        return True

    def _abort(self, req_id: str, cid: int) -> None:
        for i, h in enumerate(self._held):
            if h[3].req_id == req_id and h[2] == cid:
                self._held.pop(i)
                heapq.heapify(self._held)
                self._send(cid, wire.Outputs([wire.Output(req_id, [], True, "abort")]))
                return
        if self._owner.get(req_id) == cid:
            self.engine.abort_request(req_id)  # the abort output comes back from the next step

    def _deliver(self, outs: list) -> None:
        by_conn: dict[int, list[wire.Output]] = {}
        for ro in outs:
            cid = self._owner.get(ro.req_id)
            if ro.finished:
                self._owner.pop(ro.req_id, None)
            if cid is None:
                continue
            lps = None
            if ro.new_logprobs is not None:
                lps = [wire.TokenLogprob(float(lp), [int(t) for t in top], [float(v) for v in top.values()])
                       for lp, top in ro.new_logprobs]
            by_conn.setdefault(cid, []).append(wire.Output(
                ro.req_id, [int(t) for t in ro.new_token_ids], bool(ro.finished), ro.finish_reason, lps,
                int(ro.num_cached_tokens)))
        for cid, items in by_conn.items():
            self._send(cid, wire.Outputs(items))

    def _refresh_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats_time < STATS_INTERVAL_S:
            return
        self._stats_time = now
        stats = _plain_stats(self.engine.stats())
        stats.update(worker_steps=self.steps, held_requests=len(self._held), live_requests=len(self._owner))
        self._stats = stats  # one reference swap: the server thread reads it without a lock
