"""Per-sequence attention state: where compressed entries live, and the state at a page boundary.

Compressed entries go through an `EntryStore`: `DenseEntries` (a growing tensor, for the model used
on its own) or `PagedEntries` (slots in a page pool shared by all sequences; the scheduler hands out
the page ids). The window and the compressors' partial windows are per-sequence tensors (after a
batched step, views into that step's padded batch tensor; never written in place).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class EntryStore:
    """Append-only list of compressed entries `[d]` of one sequence in one layer."""

    n: int

    def append(self, entries: torch.Tensor) -> None:
        raise NotImplementedError

    def read(self, n: int) -> torch.Tensor:
        """The first n entries: [n, d]."""
        raise NotImplementedError

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """The entries at indices `idx` (long, any shape, each < n): [*idx.shape, d]. O(idx.numel())."""
        raise NotImplementedError

    def paged_view(self) -> tuple[torch.Tensor, torch.Tensor, object]:
        """(pool [pages, per_page, width], page table [>= ceil(n / per_page)] long, codec or None): entry i is
        pool[table[i // per_page], i % per_page], packed by the codec (`pool_entries` unpacks rows). What
        streamed readers (the indexer's top-k) walk."""
        raise NotImplementedError


class DenseEntries(EntryStore):
    def __init__(self, d: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        self.data = torch.zeros(0, d, dtype=dtype, device=device)
        self.n = 0

    def append(self, entries: torch.Tensor) -> None:
        self.data = torch.cat([self.data, entries.to(self.data.dtype)])
        self.n = self.data.shape[0]

    def read(self, n: int) -> torch.Tensor:
        return self.data[:n]

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data[idx]

    def paged_view(self) -> tuple[torch.Tensor, torch.Tensor, object]:
        return self.data[None], torch.zeros(1, dtype=torch.long, device=self.data.device), None


class PagedEntries(EntryStore):
    """Entries in `pool: [num_pages, per_page, d]`; entry i sits in page `page_ids[i // per_page]`.

    `page_ids` is the request's page table (shared list, only ever extended: by the runner as pages arrive).
    `n` starts at the number of entries already in the pages (a prefix-cache hit).
    `codec` (an engine.cache.fp8.FP8EntryCodec): the pool holds packed bytes [.., entry_bytes]; entries are
    encoded on write and decoded on read. None: the pool holds the entries in its dtype.
    """

    def __init__(self, pool: torch.Tensor, page_ids: list[int], n: int = 0, codec=None) -> None:
        self.pool, self.page_ids, self.n, self.codec = pool, page_ids, n, codec
        self.per_page = pool.shape[1]
        self._table = torch.zeros(0, dtype=torch.long, device=pool.device)  # page_ids as a tensor, so far

    def table(self) -> torch.Tensor:
        """`page_ids` as a long tensor; only the pages added since the last call are converted (O(new pages))."""
        have = self._table.shape[0]
        if len(self.page_ids) < have:  # not extended but replaced: start over
            self._table, have = self._table[:0], 0
        if len(self.page_ids) != have:
            new = torch.tensor(self.page_ids[have:], dtype=torch.long, device=self.pool.device)
            self._table = torch.cat([self._table, new]) if have else new
        return self._table

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        pp = self.per_page
        rows = self.table()[idx // pp] * pp + idx % pp
        return pool_entries(self.pool.view(-1, self.pool.shape[2])[rows], self.codec)

    def paged_view(self) -> tuple[torch.Tensor, torch.Tensor, object]:
        return self.pool, self.table(), self.codec

    def _slots(self, first: int, k: int) -> list[int]:
        """Flat row indices (into `pool.view(-1, d)`) of entries first .. first+k-1."""
        last = first + k - 1
        if last // self.per_page >= len(self.page_ids):
            raise RuntimeError(f"entry {last} needs page {last // self.per_page}; "
                               f"only {len(self.page_ids)} allocated")
        pp = self.per_page
        return [self.page_ids[i // pp] * pp + i % pp for i in range(first, first + k)]

    def append(self, entries: torch.Tensor) -> None:
        k = entries.shape[0]
        if k == 0:
            return
        rows = torch.tensor(self._slots(self.n, k), dtype=torch.long, device=self.pool.device)
        self.pool.view(-1, self.pool.shape[2])[rows] = pool_rows(entries, self.pool, self.codec)
        self.n += k

    def read(self, n: int) -> torch.Tensor:
        if n == 0:
            return pool_entries(self.pool.new_zeros(0, self.pool.shape[2]), self.codec)
        n_pages = (n - 1) // self.per_page + 1
        if n_pages > len(self.page_ids):
            raise RuntimeError(f"reading {n} entries needs {n_pages} pages; only {len(self.page_ids)} allocated")
        return pool_entries(self.pool[self.table()[:n_pages]].flatten(0, 1)[:n], self.codec)


def pool_rows(entries: torch.Tensor, pool: torch.Tensor, codec=None) -> torch.Tensor:
    """Entries [.., d] as the pool stores them: packed by `codec`, else in the pool's dtype."""
    return entries.to(pool.dtype) if codec is None else codec.encode(entries)


def pool_entries(rows: torch.Tensor, codec=None) -> torch.Tensor:
    """Rows read from a pool [.., pool width] -> the entries [.., d] (`codec` unpacks them)."""
    return rows if codec is None else codec.decode(rows)


def _shared_pool(stores: list[EntryStore]) -> torch.Tensor | None:
    """The one page pool all `stores` use, or None (dense stores, or several pools)."""
    first = stores[0]
    if not isinstance(first, PagedEntries) or not first.pool.is_contiguous():
        return None
    pool = first.pool
    return pool if all(isinstance(s, PagedEntries) and s.pool is pool for s in stores) else None


def append_rows(stores: list[EntryStore], entries: torch.Tensor, counts: list[int] | None = None) -> None:
    """Append to each store its entries: `entries` [sum counts, d] holds counts[i] (default 1) rows for stores[i],
    store by store. Stores sharing one page pool are written with one index op."""
    if not stores:
        return
    counts = [1] * len(stores) if counts is None else counts
    pool = _shared_pool(stores)
    if pool is None:
        for s, e in zip(stores, entries.split(counts), strict=True):
            s.append(e)
        return
    rows = [r for s, c in zip(stores, counts, strict=True) if c for r in s._slots(s.n, c)]
    pool.view(-1, pool.shape[2])[torch.tensor(rows, dtype=torch.long, device=pool.device)] = \
        pool_rows(entries, pool, stores[0].codec)
    for s, c in zip(stores, counts, strict=True):
        s.n += c


def read_padded(stores: list[EntryStore], counts: list[int]) -> torch.Tensor:
    """The first counts[i] entries of stores[i]: [B, max count, d]; rows past counts[i] are padding (zeros, or
    whatever the pages hold: the caller masks them).

    Stores sharing one page pool are read with a single gather over a padded page table."""
    n_max = max(counts)
    pool = _shared_pool(stores)
    if pool is None:
        return torch.nn.utils.rnn.pad_sequence([s.read(c) for s, c in zip(stores, counts, strict=True)],
                                               batch_first=True)
    pp, d = pool.shape[1], pool.shape[2]
    n_pages = (n_max - 1) // pp + 1 if n_max else 0
    table = []
    for s, c in zip(stores, counts, strict=True):
        need = (c - 1) // pp + 1 if c else 0
        if need > len(s.page_ids):
            raise RuntimeError(f"reading {c} entries needs {need} pages; only {len(s.page_ids)} allocated")
        ids = s.page_ids[:n_pages]
        table.append(ids + [ids[0] if ids else 0] * (n_pages - len(ids)))  # padding pages are masked out
    table_t = torch.tensor(table, dtype=torch.long, device=pool.device)
    return pool_entries(pool[table_t].view(len(stores), n_pages * pp, d)[:, :n_max], stores[0].codec)


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """t, or a copy of it when its storage holds more than t itself (t is a view into a larger tensor)."""
    if t is None or t.untyped_storage().nbytes() <= t.numel() * t.element_size():
        return t
    return t.clone()


@dataclass
class CompressorState:
    """What one compressor carries between calls for one sequence (partial windows in float32).

    Finished entries (normed, RoPE'd) go to `store`. Tokens of the current unfinished window wait
    in `pend_kv/pend_gate`; for CSA, `prev_kv/prev_gate` keep the last finished window (its first
    half feeds the next entry: the 4:1 overlap of §2.4).
    """

    store: EntryStore
    pend_kv: torch.Tensor  # [n_pend < m, c*d]
    pend_gate: torch.Tensor  # [n_pend, c*d] (ape not yet added)
    prev_kv: torch.Tensor | None = None  # [m, c*d]
    prev_gate: torch.Tensor | None = None  # [m, c*d] (ape added)

    def compact(self) -> None:
        """Copy out the tensors that are views into a larger (batch) tensor, so they stop pinning it."""
        self.pend_kv, self.pend_gate = _own(self.pend_kv), _own(self.pend_gate)
        self.prev_kv, self.prev_gate = _own(self.prev_kv), _own(self.prev_gate)


@dataclass
class LayerSnapshot:
    """A layer's state at a page boundary b (b a multiple of every ratio): what a prefix hit restores.

    The entries before b stay in the shared pages; the partial windows are empty at b.
    """

    window: torch.Tensor  # [<= w-1, head_dim]: KV of the tokens before b
    comp_prev: tuple[torch.Tensor, torch.Tensor] | None = None  # CSA: raw (kv, gate) of window [b-4, b)
    index_prev: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class LayerState:
    """One sequence's attention state in one layer: the window and the compressors' states."""

    window: torch.Tensor  # [<= w-1, head_dim] KV of the latest tokens (post-RoPE)
    comp: CompressorState | None = None
    index: CompressorState | None = None
    num_tokens: int = 0  # tokens this layer has seen
    # Set by the runner for one forward: boundaries b in (num_tokens, num_tokens + n] to snapshot;
    # the attention fills `snapshots[b]`.
    snapshot_at: list[int] = field(default_factory=list)
    snapshots: dict[int, LayerSnapshot] = field(default_factory=dict)

    def compact(self) -> None:
        """Copy out the window and compressor tensors that are views into a larger (batch) tensor: a sequence
        left out of later steps then holds only its own state, not a whole step's padded tensors."""
        self.window = _own(self.window)
        for cs in (self.comp, self.index):
            if cs is not None:
                cs.compact()
