"""Bounds on what one client can make the frontend do: every cap answers at once with an OpenAI-style error.

- Fan-out: prompts x `n` of one request become that many rank requests; more than
  `max_choices_per_request` is refused with 413 (`too_many_choices`) before anything is sent to a rank.
- Requests in flight: at most `max_requests_in_flight` POST /v1/* requests are served at once; one more gets
  429 (`rate_limit_exceeded`) with a `Retry-After` header. Nothing waits in a queue of unbounded length.
- File storage: uploads stop, with 413 (`storage_quota_exceeded`), at the byte the stored files (uploads and
  batch results) would pass `max_file_storage_bytes`. Concurrent uploads count each other's bytes as they
  arrive, so together they cannot pass the quota either.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from cluster.server.errors import APIError

LIMITED_METHODS = frozenset({"POST"})


def check_fanout(num_prompts: int, n: int, limit: int, param: str = "n") -> None:
    """APIError 413 when `num_prompts` x `n` rank requests exceed `limit`."""
    total = num_prompts * n
    if total > limit:
        raise APIError(413, f"this request asks for {total} completions ({num_prompts} prompt(s) x n={n}); the limit "
                            f"per request is {limit}: send fewer prompts or a smaller n", "invalid_request_error",
                       param, "too_many_choices")


class InflightLimit:
    """Counts POST /v1/* requests being served; past `limit`, the next one gets 429 with Retry-After."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        if limit < 1:
            raise ValueError(f"max_requests_in_flight must be >= 1, got {limit}")
        self.limit = limit
        self.retry_after_s = max(1, int(retry_after_s))
        self.in_flight = 0
        self.refused = 0

    def applies(self, request: web.Request) -> bool:
        return request.method in LIMITED_METHODS and request.path.startswith("/v1/")

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if not self.applies(request):
            return await handler(request)
        if self.in_flight >= self.limit:
            self.refused += 1
            raise APIError(429, f"the server is serving its limit of {self.limit} requests at once; retry after "
                                f"{self.retry_after_s}s", "rate_limit_error", None, "rate_limit_exceeded",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.in_flight += 1
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1


class StorageQuota:
    """The byte budget of stored files. `used_bytes()` (a store query, run in a thread by the caller) is read at
    the start of each upload; bytes of uploads in progress and of uploads committed since are added to it."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_file_storage_bytes must be >= 1, got {limit}")
        self.limit = limit
        self._receiving = 0  # bytes of uploads in progress
        self._committed = 0  # bytes of uploads committed through this quota, ever (a running counter)

    def upload(self, stored_bytes: int) -> Upload:
        """Start accounting one upload; `stored_bytes`: what the store holds now."""
        return Upload(self, stored_bytes)


class Upload:
    """One upload's share of a StorageQuota: `take(n)` per chunk (413 past the quota), then `commit()` once
    the file is recorded or `release()` when it is dropped."""

    def __init__(self, quota: StorageQuota, stored_bytes: int) -> None:
        self.quota = quota
        self.base = stored_bytes
        self.committed_at_start = quota._committed
        self.bytes = 0
        self._open = True

    def used(self) -> int:
        q = self.quota
        return self.base + (q._committed - self.committed_at_start) + q._receiving

    def take(self, n: int) -> None:
        q = self.quota
        if self.used() + n > q.limit:
            raise APIError(413, f"the server's file storage quota of {q.limit} bytes is full ({self.used()} "
                                f"bytes in use or arriving); delete files (DELETE /v1/files/{{id}}) and retry",
                           "invalid_request_error", "file", "storage_quota_exceeded")
        q._receiving += n
        self.bytes += n

    def commit(self) -> None:
        if self._open:
            self._open = False
            self.quota._receiving -= self.bytes
            self.quota._committed += self.bytes

    def release(self) -> None:
        if self._open:
            self._open = False
            self.quota._receiving -= self.bytes


def limits_from(settings: Any) -> tuple[InflightLimit, StorageQuota]:
    """The in-flight limit and the storage quota of one server's settings."""
    return (InflightLimit(settings.max_requests_in_flight, settings.retry_after_s),
            StorageQuota(settings.max_file_storage_bytes))
