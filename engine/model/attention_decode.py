"""The decode step of V4 attention: one new token per sequence, static shapes, sparse reads, no host syncs.

Same math as `Attention._attend` (the reference it is tested against) for a query at position p:
- the window: the ring slot of p is written with the new KV, then the whole ring of the sequence is read;
  keys at positions < 0 are masked (a ring holds exactly the positions p-W+1 .. p);
- the compressors: the new row goes to its place in the slot's pending window; the entry of that window is
  computed for every row and written to its page when the window is complete (else to the scratch page);
- CSA: the lightning indexer scores every visible entry of the sequence (read through its page table), and
  attention then gathers only the `index_topk` chosen entries: its cost beyond the indexer scores does not
  grow with the context. HCA: every visible entry (N/128).

Every shape depends on the batch size B and the page-table width P alone (both fixed per CUDA graph
bucket); nothing reads a value back to the host.
"""

from __future__ import annotations

import torch

from engine.cache.decode_slots import CompressorSlots, DecodeBatch, LayerSlots
from engine.cache.seq_state import pool_entries, pool_rows
from engine.model.rope import apply_rope, rope_cos_sin

SCORE_CHUNK_ENTRIES = 16384  # CPU: indexer entries scored per piece (keys 2 MiB, head scores 1 MiB at di 32, 16 heads)


def compress_decode(comp, kv: torch.Tensor, gate: torch.Tensor, batch: DecodeBatch, cs: CompressorSlots,
                    pool: torch.Tensor, freqs: torch.Tensor, codec=None) -> None:
    """`Compressor.forward` for one token per sequence: kv, gate [B, c*d] = `comp.project` of the new tokens.
    `codec`: the pool's entry codec (FP8 cache: the entry is packed before it is written), or None."""
    m, d = comp.ratio, comp.head_dim
    slot, pos = batch.slot, batch.pos
    at = pos % m
    cs.pend_kv.index_put_((slot, at), kv)
    cs.pend_gate.index_put_((slot, at), gate)
    win_kv = cs.pend_kv.index_select(0, slot)  # [B, m, c*d]
    win_gate = cs.pend_gate.index_select(0, slot) + comp.ape  # ape[pos % m]: windows start at multiples of m
    done = at == m - 1
    if comp.overlap:
        # Entry i pools 2m slots: first half [:d] of window i-1, then second half [d:] of window i.
        prev_kv, prev_gate = cs.prev_kv.index_select(0, slot), cs.prev_gate.index_select(0, slot)
        kv_all = torch.cat([prev_kv[..., :d], win_kv[..., d:]], dim=1)  # [B, 2m, d]
        gate_all = torch.cat([prev_gate[..., :d], win_gate[..., d:]], dim=1)
        keep = done[:, None, None]
        cs.prev_kv.index_put_((slot,), torch.where(keep, win_kv, prev_kv))
        cs.prev_gate.index_put_((slot,), torch.where(keep, win_gate, prev_gate))
    else:
        kv_all, gate_all = win_kv, win_gate
    entry = comp.norm((kv_all * gate_all.softmax(dim=1)).sum(dim=1))  # [B, d]
    first = (pos + 1 - m).clamp(min=0)  # RoPE at the position of the window's first token
    cos, sin = rope_cos_sin(freqs, first)
    entry = apply_rope(entry, cos, sin)
    idx = ((pos + 1) // m - 1).clamp(min=0)  # the entry's index in the sequence
    per_page = pool.shape[1]
    page = batch.pages.gather(1, (idx // per_page)[:, None])[:, 0]
    scratch_row = (pool.shape[0] - 1) * per_page
    row = torch.where(done, page * per_page + idx % per_page, scratch_row)
    pool.view(-1, pool.shape[2]).index_put_((row,), pool_rows(entry, pool, codec))


def _workspace(ls: LayerSlots, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """On the CPU, a buffer kept per layer for `name` (new when the shape changes): a fresh multi-MB tensor every
    step costs page faults there. Elsewhere None: the caching allocator (and a CUDA graph's pool) reuses memory."""
    if like.device.type != "cpu":
        return None
    buf = ls.workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype:
        buf = ls.workspace[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def read_pages(pool: torch.Tensor, pages: torch.Tensor, out: torch.Tensor | None = None, codec=None) -> torch.Tensor:
    """pool [num_pages+1, per_page, w], pages [B, P] -> the entries of each page table: [B, P*per_page, d]
    (`codec`: the pool holds packed entries of w bytes, unpacked to d values; else d = w). `out`: a buffer for
    the raw rows."""
    flat = pages.flatten()
    if out is not None:
        rows = torch.index_select(pool, 0, flat, out=out.view(-1, *pool.shape[1:]))
    else:
        rows = pool.index_select(0, flat)
    return pool_entries(rows.view(pages.shape[0], -1, pool.shape[2]), codec)


def index_scores(indexer, q: torch.Tensor, w: torch.Tensor, pool: torch.Tensor, pages: torch.Tensor,
                 ls: LayerSlots, codec=None) -> torch.Tensor:
    """The lightning indexer's score of every entry the page tables hold: q [B, Hi, di], w [B, Hi] (one query
    per sequence), pool [pages+1, per_page, di] (`codec`: packed keys), pages [B, P] -> [B, P*per_page],
    score[i] = sum_h w[h] * ReLU(q[h] . K[i]) * di^-0.5 (`Indexer.select`'s formula).

    On the CPU the entries go in pieces of SCORE_CHUNK_ENTRIES (their keys and per-head scores stay in cache,
    in kept buffers); elsewhere in one piece."""
    b, p = pages.shape
    per_page, di = pool.shape[1], pool.shape[2]
    wq = (w * indexer.head_dim**-0.5).unsqueeze(1)  # [B, 1, Hi]: the scale folded into w
    step = max(1, SCORE_CHUNK_ENTRIES // per_page) if q.device.type == "cpu" else p
    step = min(step, p)
    keys_buf = _workspace(ls, "index_keys", (b * step * per_page * di,), pool)
    heads_buf = _workspace(ls, "index_heads", (b * q.shape[1] * step * per_page,), q)
    pieces = []
    for c in range(0, p, step):
        n = min(step, p - c)
        keys_out = None if keys_buf is None else keys_buf[:b * n * per_page * di].view(b * n, per_page, di)
        keys = read_pages(pool, pages[:, c:c + n], keys_out, codec).float().transpose(1, 2)  # [B, di, n*per_page]
        if heads_buf is None:
            heads = torch.bmm(q, keys)
        else:
            heads = torch.bmm(q, keys, out=heads_buf[:b * q.shape[1] * n * per_page].view(b, q.shape[1], -1))
        pieces.append(torch.bmm(wq, heads.relu_())[:, 0])  # [B, n*per_page]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def select_topk(indexer, score: torch.Tensor, n_visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Indexer.select` for one query per sequence: score [B, N] (`index_scores`), n_visible [B] -> (entry
    indices [B, k], chosen [B, k]: False where fewer than k entries are visible)."""
    hidden = torch.arange(score.shape[1], device=score.device)[None, :] >= n_visible[:, None]
    score = score.masked_fill(hidden, float("-inf"))
    top = score.topk(min(indexer.topk, score.shape[1]), dim=-1)
    return top.indices, top.values > float("-inf")


def attend_decode(attn, q: torch.Tensor, kv: torch.Tensor, proj: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  batch: DecodeBatch, ls: LayerSlots) -> torch.Tensor:
    """One token per sequence: q [B, H, hd], kv [B, hd] (RoPE'd), `proj` the compressor/indexer projections of
    the B rows -> o [B, H, hd]. Advances the slots and pools in place."""
    pos, dev = batch.pos, kv.device
    ring_len = ls.window.shape[1]
    ls.window.index_put_((batch.slot, pos % ring_len), kv.to(ls.window.dtype))
    keys = ls.window.index_select(0, batch.slot)  # [B, W, hd]
    ring = torch.arange(ring_len, device=dev)
    key_pos = pos[:, None] - (pos[:, None] - ring[None, :]) % ring_len  # the position each ring slot holds
    blocks = [(keys, (key_pos >= 0)[:, None, :])]
    if attn.ratio:  # compress the new token first: an entry is visible from its window's last token on
        m = attn.ratio
        compress_decode(attn.compressor, *proj["comp"], batch, ls.comp, ls.comp_pool, attn.freqs, ls.comp_codec)
        n_visible = (pos + 1) // m
        if attn.indexer is not None:  # CSA: gather the indexer's top-k entries only
            compress_decode(attn.indexer.compressor, *proj["index"], batch, ls.index, ls.index_pool, attn.freqs,
                            ls.index_codec)
            iq, iw = proj["iq"]
            score = index_scores(attn.indexer, iq, iw, ls.index_pool, batch.pages, ls, ls.index_codec)
            idx, chosen = select_topk(attn.indexer, score, n_visible)
            per_page = ls.comp_pool.shape[1]
            rows = batch.pages.gather(1, idx // per_page) * per_page + idx % per_page  # [B, k]
            pool = ls.comp_pool.view(-1, ls.comp_pool.shape[2])
            entries = pool_entries(pool.index_select(0, rows.flatten()).view(rows.shape[0], rows.shape[1], -1),
                                   ls.comp_codec)
            blocks.append((entries, chosen[:, None, :]))
        else:  # HCA: all visible entries
            entries = read_pages(ls.comp_pool, batch.pages, codec=ls.comp_codec)
            visible = torch.arange(entries.shape[1], device=dev)[None, :] < n_visible[:, None]
            blocks.append((entries, visible[:, None, :]))
    return attn._core(q[:, None], blocks)[:, 0]
