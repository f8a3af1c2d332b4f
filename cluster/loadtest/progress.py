"""The live progress line of `megaserve bench serve`: a bar, completed / failed / in-flight requests, and output
throughput now (the last `window_s` seconds) and on average since the start.

Throughput counts streamed chunks as they arrive, scaled by the tokens-per-chunk ratio of the requests finished
so far (`usage.completion_tokens` / chunks; 1 until one finishes), so it is in tokens/s even for servers that send
several tokens per chunk. On a terminal the line is redrawn in place every `interval_s`; otherwise (a log file,
CI) one line is written every `log_interval_s` and a last one at the end.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

from cluster.loadtest.client import RequestRecord


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None, window_s: float = 5.0,
                 interval_s: float = 0.25, log_interval_s: float = 5.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.window_s, self.clock = window_s, clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if self.tty else log_interval_s
        self.t0 = clock()
        self.started = self.completed = self.failed = 0
        self.chunks = 0  # all chunks received so far
        self.recent: deque[float] = deque()  # arrival times of the chunks in the window
        self.done_tokens = self.done_chunks = 0  # of finished successful requests: usage tokens and chunks
        self._finished = False

    # ---- events -----------------------------------------------------------------------------------------
    def on_start(self) -> None:
        self.started += 1

    def on_chunk(self, now: float) -> None:
        self.chunks += 1
        self.recent.append(now)

    def on_done(self, rec: RequestRecord) -> None:
        if rec.success:
            self.completed += 1
            self.done_tokens += rec.output_tokens
            self.done_chunks += len(rec.chunk_times)
        else:
            self.failed += 1

    # ---- figures ----------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self.started - self.completed - self.failed

    def tokens_per_chunk(self) -> float:
        return self.done_tokens / self.done_chunks if self.done_chunks else 1.0

    def throughput_now(self, now: float) -> float:
        """Output tokens/s over the last `window_s` seconds (or since the start, if shorter)."""
        while self.recent and self.recent[0] < now - self.window_s:
            self.recent.popleft()
        span = min(self.window_s, now - self.t0)
        return len(self.recent) * self.tokens_per_chunk() / span if span > 0 else 0.0

    def throughput_avg(self, now: float) -> float:
        span = now - self.t0
        return self.chunks * self.tokens_per_chunk() / span if span > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        done = self.completed + self.failed
        width = 24
        filled = width * done // self.total if self.total else width
        bar = "#" * filled + "." * (width - filled)
        return (f"[bench] |{bar}| {done}/{self.total}: {self.completed} completed, {self.failed} failed, "
                f"{self.in_flight} in flight | output {self.throughput_now(now):,.1f} tok/s now, "
                f"{self.throughput_avg(now):,.1f} avg | {now - self.t0:,.1f}s")

    # ---- drawing ----------------------------------------------------------------------------------------
    def render(self, final: bool = False) -> None:
        if not self.enabled:
            return
        text = self.line()
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    async def run(self) -> None:
        """Redraw until `finish()`; run it as a task next to the requests."""
        while not self._finished:
            await asyncio.sleep(self.interval_s)
            if not self._finished:
                self.render()

    def finish(self) -> None:
        self._finished = True
        self.render(final=True)
