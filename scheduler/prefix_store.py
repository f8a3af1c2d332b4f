"""A second prefix-cache level below the in-memory page index (the engine's disk tier implements it).

The scheduler asks it at admission, after the in-memory lookup, for more cached pages; it never sees
tensors or files. Plain Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class PrefixLoad:
    """A hit below memory for one request, found by `PrefixStore.lookup`.

    `num_cached_pages` pages after the memory hits count as computed (the scheduler registers them and
    starts the request after them). `num_loaded_pages` >= that: pages whose entries the load fills; the
    ones past the cached pages are recomputed by ordinary prefill, which must not overwrite them (the
    store knows). `payload` is the store's own data (the pages read and checked)."""

    num_cached_pages: int
    num_loaded_pages: int
    payload: Any


class PrefixStore(Protocol):
    def trim(self, hits: list[int]) -> list[int]:
        """The leading memory hits whose last page has restorable state (a hit must end at one)."""
        ...

    def lookup(self, req_id: str, tokens: list[int], num_hit_pages: int, max_pages: int) -> PrefixLoad | None:
        """Cached pages after the first `num_hit_pages` full pages of `tokens` (at most `max_pages` in all)."""
        ...

    def admit(self, req_id: str, load: PrefixLoad, page_ids: list[int]) -> None:
        """Fill `page_ids` (the pages allocated after the memory hits, in order) from `load`."""
        ...
