"""V4 attention: sliding window + CSA (4:1, overlapping, lightning indexer) + HCA (128:1).

Follows v4-model.md §2 in the order of the math. The projections run on the packed tokens
of the whole batch. Prefill, chunked prefill and decode are all the same call: a sequence
contributes `n >= 1` new tokens at positions `p0 .. p0+n-1`, carrying its own `LayerState`.
All sequences run through one batched path (`_attend_batch`: one padded pass for windows, compressors,
entry reads, indexer and core). A chunk longer than QUERY_BLOCK, or with pending prefix-cache snapshots,
is cut into pieces of at most QUERY_BLOCK tokens ending at each snapshot boundary (`_rounds`): round r
runs the r-th piece of every sequence, so later pieces see earlier ones in the cache (chunked prefill),
and a snapshot is the state right after the piece ending at its boundary. `_attend` runs one sequence
whole: the plain reference the batched path is tested against (`batched = False`). Sequences decoding
from decode slots (the engine's decode step) run `engine.model.attention_decode.attend_decode`: static
shapes, sparse top-k reads. The compressors and the indexer are in engine.model.compressor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.cache.decode_slots import DecodeBatch, LayerSlots
from engine.cache.seq_state import CompressorState, EntryStore, LayerSnapshot, LayerState, read_padded
from engine.kernels.cpu import attn_kernel
from engine.kernels.select import select_attn_core_path
from engine.model.attention_decode import attend_decode
from engine.model.compressor import Compressor, Indexer, _Batch, _concat_rows, _row_views
from engine.model.config import ModelConfig
from engine.model.layers import Linear, RMSNorm, rms_normalize
from engine.model.rope import apply_rope, inv_freq, rope_cos_sin

QUERY_BLOCK = 256  # queries per attention block in prefill
BATCH_QUERIES = 4096  # padded queries per batched group of prefill chunks
PAD_SLACK = 1 << 16  # context tokens a group of prefill pieces may pad beyond twice their own (`_groups`)
CORE_SCORES = 1 << 18  # attention scores per piece of the core (1 MiB in float32)
# _attend_batch: CSA layers whose longest sequence holds more entries than this select streamed per sequence
# (Indexer.select_topk) and gather each query's top-k, instead of scoring and masking every entry padded.
STREAM_ENTRIES = 2048
VIEW_AGE = 4  # forward calls a sequence may sit out before its views into a call's tensors are copied out


@dataclass
class SeqSlice:
    """One sequence inside a packed batch: its tokens are rows [start, start+n)."""

    start: int
    n: int
    state: LayerState


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
        # The cache's entry codec when it stores FP8 (engine.cache.kv_cache.PagedKVCache.bind): the window KV is
        # quantized as the cached entries are (§2.8 fp8_qdq). None: kept in the compute dtype.
        self.kv_codec = None
        self.batched = True  # all sequences through `_attend_batch`; False: one by one through `_attend` (tests)
        # States of recent calls, holding views into that call's tensors (a batched call's padded tensors, or
        # `_attend`'s window + chunk): id -> (state, call number). One left out for more than VIEW_AGE calls is
        # compacted, so unscheduled sequences (chunked prefill, token budget, tbo halves) pin at most a few
        # calls' tensors, never one per sequence.
        self._viewers: dict[int, tuple[LayerState, int]] = {}
        self._calls = 0

    def new_state(self, device: torch.device | str, comp_store=None, index_store=None) -> LayerState:
        """A fresh state; compressed entries go to the given stores (default: dense tensors)."""
        dtype = self.wkv.compute_dtype
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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, seqs: list[SeqSlice],
                decode: tuple[DecodeBatch, LayerSlots] | None = None) -> torch.Tensor:
        """x [T, D] (after attn_norm), positions [T] -> [T, D]; advances every sequence's state.

        `decode` (batch, this layer's slots): the first `batch.size` rows are decode tokens of sequences whose
        state lives in decode slots (`attend_decode`: static shapes, no host syncs); `seqs` start after them.
        """
        T = x.shape[0]
        h, hd = self.n_heads, self.head_dim
        cos, sin = rope_cos_sin(self.freqs, positions)  # [T, r/2]
        qr = self.q_norm(self.wq_a(x))  # [T, q_lora]
        q = rms_normalize(self.wq_b(qr).view(T, h, hd), self.cfg.rms_norm_eps)  # per-head norm, no weight
        q = apply_rope(q, cos, sin)  # [T, H, hd]
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [T, hd]: K = V
        if self.kv_codec is not None:
            kv = self.kv_codec.qdq(kv)
        # Projections of the compressors and the indexer run once for all packed tokens.
        proj = {}
        if self.compressor is not None:
            proj["comp"] = self.compressor.project(x)
        if self.indexer is not None:
            proj["index"] = self.indexer.compressor.project(x)
            proj["iq"] = self.indexer.project(x, qr, cos, sin)
        o = torch.empty(T, h, hd, dtype=x.dtype, device=x.device)
        if decode is not None:
            nd = decode[0].size
            rows = {k: (a[:nd], b[:nd]) for k, (a, b) in proj.items()}
            out = attend_decode(self, q[:nd], kv[:nd], rows, *decode)
            if nd == T:
                o = out
            else:
                o[:nd] = out
        self._age_views([s.state for s in seqs])
        if not self.batched:
            for s in seqs:
                rows = slice(s.start, s.start + s.n)
                o[rows] = self._attend(q[rows], kv[rows], positions[rows],
                                       {k: (a[rows], b[rows]) for k, (a, b) in proj.items()}, s.state)
        else:
            for pieces in self._rounds(seqs, positions):
                for group in self._groups(pieces):
                    rows, out = self._attend_batch(q, kv, positions, proj, group)
                    if rows is None:
                        o = out
                    else:
                        o[rows] = out
                    self._take_snapshots([s.state for s in group])
            for s in seqs:
                s.state.snapshot_at = []
        o = apply_rope(o, cos, sin, inverse=True)  # undo the rotation V carried (§2.2)
        g = self.cfg.o_groups
        o = self.wo_a.forward_grouped(o.view(T, g, -1), g)  # [T, G, R]: group g's rows of wo_a
        return self.wo_b(o.flatten(1).to(x.dtype))

    def _age_views(self, states: list[LayerState]) -> None:
        """Record the states this call runs; compact those left out for more than VIEW_AGE calls."""
        self._calls += 1
        for st in states:
            self._viewers[id(st)] = (st, self._calls)
        stale = [k for k, (_, c) in self._viewers.items() if self._calls - c > VIEW_AGE]
        for k in stale:
            self._viewers.pop(k)[0].compact()

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor,
                proj: dict[str, tuple[torch.Tensor, torch.Tensor]], st: LayerState) -> torch.Tensor:
        """One sequence: q [n, H, hd], kv [n, hd] at positions pos [n] -> o [n, H, hd].

        `proj`: this sequence's rows of the compressor/indexer projections.

        Queries go in blocks of QUERY_BLOCK; a block reads only its window band and the compressed entries it
        attends to (HCA: those visible to it; CSA: each query's top-k, from the streamed indexer), so beyond the
        indexer's scoring prefill costs O(n * (w + k + entries / 128)).
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
        if self.indexer is not None:  # CSA: the indexer's top-k of every new token, streamed over the entries
            iq, iw = proj["iq"]
            top_idx, top_ok = self.indexer.select_topk(iq, iw, pos, st.index.store)
        elif self.ratio:  # HCA: every entry visible to the chunk, read once
            hca = st.comp.store.read((p0 + n) // self.ratio)
        for q0 in range(0, n, QUERY_BLOCK):
            q1 = min(n, q0 + QUERY_BLOCK)
            qpos = pos[q0:q1]
            # ---- sliding window: query t sees keys at positions (t-w, t]
            lo = max(win_start, p0 + q0 - self.window + 1)
            keys = win[lo - win_start: p0 + q1 - win_start]
            diff = qpos[:, None] - torch.arange(lo, p0 + q1, device=q.device)[None, :]
            visible = (diff >= 0) & (diff < self.window)
            blocks = [(keys[None], visible[None])]
            # ---- compressed entries: entry i is visible to t iff i < (t+1)//m (§2.4)
            if self.indexer is not None:  # CSA: each query's top-k entries, gathered
                if st.comp.store.n:
                    blocks.append((st.comp.store.gather(top_idx[q0:q1])[None], top_ok[None, q0:q1]))
            elif self.ratio:  # HCA: all of them
                n_vis = (p0 + q1) // self.ratio
                chosen = torch.arange(n_vis, device=q.device)[None, :] < ((qpos + 1) // self.ratio)[:, None]
                if n_vis:
                    blocks.append((hca[None, :n_vis], chosen[None]))
            o[q0:q1] = self._core(q[None, q0:q1], blocks)[0]
        # ---- advance the window
        st.window = win[-keep:] if keep > 0 else win[:0]
        st.num_tokens = p0 + n
        st.snapshot_at = []
        return o

    def _rounds(self, seqs: list[SeqSlice], pos: torch.Tensor) -> list[list[SeqSlice]]:
        """The pieces `_attend_batch` runs, round by round: each sequence's new tokens cut at its pending snapshot
        boundaries, then into pieces of at most QUERY_BLOCK tokens; round r holds the r-th piece of every sequence
        that has one. Slices of one state (in `seqs` order) continue each other."""
        if not seqs:  # the decode step: nothing to read from the host
            return []
        pieces: dict[int, list[SeqSlice]] = {}
        p_end: dict[int, int] = {}
        starts, want = [], []  # each piece's first packed row, and the position it must hold
        for s in seqs:
            st = s.state
            p0 = p_end.get(id(st), st.num_tokens)
            p_end[id(st)] = p1 = p0 + s.n
            cuts = sorted({p0, p1, *(b for b in st.snapshot_at if p0 < b < p1)})
            for a, b in zip(cuts, cuts[1:]):
                for c in range(a, b, QUERY_BLOCK):
                    pieces.setdefault(id(st), []).append(SeqSlice(s.start + c - p0, min(QUERY_BLOCK, b - c), st))
                    starts.append(s.start + c - p0)
                    want.append(c)
        m = max(self.ratio, 1)
        for s in seqs:
            for b in s.state.snapshot_at:
                assert s.state.num_tokens < b <= p_end[id(s.state)] and b % m == 0, f"bad snapshot boundary {b}"
        if pos.device.type == "cpu":  # free on CPU; elsewhere it would sync every layer
            got = pos.tolist()
            got = [got[r] for r in starts]
            assert got == want, f"pieces start at positions {got}, the caches at {want}"
        n_rounds = max(map(len, pieces.values()), default=0)
        return [[ps[r] for ps in pieces.values() if r < len(ps)] for r in range(n_rounds)]

    @staticmethod
    def _groups(pieces: list[SeqSlice]) -> list[list[SeqSlice]]:
        """One round's pieces in the groups `_attend_batch` runs: single tokens (decode) in one group; the others,
        by context length, in groups of at most BATCH_QUERIES padded queries whose padded context (entries read,
        scored and masked for every piece) stays within twice their own plus PAD_SLACK."""
        decode = [s for s in pieces if s.n == 1]
        groups = [decode] if decode else []
        group, n_max, ctx_sum = [], 0, 0
        for s in sorted((s for s in pieces if s.n > 1), key=lambda s: s.state.num_tokens + s.n):
            ctx = s.state.num_tokens + s.n
            k = len(group) + 1
            if group and (k * max(n_max, s.n) > BATCH_QUERIES or k * ctx > 2 * (ctx_sum + ctx) + PAD_SLACK):
                groups.append(group)
                group, n_max, ctx_sum = [], 0, 0
            group.append(s)
            n_max, ctx_sum = max(n_max, s.n), ctx_sum + ctx
        if group:
            groups.append(group)
        return groups

    def _take_snapshots(self, states: list[LayerState]) -> None:
        """After a batched piece: a state that just reached one of its snapshot boundaries b is the state at b (the
        window's last w-1 rows; for CSA the compressors' last window, which the overlap continues from)."""
        for st in states:
            b = st.num_tokens
            if b in st.snapshot_at:
                st.snapshots[b] = LayerSnapshot(st.window.clone(), _prev(st.comp) if self.ratio == 4 else None,
                                                _prev(st.index))

    def _attend_batch(self, q: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor,
                      proj: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      seqs: list[SeqSlice]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`_attend` for several sequences at once (each at most QUERY_BLOCK new tokens: `_rounds` cuts longer
        chunks, and at snapshot boundaries): q, kv, pos and `proj` are the whole packed batch. Returns (the packed
        rows, or None for all rows in order; their o).

        Same math as `_attend`, with no per-sequence tensor work beyond views: each sequence's window and new
        tokens are laid out in one padded tensor (each keeps a view of its row as its window), the compressors
        advance all sequences at once (`Compressor.forward_batch`), the compressed entries of all sequences are
        read in one gather (`read_padded`), and the indexer and the core attention run once over queries and
        keys padded to the longest sequence.
        """
        states = [s.state for s in seqs]
        batch = _Batch([s.start for s in seqs], [s.n for s in seqs], [st.num_tokens for st in states])
        dev, B, n_max = kv.device, len(seqs), max(batch.lens)
        if batch.uniform:
            s0, n = batch.starts[0], n_max
            rows, padded = slice(s0, s0 + B * n), None
            qp, qpos = q[rows].view(B, n, *q.shape[1:]), pos[rows].view(B, n)
            take = lambda t: t[rows].view(B, n, *t.shape[1:])  # noqa: E731
        else:
            padded = batch.padded_rows(dev)  # [B, n_max]
            rows = batch.rows(dev)[2]
            qp, qpos = q[padded], pos[padded]
            take = lambda t: t[padded]  # noqa: E731
        # ---- sliding window: query t sees keys at positions (t-w, t]
        keep = self.window - 1
        keys, a = _concat_rows([st.window for st in states], kv, batch)  # [B, L, hd]: window, then the new tokens
        tot = [x + n for x, n in zip(a, batch.lens, strict=True)]
        for st, w in zip(states, _row_views(keys, [max(0, t - keep) if keep > 0 else t for t in tot], tot),
                         strict=True):
            st.window = w
        if n_max == 1 and min(a) == max(a):  # decode, all windows of one length: every key is visible
            visible = None
        else:
            ar = torch.arange(keys.shape[1], device=dev)
            kpos = torch.tensor([p - x for p, x in zip(batch.p0, a, strict=True)], device=dev)[:, None] + ar  # [B, L]
            diff = qpos[:, :, None] - kpos[:, None, :]
            visible = (diff >= 0) & (diff < self.window) & (ar < torch.tensor(tot, device=dev)[:, None])[:, None]
        blocks = [(keys, visible)]
        # ---- compressed entries: entry i is visible to t iff i < (t+1)//m (§2.4)
        if self.ratio:  # compress the new tokens first: an entry is visible from its window's last token on
            comps = [st.comp for st in states]
            self.compressor.forward_batch(*proj["comp"], batch, comps, self.freqs)
            counts = [cs.store.n for cs in comps]
        if self.indexer is not None and max(counts) > STREAM_ENTRIES:  # CSA over a long context: streamed top-k
            idx_states = [st.index for st in states]
            self.indexer.compressor.forward_batch(*proj["index"], batch, idx_states, self.freqs)
            iq, iw = take(proj["iq"][0]), take(proj["iq"][1])
            tops = [self.indexer.select_topk(iq[i], iw[i], qpos[i], cs.store) for i, cs in enumerate(idx_states)]
            ents = [cs.store.gather(i) if cs.store.n else None for cs, (i, _) in zip(comps, tops, strict=True)]
            like = next(e for e in ents if e is not None)  # a sequence with entries (max(counts) > 0)
            ents = [like.new_zeros(like.shape) if e is None else e for e in ents]
            blocks.append((torch.stack(ents), torch.stack([ok for _, ok in tops])))  # each query's own entries
        elif self.ratio:
            entries = _read_entries([cs.store for cs in comps], counts)  # [B, N, hd]
            chosen = torch.arange(entries.shape[1], device=dev) < ((qpos + 1) // self.ratio)[:, :, None]
            if self.indexer is not None:  # CSA: the indexer's top-k among the visible entries
                idx_states = [st.index for st in states]
                self.indexer.compressor.forward_batch(*proj["index"], batch, idx_states, self.freqs)
                if entries.shape[1]:
                    ikeys = _read_entries([cs.store for cs in idx_states], counts)
                    iq, iw = proj["iq"]
                    chosen = self.indexer.select_padded(take(iq), take(iw), ikeys, chosen)
            if entries.shape[1]:
                blocks.append((entries, chosen))
        for st, n in zip(states, batch.lens, strict=True):
            st.num_tokens += n
        o = self._core(qp, blocks)  # [B, n_max, H, hd]
        if padded is None:
            return (None if rows == slice(0, q.shape[0]) else rows), o.flatten(0, 1)
        keep_q = torch.arange(n_max, device=dev)[None, :] < torch.tensor(batch.lens, device=dev)[:, None]
        return rows, o[keep_q]

    def _core(self, q: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """q [B, n, H, hd]; blocks of keys (K = V) with their masks: [(keys [B, L_j, hd], visible [B, n, L_j] or
        None: all visible)] -> [B, n, H, hd]. A block may also give every query its own keys: keys [B, n, L_j, hd]
        (the CSA top-k entries of each query, gathered).

        One softmax over the visible keys of all blocks with the per-head sink in the denominator (§2.2).
        Few queries (decode): the blocks' scores are concatenated, not their keys; many: the keys. One query per
        sequence on CPU: one C call (`select_attn_core_path`); these torch ops are its reference.
        """
        b, n, h, d = q.shape
        grad = torch.is_grad_enabled() and (q.requires_grad or self.attn_sink.requires_grad)
        if select_attn_core_path(q, n, [k.dim() for k, _ in blocks], grad) == "kernel":  # decode: one C call
            o = attn_kernel().decode(q.view(b, h, d).contiguous(),
                                     [(k.float().contiguous(), None if v is None else v.view(b, -1).contiguous())
                                      for k, v in blocks], self.attn_sink.float(), self.scale)
            return o.view(b, n, h, d)
        step = max(1, CORE_SCORES // (n * h * sum(k.shape[-2] for k, _ in blocks)))
        if step < b:  # keep each piece's scores in cache: the sequences go in groups of `step`
            return torch.cat([self._core(q[i:i + step], [(k[i:i + step], None if v is None else v[i:i + step])
                                                         for k, v in blocks])
                              for i in range(0, b, step)])
        qf = q.float().reshape(b, n * h, d)
        own = [(k, v) for k, v in blocks if k.dim() == 4]  # per-query keys
        blocks = [(k, v) for k, v in blocks if k.dim() == 3]
        if len(blocks) > 1 and n * h > d:
            masks = [torch.ones(b, n, k.shape[1], dtype=torch.bool, device=k.device) if v is None else v
                     for k, v in blocks]
            blocks = [(torch.cat([k.float() for k, _ in blocks], dim=1), torch.cat(masks, dim=-1))]
        blocks += own
        keys = [k.float() for k, _ in blocks]
        scores = []
        for k, (_, v) in zip(keys, blocks, strict=True):
            if k.dim() == 4:  # [B*n, H, hd] x [B*n, hd, L_j]
                s = torch.bmm(qf.view(b * n, h, d), k.flatten(0, 1).transpose(1, 2)).view(b, n, h, -1) * self.scale
            else:
                s = (torch.bmm(qf, k.transpose(1, 2)).view(b, n, h, -1) * self.scale)  # [B, n, H, L_j]
            scores.append(s if v is None else s.masked_fill(~v[:, :, None], float("-inf")))
        sink = self.attn_sink.float().view(1, 1, h, 1).expand(b, n, h, 1)
        probs = torch.cat([*scores, sink], dim=-1).softmax(dim=-1).view(b, n * h, -1)
        o, at = None, 0
        for k in keys:
            L = k.shape[-2]
            if k.dim() == 4:
                part = torch.bmm(probs[..., at:at + L].reshape(b * n, h, L), k.flatten(0, 1)).view(b, n * h, d)
            else:
                part = torch.bmm(probs[..., at:at + L], k)
            o = part if o is None else o + part
            at += L
        return o.view(b, n, h, d).to(q.dtype)


def _read_entries(stores: list[EntryStore], counts: list[int]) -> torch.Tensor:
    """`read_padded`; one store is read as it is (a dense store: a view, no copy per round of a long chunk)."""
    return stores[0].read(counts[0])[None] if len(stores) == 1 else read_padded(stores, counts)


def _prev(cs: CompressorState | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A copy of a CSA compressor's last finished window (raw kv, gate with ape), or None."""
    return None if cs is None else (cs.prev_kv.clone(), cs.prev_gate.clone())
