"""Page allocator: reference-counted integer page ids, with an LRU prefix cache of full pages.

Every page id is in exactly one of three places:

    free        refcount 0, no prefix key        handed out first
    evictable   refcount 0, holds a prefix key   kept for reuse; evicted least recently used first
    in use      refcount >= 1                    never handed out

Prefix cache: a full page is indexed by (parent key, its exact token tuple), where the parent key is
the key of the page before it in the sequence (None for the first page), so a key names the whole
prefix up to and including the page. The index is a dict over that pair: it hashes the pair and
compares the stored tuple, so a hash collision can never produce a wrong hit. Keys are opaque ints,
never reused during the allocator's life, so a key dropped at eviction can never match again.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence

# (parent page's key or None, the page's tokens)
PageContent = tuple[int | None, tuple[int, ...]]


class PageAllocator:
    def __init__(self, num_pages: int, page_tokens: int, enable_prefix_caching: bool = True) -> None:
        if num_pages < 1 or page_tokens < 1:
            raise ValueError(f"num_pages and page_tokens must be >= 1, got {num_pages}, {page_tokens}")
        self.num_pages = num_pages
        self.page_tokens = page_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self._refcount = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: page 0 is handed out first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._index: dict[PageContent, int] = {}  # content -> page id
        self._registered: dict[int, tuple[int, PageContent]] = {}  # page id -> (key, content)
        self._keys = itertools.count()
        # stats
        self.prefix_queries = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- capacity ----
    @property
    def num_free(self) -> int:
        """Pages allocate() can hand out now: free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def refcount(self, page_id: int) -> int:
        return self._refcount[page_id]

    # ---- allocation ----
    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages (refcount 1), or None (and no change) when fewer than n can be had."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                _, content = self._registered.pop(page)
                del self._index[content]
            self._refcount[page] = 1
            out.append(page)
        return out

    def free(self, page_ids: Iterable[int]) -> None:
        """Drop one reference to each page. Pages freed later stay cached longer, so pass a
        sequence's pages tail first: its prefix outlives its suffix."""
        for page in page_ids:
            rc = self._refcount[page] - 1
            if rc < 0:
                raise RuntimeError(f"page {page} freed more often than referenced")
            self._refcount[page] = rc
            if rc == 0:
                if page in self._registered:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def acquire(self, page_ids: Iterable[int]) -> None:
        """Add one reference to each (cached) page; an evictable page leaves the evictable set."""
        for page in page_ids:
            if self._refcount[page] == 0:
                if page not in self._evictable:
                    raise RuntimeError(f"page {page} is free, not cached: it cannot be acquired")
                del self._evictable[page]
            self._refcount[page] += 1

    # ---- prefix cache ----
    def key_of(self, page_id: int) -> int | None:
        entry = self._registered.get(page_id)
        return None if entry is None else entry[0]

    def register(self, page_id: int, parent_key: int | None, tokens: Sequence[int]) -> int:
        """Index a computed full page under (parent_key, tokens); returns the key that names this prefix.

        If another page already holds the same prefix, that page's key is returned and this page stays
        unindexed (it returns to the free list when released)."""
        if len(tokens) != self.page_tokens:
            raise ValueError(f"a page holds {self.page_tokens} tokens, got {len(tokens)}")
        if self._refcount[page_id] < 1:
            raise RuntimeError(f"page {page_id} is not in use: only a page being written can be registered")
        content = (parent_key, tuple(tokens))
        have = self._index.get(content)
        if have is not None:
            return self._registered[have][0]
        if page_id in self._registered:
            raise RuntimeError(f"page {page_id} is already registered under another prefix")
        key = next(self._keys)
        self._index[content] = page_id
        self._registered[page_id] = (key, content)
        return key

    def find_prefix(self, token_ids: Sequence[int], max_pages: int) -> list[int]:
        """Cached pages for the leading full pages of token_ids (at most max_pages); no side effects."""
        if not self.enable_prefix_caching:
            return []
        p = self.page_tokens
        pages: list[int] = []
        parent: int | None = None
        for i in range(min(max_pages, len(token_ids) // p)):
            page = self._index.get((parent, tuple(token_ids[i * p : (i + 1) * p])))
            if page is None:
                break
            pages.append(page)
            parent = self._registered[page][0]
        return pages

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += 1
        self.prefix_query_tokens += num_tokens
        self.prefix_hit_tokens += num_hit_tokens

    def match_prefix(self, token_ids: Sequence[int], max_pages: int) -> list[int]:
        """find_prefix, then take a reference on each page found and count the query in the stats."""
        if not self.enable_prefix_caching:
            return []
        pages = self.find_prefix(token_ids, max_pages)
        self.acquire(pages)
        self.record_query(len(token_ids), len(pages) * self.page_tokens)
        return pages

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def stats(self) -> dict[str, float]:
        return {
            "pages_used": self.num_used,
            "pages_free": self.num_free,
            "pages_cached": len(self._registered),
            "prefix_queries": self.prefix_queries,
            "prefix_query_tokens": self.prefix_query_tokens,
            "prefix_hit_tokens": self.prefix_hit_tokens,
            "prefix_hit_rate": self.prefix_hit_rate,
        }

    def check_integrity(self) -> None:
        """Raise AssertionError if the free / evictable / in-use partition or the index is broken."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & evictable, "a page is both free and evictable"
        for page, rc in enumerate(self._refcount):
            assert rc >= 0, f"page {page} has refcount {rc}"
            if rc == 0:
                assert (page in free) != (page in evictable), f"unreferenced page {page} is lost"
                assert (page in evictable) == (page in self._registered), f"page {page}: cache state"
            else:
                assert page not in free and page not in evictable, f"page {page} in use yet free"
        assert len(self._index) == len(self._registered), "index and registry disagree"
        for page, (_, content) in self._registered.items():
            assert self._index.get(content) == page, f"page {page} not indexed under its content"
