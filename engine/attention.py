"""V4 attention: sliding window + CSA (4:1, overlapping, lightning indexer) + HCA (128:1).

Follows v4-model.md §2 in the order of the math. The projections run on the packed tokens
of the whole batch; the per-sequence parts (compressors, indexer, core attention) loop over
sequences, each carrying its own `LayerState`. Prefill, chunked prefill and decode are all
the same call: a sequence contributes `n >= 1` new tokens at positions `p0 .. p0+n-1`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.layers import Linear, RMSNorm, linear, rms_normalize
from engine.rope import apply_rope, inv_freq, rope_cos_sin
from engine.seq_state import CompressorState, DenseEntries, LayerSnapshot, LayerState

QUERY_BLOCK = 256  # queries per attention block in prefill


@dataclass
class SeqSlice:
    """One sequence inside a packed batch: its tokens are rows [start, start+n)."""

    start: int
    n: int
    state: LayerState


class Compressor(nn.Module):
    """Gated pooling of `ratio` tokens into one KV entry (§2.4); CSA (ratio 4) overlaps windows."""

    def __init__(self, cfg: ModelConfig, ratio: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.ratio, self.head_dim = ratio, head_dim
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * head_dim
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        # BF16 in the checkpoint, run in fp32 by the reference.
        self.wkv = Linear(cfg.hidden_size, width, torch.float32)
        self.wgate = Linear(cfg.hidden_size, width, torch.float32)
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
        return linear(xf, self.wkv.weight), linear(xf, self.wgate.weight)

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


class Indexer(nn.Module):
    """Lightning indexer (§2.5): picks the top-k compressed entries each CSA query attends to."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, dtype)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, torch.float32)
        self.compressor = Compressor(cfg, 4, self.head_dim, dtype)

    def project(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All packed tokens at once: x [T, D], qr [T, q_lora] -> q [T, Hi, di] (RoPE'd, f32), w [T, Hi] f32."""
        q = linear(qr, self.wq_b.weight).view(qr.shape[0], self.n_heads, self.head_dim)
        w = linear(x.float(), self.weights_proj.weight) * self.n_heads**-0.5
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

    def select_batched(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Decode: one query per sequence. q [B, Hi, di], w [B, Hi], keys [B, N, di] (padded), valid [B, N]
        (the entries each query may see) -> bool [B, N]: the top-k among the valid entries."""
        scores = F.relu(torch.einsum("bhd,bnd->bhn", q, keys.float())) * self.head_dim**-0.5
        score = (scores * w.unsqueeze(-1)).sum(dim=1).masked_fill(~valid, float("-inf"))  # [B, N]
        idx = score.topk(min(self.topk, score.shape[1]), dim=-1).indices
        chosen = torch.zeros_like(valid)
        chosen.scatter_(1, idx, True)
        return chosen & valid


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_i, d] tensors -> zero-padded [B, max n_i, d] and the mask of real rows [B, max n_i]."""
    lens = torch.tensor([r.shape[0] for r in rows])
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    mask = torch.arange(padded.shape[1])[None, :] < lens[:, None]
    return padded, mask.to(padded.device)


class Attention(nn.Module):
    """MQA with one shared 512-d K=V head, per-head sink, inverse RoPE, grouped output projection."""

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.cfg = cfg
        self.n_heads, self.head_dim, self.window = h, hd, cfg.sliding_window
        self.ratio = cfg.compress_ratio(layer_id)
        self.scale = hd**-0.5
        self.wq_a = Linear(d, cfg.q_lora_rank, dtype)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, h * hd, dtype)
        self.wkv = Linear(d, hd, dtype)
        self.kv_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.wo_a = Linear(h * hd // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, dtype)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, d, dtype)
        self.attn_sink = nn.Parameter(torch.zeros(h, dtype=torch.float32))
        self.compressor = Compressor(cfg, self.ratio, hd, dtype) if self.ratio else None
        self.indexer = Indexer(cfg, dtype) if self.ratio == 4 else None
        # All RoPE in a compressed layer uses the YaRN'd compress schedule (§2.1).
        self.register_buffer("freqs", inv_freq(cfg, compressed=self.ratio > 0), persistent=False)

    def new_state(self, device: torch.device | str, comp_store=None, index_store=None) -> LayerState:
        """A fresh state; compressed entries go to the given stores (default: dense tensors)."""
        dtype = self.wkv.weight.dtype
        return LayerState(
            window=torch.zeros(0, self.head_dim, dtype=dtype, device=device),
            comp=self.compressor.new_state(device, comp_store) if self.compressor else None,
            index=self.indexer.compressor.new_state(device, index_store) if self.indexer else None,
        )

    def restore(self, snap: LayerSnapshot, b: int, comp_store=None, index_store=None) -> LayerState:
        """The state at boundary b from a snapshot; the stores already hold the entries before b."""
        st = self.new_state(snap.window.device, comp_store, index_store)
        st.window, st.num_tokens = snap.window.clone(), b
        for cs, prev in ((st.comp, snap.comp_prev), (st.index, snap.index_prev)):
            if cs is not None and prev is not None:
                cs.prev_kv, cs.prev_gate = prev[0].clone(), prev[1].clone()
        return st

    def forward(self, x: torch.Tensor, positions: torch.Tensor, seqs: list[SeqSlice]) -> torch.Tensor:
        """x [T, D] (after attn_norm), positions [T] -> [T, D]; advances every sequence's state."""
        T = x.shape[0]
        h, hd = self.n_heads, self.head_dim
        cos, sin = rope_cos_sin(self.freqs, positions)  # [T, r/2]
        qr = self.q_norm(self.wq_a(x))  # [T, q_lora]
        q = rms_normalize(self.wq_b(qr).view(T, h, hd), self.cfg.rms_norm_eps)  # per-head norm, no weight
        q = apply_rope(q, cos, sin)  # [T, H, hd]
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [T, hd]: K = V
        # Projections of the compressors and the indexer run once for all packed tokens.
        proj = {}
        if self.compressor is not None:
            proj["comp"] = self.compressor.project(x)
        if self.indexer is not None:
            proj["index"] = self.indexer.compressor.project(x)
            proj["iq"] = self.indexer.project(x, qr, cos, sin)
        if all(s.n == 1 and not s.state.snapshot_at for s in seqs):
            o = self._attend_decode(q, kv, positions, proj, [s.state for s in seqs])
        else:
            o = torch.empty(T, h, hd, dtype=x.dtype, device=x.device)
            for s in seqs:
                rows = slice(s.start, s.start + s.n)
                o[rows] = self._attend(q[rows], kv[rows], positions[rows],
                                       {k: (a[rows], b[rows]) for k, (a, b) in proj.items()}, s.state)
        o = apply_rope(o, cos, sin, inverse=True)  # undo the rotation V carried (§2.2)
        g = self.cfg.o_groups
        wo_a = self.wo_a.weight.view(g, self.cfg.o_lora_rank, -1)  # [G, R, H*hd/G]
        o = torch.einsum("tgk,grk->tgr", o.view(T, g, -1).to(wo_a.dtype), wo_a)  # [T, G, R]
        return self.wo_b(o.flatten(1).to(x.dtype))

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor,
                proj: dict[str, tuple[torch.Tensor, torch.Tensor]], st: LayerState) -> torch.Tensor:
        """One sequence: q [n, H, hd], kv [n, hd] at positions pos [n] -> o [n, H, hd].

        `proj`: this sequence's rows of the compressor/indexer projections.

        Queries go in blocks of QUERY_BLOCK; a block reads only its window band and the compressed
        entries visible to it, so prefill costs O(n * (w + entries)), not O(n^2).
        """
        n = q.shape[0]
        p0 = st.num_tokens
        assert int(pos[0]) == p0, f"positions start at {int(pos[0])}, cache holds {p0} tokens"
        win = torch.cat([st.window, kv])  # KV at positions win_start .. p0+n-1
        win_start = p0 - st.window.shape[0]
        snap_at = st.snapshot_at
        comp_prev, index_prev = {}, {}
        if self.ratio:  # compress the new tokens first: an entry is visible from its window's last token on
            comp_prev = self.compressor(*proj["comp"], p0, st.comp, self.freqs, snap_at)
            if self.indexer is not None:
                index_prev = self.indexer.compressor(*proj["index"], p0, st.index, self.freqs, snap_at)
        keep = self.window - 1
        for b in snap_at:  # state at page boundary b, for the prefix cache
            assert p0 < b <= p0 + n and b % max(self.ratio, 1) == 0, f"bad snapshot boundary {b}"
            w0 = max(win_start, b - keep) if keep > 0 else b
            st.snapshots[b] = LayerSnapshot(win[w0 - win_start: b - win_start].clone(),
                                            comp_prev.get(b) if self.ratio == 4 else None, index_prev.get(b))
        o = torch.empty_like(q)
        for q0 in range(0, n, QUERY_BLOCK):
            q1 = min(n, q0 + QUERY_BLOCK)
            qpos = pos[q0:q1]
            # ---- sliding window: query t sees keys at positions (t-w, t]
            lo = max(win_start, p0 + q0 - self.window + 1)
            keys = win[lo - win_start: p0 + q1 - win_start]
            diff = qpos[:, None] - torch.arange(lo, p0 + q1, device=q.device)[None, :]
            visible = (diff >= 0) & (diff < self.window)
            # ---- compressed entries: entry i is visible to t iff i < (t+1)//m (§2.4)
            if self.ratio:
                n_vis = (p0 + q1) // self.ratio
                entries = st.comp.store.read(n_vis)
                if self.indexer is not None:  # CSA: the indexer's top-k among the visible entries
                    iq, iw = proj["iq"]
                    chosen = self.indexer.select(iq[q0:q1], iw[q0:q1], qpos, st.index.store.read(n_vis))
                else:  # HCA: all of them
                    chosen = torch.arange(n_vis, device=q.device)[None, :] < ((qpos + 1) // self.ratio)[:, None]
                keys = torch.cat([keys, entries.to(keys.dtype)])
                visible = torch.cat([visible, chosen], dim=1)
            o[q0:q1] = self._core(q[None, q0:q1], keys[None], visible[None])[0]
        # ---- advance the window
        st.window = win[-keep:] if keep > 0 else win[:0]
        st.num_tokens = p0 + n
        st.snapshot_at = []
        return o

    def _attend_decode(self, q: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor,
                       proj: dict[str, tuple[torch.Tensor, torch.Tensor]], states: list[LayerState]) -> torch.Tensor:
        """A decode step (one token per sequence), batched: q [B, H, hd], kv [B, hd] -> o [B, H, hd].

        Same math as `_attend`: the per-sequence state still advances one sequence at a time, but the
        indexer and the core attention run once over keys padded to the longest sequence.
        """
        keep = self.window - 1
        wins, ents, ikeys = [], [], []
        for i, st in enumerate(states):
            assert int(pos[i]) == st.num_tokens, f"position {int(pos[i])}, cache holds {st.num_tokens} tokens"
            win = torch.cat([st.window, kv[i:i + 1]])  # the window includes the current token
            wins.append(win)
            st.window = win[-keep:] if keep > 0 else win[:0]
            if self.ratio:
                row = slice(i, i + 1)
                self.compressor(proj["comp"][0][row], proj["comp"][1][row], st.num_tokens, st.comp, self.freqs)
                ents.append(st.comp.store.read(st.comp.store.n))  # all finished entries are visible
                if self.indexer is not None:
                    self.indexer.compressor(proj["index"][0][row], proj["index"][1][row], st.num_tokens,
                                            st.index, self.freqs)
                    ikeys.append(st.index.store.read(st.index.store.n))
            st.num_tokens += 1
        keys, visible = _pad(wins)  # [B, Lw, hd], [B, Lw]
        if self.ratio:
            entries, valid = _pad(ents)  # [B, N, hd]
            if self.indexer is not None and entries.shape[1]:
                iq, iw = proj["iq"]
                valid = self.indexer.select_batched(iq, iw, _pad(ikeys)[0], valid)
            keys = torch.cat([keys, entries.to(keys.dtype)], dim=1)
            visible = torch.cat([visible, valid], dim=1)
        return self._core(q[:, None], keys, visible[:, None])[:, 0]

    def _core(self, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """q [B, n, H, hd], keys [B, L, hd] (K = V), visible [B, n, L] -> [B, n, H, hd].

        Softmax over the visible keys with the per-head sink in the denominator (§2.2).
        """
        b, n = q.shape[:2]
        scores = torch.einsum("bnhd,bld->bhnl", q.float(), keys.float()) * self.scale
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        sink = self.attn_sink.float().view(1, -1, 1, 1).expand(b, -1, n, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
        return torch.einsum("bhnl,bld->bnhd", probs, keys.float()).to(q.dtype)
