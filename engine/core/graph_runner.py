"""The static decode step: decode batches padded to buckets, static input buffers, CUDA graphs.

A decode step of n sequences runs at the smallest batch bucket B >= n (1, 2, 4, ..., up to max_num_seqs)
and page-table bucket P >= the pages any of them reads (1, 2, 4, ..., up to the pages of max_model_len).
Each (B, P) owns one flat int64 device buffer holding the step's metadata (token ids, positions, decode
slots, page tables); the host fills a pinned twin and copies it in one non-blocking copy, so inside the
step nothing is read back and every address stays fixed. On CUDA each bucket is captured once as a CUDA
graph (after a warm-up, with one memory pool shared by all buckets) and replayed; elsewhere, or with
graphs off, the same function runs eagerly on the same buffers. Padding rows use the scratch slot and
scratch page (engine.cache.decode_slots), so they never touch a real sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.cache.decode_slots import DecodeBatch, DecodeSlots


def buckets(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself."""
    if limit <= 0:
        raise ValueError(f"bucket limit must be positive, got {limit}")
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


def _fit(n: int, sizes: list[int]) -> int:
    for b in sizes:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


@dataclass
class _Bucket:
    """One (batch, pages) bucket: the metadata buffers (host pinned + device), the batch viewing them, and on
    CUDA its graph with its output."""

    host: torch.Tensor  # [B*3 + B*P] int64 (pinned on CUDA)
    device: torch.Tensor  # the same on the device
    batch: DecodeBatch
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class DecodeGraphRunner:
    """Runs decode steps for sequences living in `slots` (see the module docstring)."""

    def __init__(self, model, slots: DecodeSlots, max_pages: int, cuda_graphs: bool = True) -> None:
        self.model, self.slots = model, slots
        self.device = model.embed.weight.device
        self.batch_sizes = buckets(slots.max_seqs)
        self.page_sizes = buckets(max_pages)
        # EP: the dispatch backends exchange counts through the host, which a graph cannot capture; graphs there
        # wait for a fixed-capacity backend (the step itself still runs on the static buffers).
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and model.dispatcher is None
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._buckets: dict[tuple[int, int], _Bucket] = {}

    def _step(self, batch: DecodeBatch) -> torch.Tensor:
        """The captured work: the model's decode forward and the logits of every row."""
        return self.model.compute_logits(self.model(batch.input_ids, [], [], decode=batch))

    def _make(self, b: int, p: int) -> _Bucket:
        n = b * (3 + p)
        host = torch.empty(n, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        self._fill_padding(host, b, p, 0)
        dev = torch.empty(n, dtype=torch.int64, device=self.device).copy_(host)
        batch = DecodeBatch(dev[:b], dev[b:2 * b], dev[2 * b:3 * b], dev[3 * b:].view(b, p), self.slots)
        bucket = _Bucket(host, dev, batch)
        if self.use_graphs:
            # Warm up on a side stream (lazy inits, allocator), then capture; all inputs are padding, so the
            # warm-up writes only the scratch slot and page.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(batch)
            torch.cuda.current_stream().wait_stream(side)
            bucket.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(bucket.graph, pool=self._pool):
                bucket.logits = self._step(batch)
        return bucket

    def _fill_padding(self, host: torch.Tensor, b: int, p: int, first: int) -> None:
        """Rows first.. of a bucket's host buffer become padding rows."""
        host[first:b] = 0
        host[b + first:2 * b] = 0
        host[2 * b + first:3 * b] = self.slots.scratch
        host[3 * b + first * p:] = self.slots.scratch_page

    def bucket_for(self, n: int, pages: int) -> tuple[int, int]:
        return _fit(n, self.batch_sizes), _fit(pages, self.page_sizes)

    def prepare(self, token_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int],
                page_tables: Sequence[Sequence[int]]) -> _Bucket:
        """Fill a bucket's buffers with one step's metadata (one host->device copy) and return the bucket.

        page_tables[i]: the pages sequence i reads (those holding its entries up to its position)."""
        n = len(token_ids)
        b, p = self.bucket_for(n, max(len(t) for t in page_tables))
        key = (b, p)
        if key not in self._buckets:
            self._buckets[key] = self._make(b, p)
        bucket = self._buckets[key]
        host = bucket.host
        host[:n] = torch.as_tensor(token_ids, dtype=torch.int64)
        host[b:b + n] = torch.as_tensor(positions, dtype=torch.int64)
        host[2 * b:2 * b + n] = torch.as_tensor(slots, dtype=torch.int64)
        table = torch.full((n, p), self.slots.scratch_page, dtype=torch.int64)
        for i, t in enumerate(page_tables):
            table[i, :len(t)] = torch.as_tensor(t, dtype=torch.int64)
        host[3 * b:3 * b + n * p] = table.flatten()
        self._fill_padding(host, b, p, n)
        # The host buffer is rewritten next step only after this step's sampled tokens were read back (a stream
        # sync), so the asynchronous copy has finished by then.
        bucket.device.copy_(host, non_blocking=True)
        return bucket

    def run(self, token_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int],
            page_tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """One decode step; the logits of the n real rows [n, V] float32."""
        bucket = self.prepare(token_ids, positions, slots, page_tables)
        n = len(token_ids)
        if bucket.graph is not None:
            bucket.graph.replay()
            return bucket.logits[:n]
        return self._step(bucket.batch)[:n]

    def eager_batch(self, token_ids: Sequence[int], positions: Sequence[int], slots: Sequence[int],
                    page_tables: Sequence[Sequence[int]]) -> DecodeBatch:
        """The decode rows of a mixed step (eager, unpadded): fresh device tensors, one copy."""
        n, p = len(token_ids), max(len(t) for t in page_tables)
        table = [list(t) + [self.slots.scratch_page] * (p - len(t)) for t in page_tables]
        flat = torch.tensor([*token_ids, *positions, *slots, *(x for t in table for x in t)], dtype=torch.int64)
        dev = flat.to(self.device, non_blocking=True)
        return DecodeBatch(dev[:n], dev[n:2 * n], dev[2 * n:3 * n], dev[3 * n:].view(n, p), self.slots)

    def captured(self) -> list[tuple[int, int]]:
        """The (batch, pages) buckets made so far (captured as graphs on CUDA)."""
        return sorted(self._buckets)
