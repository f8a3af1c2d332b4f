"""The lightning indexer's top-k over a long context, streamed (v4-model.md §2.5).

`Indexer.select` scores every (query, entry) pair at once: a [n, Hi, N] tensor. Over a 1M-token context that is
quadratic memory. `topk_streamed` computes the same top-k with queries in blocks of `block_q` and entries in
blocks of `block_e`, read straight from the paged pool through the page table, keeping a running top-k per
query; nothing larger than [block_q, Hi, block_e] exists at once. `index_topk` runs the CPU kernel
(engine.kernels.cpu.index_topk) where it applies, else `topk_streamed`. Attention then gathers each query's k
entries (`Attention._attend`), so beyond the scoring nothing costs O(queries * N).
"""

from __future__ import annotations

import torch

from engine.cache.seq_state import pool_entries
from engine.kernels.cpu.index_topk import default_index_topk

BLOCK_Q = 64  # queries per block (torch path)
BLOCK_E = 1024  # entries per block (torch path)


def topk_streamed(q: torch.Tensor, w: torch.Tensor, n_visible: torch.Tensor, pool: torch.Tensor, table: torch.Tensor,
                  k: int, block_q: int = BLOCK_Q, block_e: int = BLOCK_E,
                  codec=None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, Hi, di], w [n, Hi] (the di^-0.5 scale folded in), n_visible [n] (entry i is visible to query t iff
    i < n_visible[t]), pool [pages, per_page, di] + table (entry i = pool[table[i // per_page], i % per_page])
    -> (values [n, k], indices [n, k]): the k best of sum_h w[t, h] * relu(q[t, h] . K[i]) among the visible;
    -inf (index 0) where fewer than k are visible. `codec`: the pool holds packed rows (an FP8 cache), unpacked
    block by block."""
    n, h, d = q.shape
    per_page = pool.shape[1]
    vals = torch.full((n, k), float("-inf"), dtype=torch.float32, device=q.device)
    idx = torch.zeros(n, k, dtype=torch.long, device=q.device)
    for t0 in range(0, n, block_q):
        t1 = min(n, t0 + block_q)
        qb = q[t0:t1].float().reshape(-1, d)  # [bq*Hi, di]
        wb = w[t0:t1].float().unsqueeze(1)  # [bq, 1, Hi]
        nv = n_visible[t0:t1]
        vmax = int(nv.max())
        bv, bi = vals[t0:t1], idx[t0:t1]
        for e0 in range(0, vmax, block_e):
            e1 = min(vmax, e0 + block_e)
            ids = torch.arange(e0, e1, device=q.device)
            rows = table[ids // per_page] * per_page + ids % per_page
            keys = pool_entries(pool.view(-1, pool.shape[2])[rows], codec).float()  # [be, di]
            heads = (qb @ keys.T).relu_().view(t1 - t0, h, e1 - e0)
            s = torch.bmm(wb, heads)[:, 0]  # [bq, be]
            s = s.masked_fill(ids[None, :] >= nv[:, None], float("-inf"))
            top = torch.cat([bv, s], dim=1).topk(k, dim=1)
            bi = torch.cat([bi, ids.expand(t1 - t0, -1)], dim=1).gather(1, top.indices)
            bv = top.values
        vals[t0:t1], idx[t0:t1] = bv, torch.where(bv > float("-inf"), bi, 0)
    return vals, idx


def index_topk(q: torch.Tensor, w: torch.Tensor, n_visible: torch.Tensor, pool: torch.Tensor, table: torch.Tensor,
               k: int, codec=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_streamed`, on the CPU kernel when it applies (CPU, an unpacked float32 pool, kernel built)."""
    if q.device.type == "cpu" and codec is None and pool.dtype == torch.float32 and q.shape[0]:
        kernel = default_index_topk()
        if kernel is not None:
            return kernel.run(q.float(), w.float(), pool.contiguous(), table, n_visible, k)
    return topk_streamed(q, w, n_visible, pool, table, k, codec=codec)
