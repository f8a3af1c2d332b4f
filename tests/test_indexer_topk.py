"""The streamed indexer top-k (engine.model.indexer_topk, the CPU kernel) against the materialized `Indexer.select`,
and the store reads it relies on (PagedEntries.table / gather / paged_view)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.cache.seq_state import DenseEntries, PagedEntries
from engine.kernels.cpu.index_topk import default_index_topk
from engine.model.compressor import Indexer
from engine.model.config import TINY
from engine.model.indexer_topk import topk_streamed

NEG = float("-inf")


def _paged(n_entries: int, d: int, per_page: int, gen: torch.Generator) -> tuple[PagedEntries, torch.Tensor]:
    """A store of n_entries random keys on shuffled pages (plus spare pages), and the keys in order."""
    n_pages = -(-n_entries // per_page)
    pool = torch.randn(n_pages + 3, per_page, d, generator=gen)
    page_ids = torch.randperm(n_pages + 3, generator=gen)[:n_pages].tolist()
    store = PagedEntries(pool, page_ids, n_entries)
    return store, pool[torch.tensor(page_ids, dtype=torch.long)].flatten(0, 1)[:n_entries]


def _reference_scores(q, w, keys, n_visible, head_dim):
    s = (torch.relu(torch.einsum("nhd,kd->nhk", q, keys)) * head_dim**-0.5 * w[:, :, None]).sum(1)
    return s.masked_fill(torch.arange(keys.shape[0])[None, :] >= n_visible[:, None], NEG)


def _as_mask(idx: torch.Tensor, ok: torch.Tensor, n_entries: int) -> torch.Tensor:
    m = torch.zeros(idx.shape[0], n_entries, dtype=torch.bool)
    m[torch.arange(idx.shape[0])[:, None].expand_as(idx)[ok], idx[ok]] = True
    return m


def _same_up_to_ties(got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor, k: int) -> None:
    """got == want, except entries whose score ties the k-th best (within float rounding; exact ties are common:
    an entry every head scores negative scores 0)."""
    assert torch.equal(got.sum(1), want.sum(1)), "a query chose a different number of entries"
    kth = scores.topk(min(k, scores.shape[1]), dim=1).values[:, -1:]
    diff = got ^ want
    near = (scores - kth).abs() <= 1e-5 * kth.abs().clamp(min=1.0)
    assert bool((~diff | near).all()), f"{int(diff.sum())} entries differ away from the k-th score"


@pytest.mark.parametrize("n,n_entries,per_page,k", [(37, 300, 16, 8), (9, 5, 4, 8), (20, 1000, 64, 3)])
def test_select_topk_equals_materialized_select(n: int, n_entries: int, per_page: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n + n_entries)
    cfg = dataclasses.replace(TINY, index_topk=k)
    ix = Indexer(cfg, torch.float32)
    h, d = cfg.index_n_heads, cfg.index_head_dim
    store, keys = _paged(n_entries, d, per_page, gen)
    q, w = torch.randn(n, h, d, generator=gen), torch.randn(n, h, generator=gen)
    positions = torch.sort(torch.randint(0, 4 * n_entries, (n,), generator=gen)).values
    positions[0] = 2  # a query that sees no entry
    want = ix.select(q, w, positions, keys)  # [n, N]
    scores = _reference_scores(q, w, keys, (positions + 1) // 4, d)
    idx, ok = ix.select_topk(q, w, positions, store)  # the kernel where it builds, else the torch path
    _same_up_to_ties(_as_mask(idx, ok, n_entries), want, scores, k)
    assert not ok[0].any()
    # the torch path, with blocks far smaller than the sizes (every block edge is crossed)
    pool, table, _ = store.paged_view()
    vals, idx2 = topk_streamed(q, w * d**-0.5, (positions + 1) // 4, pool, table, k, block_q=3, block_e=5)
    _same_up_to_ties(_as_mask(idx2, vals > NEG, n_entries), want, scores, k)


def test_kernel_equals_torch_path_odd_heads() -> None:
    kernel = default_index_topk()
    if kernel is None:
        pytest.skip("the CPU index_topk kernel does not build here")
    gen = torch.Generator().manual_seed(3)
    n, h, d, k = 70, 5, 24, 6  # heads padded to 16 by the wrapper; 70 queries span three kernel blocks
    store, keys = _paged(2000, d, 32, gen)
    q, w = torch.randn(n, h, d, generator=gen), torch.randn(n, h, generator=gen)
    nv = torch.randint(0, 2001, (n,), generator=gen)
    nv[:3] = torch.tensor([0, 1, k])
    pool, table, _ = store.paged_view()
    v1, i1 = kernel.run(q, w, pool, table, nv, k)
    v2, i2 = topk_streamed(q, w, nv, pool, table, k, block_q=16, block_e=300)
    torch.testing.assert_close(v1.sort(1).values, v2.sort(1).values, rtol=1e-5, atol=1e-5)
    scores = (torch.relu(torch.einsum("nhd,kd->nhk", q, keys)) * w[:, :, None]).sum(1)
    scores = scores.masked_fill(torch.arange(2000)[None, :] >= nv[:, None], NEG)
    _same_up_to_ties(_as_mask(i1, v1 > NEG, 2000), _as_mask(i2, v2 > NEG, 2000), scores, k)
    assert int((v1[0] > NEG).sum()) == 0 and int((v1[1] > NEG).sum()) == 1 and int((v1[2] > NEG).sum()) == k


def test_paged_reads_follow_a_growing_table() -> None:
    gen = torch.Generator().manual_seed(1)
    pool = torch.randn(10, 4, 3, generator=gen)
    page_ids = [7, 2]
    store = PagedEntries(pool, page_ids, 8)
    assert store.table().tolist() == [7, 2]
    page_ids.extend([5, 0])  # the runner extends the shared list in place
    store.n = 14
    assert store.table().tolist() == [7, 2, 5, 0]
    idx = torch.tensor([[0, 13], [4, 9]])
    assert torch.equal(store.gather(idx), store.read(14)[idx])
    dense = DenseEntries(3, "cpu")
    dense.append(store.read(14))
    assert torch.equal(dense.gather(idx), store.gather(idx))
    p, t, _ = dense.paged_view()
    assert torch.equal(p[t[0]], dense.read(14))


def test_select_topk_reads_a_packed_fp8_pool() -> None:
    """An FP8 cache: the streamed top-k unpacks the indexer keys block by block (the torch path) and picks what
    `select` picks from the unpacked keys."""
    from engine.cache.fp8 import FP8EntryCodec

    gen = torch.Generator().manual_seed(5)
    ix = Indexer(TINY, torch.float32)
    h, d, n_entries = TINY.index_n_heads, TINY.index_head_dim, 500
    codec = FP8EntryCodec(d, TINY.qk_rope_head_dim, torch.float32)
    pool = torch.zeros(10, 64, codec.entry_bytes, dtype=torch.uint8)
    store = PagedEntries(pool, torch.randperm(10, generator=gen)[:8].tolist(), 0, codec)
    store.append(torch.randn(n_entries, d, generator=gen))
    keys = store.read(n_entries)
    q, w = torch.randn(30, h, d, generator=gen), torch.randn(30, h, generator=gen)
    positions = torch.randint(0, 4 * n_entries, (30,), generator=gen)
    idx, ok = ix.select_topk(q, w, positions, store)
    _same_up_to_ties(_as_mask(idx, ok, n_entries), ix.select(q, w, positions, keys),
                     _reference_scores(q, w, keys, (positions + 1) // 4, d), TINY.index_topk)
    assert torch.equal(store.gather(idx), keys[idx])
