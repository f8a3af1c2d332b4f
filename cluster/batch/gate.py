"""Admission gate: batch requests run only in the capacity interactive requests leave free.

A batch request may start while `batch_inflight + interactive_inflight < limit`; interactive requests are
never held back, they only take capacity away from batch jobs (so a burst of interactive traffic pauses new
batch requests, and batch jobs fill the server again when it quiets down). The HTTP middleware from
routes.py counts interactive requests; the batch runner asks for slots.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class AdmissionGate:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"batch concurrency must be >= 1, got {limit}")
        self.limit = limit
        self.batch_inflight = 0
        self.interactive_inflight = 0
        self._waiters: list[asyncio.Future[None]] = []

    def _batch_may_start(self) -> bool:
        return self.batch_inflight + self.interactive_inflight < self.limit

    async def acquire_batch(self) -> None:
        """Wait for a free batch slot and take it (cancellation-safe: a cancelled wait takes nothing)."""
        while not self._batch_may_start():
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        self.batch_inflight += 1  # no await between the check and this line: atomic on the event loop

    def release_batch(self) -> None:
        assert self.batch_inflight > 0, "release_batch without acquire_batch"
        self.batch_inflight -= 1
        self._wake()

    @asynccontextmanager
    async def interactive(self) -> AsyncIterator[None]:
        """Count one interactive request for as long as the block runs."""
        self.interactive_inflight += 1
        try:
            yield
        finally:
            self.interactive_inflight -= 1
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
