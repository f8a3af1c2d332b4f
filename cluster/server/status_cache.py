"""StatusCache: what /health and /metrics report about the ranks, refreshed once per ping interval.

One background task asks every rank for its stats (one RPC per rank per interval, whatever the number of
probes and scrapers); /health and /metrics answer from the latest snapshot without touching a rank. A
snapshot older than `stale_after_s` (the refresher itself is stuck) makes /health answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


class StatusCache:
    def __init__(self, router_of: Any, interval_s: float = 1.0, rpc_timeout_s: float = 2.0) -> None:
        """`router_of()`: the current router (a restart may swap its clients; it is read at every refresh)."""
        if interval_s <= 0:
            raise ValueError(f"the status refresh interval must be > 0, got {interval_s}")
        self._router_of = router_of
        self.interval_s = interval_s
        self.rpc_timeout_s = min(rpc_timeout_s, max(0.1, interval_s * 2))
        self.stale_after_s = max(3 * interval_s, interval_s + 2 * self.rpc_timeout_s)
        self.rank_stats: list[dict[str, Any]] = []
        self.updated_at = 0.0  # time.monotonic() of the latest snapshot; 0 = none yet
        self.refreshes = 0
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        """Take one snapshot now."""
        try:
            stats = await self._router_of().stats(timeout_s=self.rpc_timeout_s)
        except Exception as e:  # keep the previous snapshot; it goes stale if this persists
            log.warning("status refresh failed: %s: %s", type(e).__name__, e)
            return
        self.rank_stats = stats
        self.updated_at = time.monotonic()
        self.refreshes += 1

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="status-cache")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    def age_s(self) -> float | None:
        return None if not self.updated_at else time.monotonic() - self.updated_at

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, /health body): every rank answered the latest refresh, and that refresh is recent."""
        ranks = []
        for row in self.rank_stats:
            engine = row.get("engine")
            if engine is not None:
                ranks.append({"rank": row["rank"], "ok": True, "steps": engine.get("worker_steps")})
            else:
                why = row.get("error") or ("not connected" if not row.get("connected") else "no stats")
                ranks.append({"rank": row["rank"], "ok": False, "error": why})
        age = self.age_s()
        fresh = age is not None and age <= self.stale_after_s
        ok = fresh and bool(ranks) and all(r["ok"] for r in ranks)
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "ranks": ranks,
                                "age_s": None if age is None else round(age, 3)}
        if not fresh:
            body["error"] = ("no rank status yet" if age is None else
                             f"rank status is {age:.1f}s old (refreshed every {self.interval_s:g}s)")
        return ok, body
