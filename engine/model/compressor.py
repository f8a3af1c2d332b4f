"""The compressors (gated pooling into compressed KV entries, v4-model.md §2.4) and the lightning indexer (§2.5).

Per-sequence (`Compressor.forward`, `Indexer.select`: the reference; `Indexer.select_topk`: the same top-k
streamed, for long contexts) and batched over sequences (`Compressor.forward_batch`, `Indexer.select_padded`);
the decode step's versions are in engine.model.attention_decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.cache.seq_state import CompressorState, DenseEntries, EntryStore, append_rows
from engine.model.config import ModelConfig
from engine.model.indexer_topk import index_topk
from engine.model.layers import Linear, RMSNorm
from engine.model.rope import apply_rope, rope_cos_sin


@dataclass(frozen=True)
class _Batch:
    """The sequences of one batched call: sequence i's new tokens are the packed rows starts[i] .. +lens[i]-1,
    at positions p0[i] ..."""

    starts: list[int]
    lens: list[int]
    p0: list[int]

    @property
    def uniform(self) -> bool:
        """All sequences have the same number of new tokens, packed back to back: [B, n] is a view."""
        n, s0 = self.lens[0], self.starts[0]
        return min(self.lens) == max(self.lens) and all(s == s0 + i * n for i, s in enumerate(self.starts))

    def rows(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per new token (sequence-major): its sequence, its index within the sequence, its packed row."""
        total = sum(self.lens)
        lens = torch.tensor(self.lens, device=device)
        seq = torch.repeat_interleave(torch.arange(len(self.lens), device=device), lens, output_size=total)
        first = torch.tensor([sum(self.lens[:i]) for i in range(len(self.lens))], device=device)
        local = torch.arange(total, device=device) - first[seq]
        return seq, local, torch.tensor(self.starts, device=device)[seq] + local

    def padded_rows(self, device: torch.device) -> torch.Tensor:
        """[B, max n]: the packed row of each sequence's token t (padding repeats its last token)."""
        t = torch.arange(max(self.lens), device=device)[None, :]
        last = torch.tensor(self.lens, device=device)[:, None] - 1
        return torch.tensor(self.starts, device=device)[:, None] + torch.minimum(t, last)


def _concat_rows(prefix: list[torch.Tensor], packed: torch.Tensor, batch: _Batch) -> tuple[torch.Tensor, list[int]]:
    """prefix: B tensors [a_i, w]; packed [T, w] -> [B, max(a_i + n_i), w]: row i = prefix[i], then sequence i's
    packed rows, then zeros. Also returns the a_i. A few ops whatever B is."""
    a = [r.shape[0] for r in prefix]
    a_max, same_a = max(a), min(a) == max(a)
    w, dtype = packed.shape[1], prefix[0].dtype
    if same_a and batch.uniform:
        n, s0 = batch.lens[0], batch.starts[0]
        out = packed.new_empty(len(a), a_max + n, w, dtype=dtype)
        out[:, a_max:] = packed[s0:s0 + len(a) * n].view(len(a), n, w)
    else:
        out = packed.new_zeros(len(a), max(x + n for x, n in zip(a, batch.lens, strict=True)), w, dtype=dtype)
        seq, local, src = batch.rows(packed.device)
        out[seq, torch.tensor(a, device=packed.device)[seq] + local] = packed[src].to(dtype)
    if a_max:
        dst = list(out[:, :a_max].unbind(0)) if same_a else [r[:x] for r, x in zip(out.unbind(0), a, strict=True)]
        torch._foreach_copy_(dst, prefix)
    return out, a


def _row_views(t: torch.Tensor, starts: list[int], ends: list[int]) -> list[torch.Tensor]:
    """Views t[i, starts[i]:ends[i]] (one unbind when all rows share the bounds)."""
    if min(starts) == max(starts) and min(ends) == max(ends):
        return list(t[:, starts[0]:ends[0]].unbind(0))
    return [r[a:b] for r, a, b in zip(t.unbind(0), starts, ends, strict=True)]


class Compressor(nn.Module):
    """Gated pooling of `ratio` tokens into one KV entry (§2.4); CSA (ratio 4) overlaps windows."""

    def __init__(self, cfg: ModelConfig, ratio: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.ratio, self.head_dim = ratio, head_dim
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * head_dim
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        # BF16 in the checkpoint, run in fp32 by the reference.
        self.wkv = Linear(cfg.hidden_size, width, torch.float32, stored="bf16")
        self.wgate = Linear(cfg.hidden_size, width, torch.float32, stored="bf16")
        self.norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        self.rope_dim = cfg.qk_rope_head_dim

    def new_state(self, device: torch.device | str, store=None) -> CompressorState:
        """A fresh state; entries go to `store` (default: a dense tensor)."""
        width = self.ape.shape[1]
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        return CompressorState(store or DenseEntries(self.head_dim, device), z(0, width), z(0, width))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] (all packed tokens at once) -> C, Z: [T, c*d] float32 (ape is added per window)."""
        xf = x.float()
        return self.wkv(xf), self.wgate(xf)

    def forward(self, kv: torch.Tensor, gate: torch.Tensor, p0: int, st: CompressorState, freqs: torch.Tensor,
                snapshot_at: list[int] = ()) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """kv, gate [n, c*d] = `project` of one sequence's tokens at positions p0..p0+n-1; appends the
        finished entries to `st.store`.

        Returns, for each boundary b in `snapshot_at` (multiples of m), the raw (kv, gate) of the
        window [b-m, b): what the CSA overlap needs to continue from b.
        """
        m, d = self.ratio, self.head_dim
        n_old = st.store.n
        assert p0 == n_old * m + st.pend_kv.shape[0], "compressor state out of step with positions"
        kv = torch.cat([st.pend_kv, kv])  # [n_pend+n, c*d]
        gate = torch.cat([st.pend_gate, gate])
        n_win = kv.shape[0] // m
        st.pend_kv, st.pend_gate = kv[n_win * m:], gate[n_win * m:]
        if n_win == 0:
            return {}
        kv = kv[: n_win * m].view(n_win, m, -1)
        gate = gate[: n_win * m].view(n_win, m, -1) + self.ape  # ape[pos % m]: windows start at multiples of m
        snaps = {b: (kv[b // m - n_old - 1].clone(), gate[b // m - n_old - 1].clone()) for b in snapshot_at}
        if self.overlap:
            # Entry i pools 2m slots: first half [:d] of window i-1, then second half [d:] of window i.
            prev_kv = torch.zeros(n_win, m, d, dtype=kv.dtype, device=kv.device)
            prev_gate = torch.full((n_win, m, d), float("-inf"), dtype=gate.dtype, device=gate.device)
            prev_kv[1:], prev_gate[1:] = kv[:-1, :, :d], gate[:-1, :, :d]
            if st.prev_kv is not None:
                prev_kv[0], prev_gate[0] = st.prev_kv[:, :d], st.prev_gate[:, :d]
            st.prev_kv, st.prev_gate = kv[-1], gate[-1]
            kv = torch.cat([prev_kv, kv[..., d:]], dim=1)  # [n_win, 2m, d]
            gate = torch.cat([prev_gate, gate[..., d:]], dim=1)
        entry = (kv * gate.softmax(dim=1)).sum(dim=1)  # per-channel softmax over the slots: [n_win, d]
        entry = self.norm(entry)
        # RoPE at the position of each window's first token.
        pos = (torch.arange(n_win, device=kv.device) + n_old) * m
        cos, sin = rope_cos_sin(freqs, pos)
        st.store.append(apply_rope(entry, cos, sin))
        return snaps

    def forward_batch(self, kv: torch.Tensor, gate: torch.Tensor, batch: _Batch, states: list[CompressorState],
                      freqs: torch.Tensor) -> None:
        """`forward` for several sequences at once (no snapshots): kv, gate [T, c*d] = `project` of the packed
        tokens, sequence i owning the rows of `batch`. The same math: every sequence's pending rows and new
        rows are laid out in one padded tensor, all complete windows of all sequences are pooled together,
        and the entries are written with one store op.
        """
        m, d = self.ratio, self.head_dim
        buf_kv, a = _concat_rows([st.pend_kv for st in states], kv, batch)  # [B, R, c*d]
        buf_gate, _ = _concat_rows([st.pend_gate for st in states], gate, batch)
        for p, st, x in zip(batch.p0, states, a, strict=True):
            assert p == st.store.n * m + x, "compressor state out of step with positions"
        tot = [x + n for x, n in zip(a, batch.lens, strict=True)]
        n_win = [t // m for t in tot]
        ends = [k * m for k in n_win]
        for st, k, g in zip(states, _row_views(buf_kv, ends, tot), _row_views(buf_gate, ends, tot), strict=True):
            st.pend_kv, st.pend_gate = k, g  # the rows of the unfinished window
        W = max(n_win)
        if W == 0:
            return
        has = [i for i, k in enumerate(n_win) if k]
        sts, n_win = [states[i] for i in has], [n_win[i] for i in has]
        if len(has) < len(states):
            idx = torch.tensor(has, dtype=torch.long, device=kv.device)
            buf_kv, buf_gate = buf_kv[idx], buf_gate[idx]
        k = len(sts)
        win_kv = buf_kv[:, :W * m].view(k, W, m, -1)
        win_gate = buf_gate[:, :W * m].view(k, W, m, -1) + self.ape  # ape[pos % m]: windows start at multiples of m
        if self.overlap:
            # Entry i pools 2m slots: first half [:d] of window i-1, then second half [d:] of window i.
            if any(st.prev_kv is None for st in sts):
                none_kv = kv.new_zeros(m, kv.shape[1])
                none_gate = torch.full_like(none_kv, float("-inf"))
                prev_kv = torch.stack([none_kv if st.prev_kv is None else st.prev_kv for st in sts])
                prev_gate = torch.stack([none_gate if st.prev_gate is None else st.prev_gate for st in sts])
            else:
                prev_kv = torch.stack([st.prev_kv for st in sts])
                prev_gate = torch.stack([st.prev_gate for st in sts])
            if min(n_win) == W:
                lasts = zip(win_kv[:, W - 1].unbind(0), win_gate[:, W - 1].unbind(0))
            else:
                lasts = ((win_kv[i, j - 1], win_gate[i, j - 1]) for i, j in enumerate(n_win))
            for st, (lk, lg) in zip(sts, lasts, strict=True):
                st.prev_kv, st.prev_gate = lk, lg
            win_kv = torch.cat([torch.cat([prev_kv[:, None, :, :d], win_kv[:, :-1, :, :d]], dim=1),
                                win_kv[..., d:]], dim=2)  # [k, W, 2m, d]
            win_gate = torch.cat([torch.cat([prev_gate[:, None, :, :d], win_gate[:, :-1, :, :d]], dim=1),
                                  win_gate[..., d:]], dim=2)
        entry = self.norm((win_kv * win_gate.softmax(dim=2)).sum(dim=2)).flatten(0, 1)  # [k*W, d]
        # RoPE at the position of each window's first token.
        n_old = torch.tensor([st.store.n for st in sts], device=kv.device)
        pos = (n_old[:, None] + torch.arange(W, device=kv.device)[None, :]) * m  # [k, W]
        cos, sin = rope_cos_sin(freqs, pos.flatten())
        entry = apply_rope(entry, cos, sin)
        if min(n_win) < W:
            entry = entry[(torch.arange(W, device=kv.device)[None, :] < torch.tensor(n_win, device=kv.device)[:, None])
                          .flatten()]
        append_rows([st.store for st in sts], entry, n_win)


class Indexer(nn.Module):
    """Lightning indexer (§2.5): picks the top-k compressed entries each CSA query attends to."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, dtype)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, torch.float32, stored="bf16")
        self.compressor = Compressor(cfg, 4, self.head_dim, dtype)

    def project(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All packed tokens at once: x [T, D], qr [T, q_lora] -> q [T, Hi, di] (RoPE'd, f32), w [T, Hi] f32."""
        q = self.wq_b(qr).view(qr.shape[0], self.n_heads, self.head_dim)
        w = self.weights_proj(x.float()) * self.n_heads**-0.5
        return apply_rope(q, cos, sin).float(), w

    def select(self, q: torch.Tensor, w: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q [n, Hi, di], w [n, Hi] (from `project`), keys [N, di] -> bool [n, N]: entry i chosen for query t.

        score[t, i] = sum_h w[t, h] * ReLU(q[t, h] . K[i]) over entries visible to t (i < (t+1)//4).
        """
        n, N = q.shape[0], keys.shape[0]
        visible = torch.arange(N, device=q.device)[None, :] < ((positions + 1) // 4)[:, None]  # [n, N]
        if N == 0:
            return visible
        scores = F.relu(torch.einsum("nhd,kd->nhk", q, keys.float())) * self.head_dim**-0.5
        score = (scores * w.unsqueeze(-1)).sum(dim=1)  # [n, N]
        score = score.masked_fill(~visible, float("-inf"))
        idx = score.topk(min(self.topk, N), dim=-1).indices  # [n, k]
        chosen = torch.zeros(n, N, dtype=torch.bool, device=q.device)
        chosen.scatter_(1, idx, True)
        return chosen & visible

    def select_topk(self, q: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                    keys: EntryStore) -> tuple[torch.Tensor, torch.Tensor]:
        """`select`, streamed (engine.model.indexer_topk): the keys are read from their store block by block and
        no [n, N] score exists. Returns (entry indices [n, topk], chosen [n, topk]: False where fewer than topk
        entries are visible); the same entries as `select` (ties aside)."""
        pool, table, codec = keys.paged_view()
        vals, idx = index_topk(q, w * self.head_dim**-0.5, (positions + 1) // 4, pool, table, self.topk, codec)
        return idx, vals > float("-inf")

    def select_padded(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                      visible: torch.Tensor) -> torch.Tensor:
        """`select` for several sequences at once: q [B, n, Hi, di], w [B, n, Hi], keys [B, N, di] (zero-padded),
        visible [B, n, N] (the entries each query may see) -> bool [B, n, N]: the top-k among the visible."""
        scores = F.relu(torch.einsum("bthd,bkd->bthk", q, keys.float())) * self.head_dim**-0.5
        score = (scores * w.unsqueeze(-1)).sum(dim=2).masked_fill(~visible, float("-inf"))  # [B, n, N]
        idx = score.topk(min(self.topk, score.shape[-1]), dim=-1).indices
        chosen = torch.zeros_like(visible)
        chosen.scatter_(-1, idx, True)
        return chosen & visible
