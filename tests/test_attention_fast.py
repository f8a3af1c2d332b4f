"""The batched attention path (`_attend_batch`: decode steps and prefill chunks of many sequences at once, long
chunks in rounds of QUERY_BLOCK-token pieces, cut at snapshot boundaries) equals the per-sequence path (`_attend`).

Mixed context lengths around the window (127/128/129), the 4:1 and 128:1 compression boundaries, paged
stores sharing one pool and dense stores; the batched compressor against the per-sequence one; the
batched entry reads/writes against the per-store ones.
"""

from __future__ import annotations

import pytest
import torch

from engine.cache.seq_state import DenseEntries, LayerState, PagedEntries, append_rows, read_padded
from engine.model import attention
from engine.model.attention import Attention, SeqSlice, _Batch

TOL = 1e-5
LENS = [1, 3, 4, 7, 126, 127, 128, 129, 131, 252, 255, 256]  # contexts before the decode steps
PAGE_TOKENS = 128


def _fresh(attn: Attention, paged: bool, per_seq: int = 4) -> list[LayerState]:
    """One state per sequence of LENS; paged: all in one pool per store kind, pages assigned in a shuffled order,
    per_seq pages each (4: enough for 256 + decode steps)."""
    if not paged:
        return [attn.new_state("cpu") for _ in LENS]
    r = attn.ratio
    order = torch.randperm(per_seq * len(LENS), generator=torch.Generator().manual_seed(0)).tolist()
    cfg = attn.cfg
    comp = torch.zeros(len(order), PAGE_TOKENS // r, cfg.head_dim) if r else None
    index = torch.zeros(len(order), PAGE_TOKENS // 4, cfg.index_head_dim) if r == 4 else None
    out = []
    for i in range(len(LENS)):
        pages = order[i * per_seq:(i + 1) * per_seq]
        out.append(attn.new_state("cpu", PagedEntries(comp, pages) if r else None,
                                  PagedEntries(index, pages) if r == 4 else None))
    return out


def _step(attn: Attention, states: list[LayerState], xs: list[torch.Tensor], batched: bool) -> torch.Tensor:
    """One forward: sequence i adds the tokens xs[i] (packed in order)."""
    seqs, start = [], 0
    for st, x in zip(states, xs, strict=True):
        seqs.append(SeqSlice(start, x.shape[0], st))
        start += x.shape[0]
    pos = torch.cat([torch.arange(st.num_tokens, st.num_tokens + x.shape[0]) for st, x in zip(states, xs)])
    try:
        attn.batched = batched
        return attn(torch.cat(xs), pos, seqs)
    finally:
        attn.batched = True


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a.numel() == 0 or (a - b).abs().max().item() <= TOL)


def _entries(st: LayerState) -> list[torch.Tensor]:
    return [cs.store.read(cs.store.n) for cs in (st.comp, st.index) if cs is not None]


def _assert_same_states(fast: list[LayerState], slow: list[LayerState]) -> None:
    for f, s in zip(fast, slow, strict=True):
        assert f.num_tokens == s.num_tokens
        assert _close(f.window, s.window)
        for a, b in zip(_entries(f), _entries(s), strict=True):
            assert _close(a, b)
        for cf, cs in ((f.comp, s.comp), (f.index, s.index)):
            if cf is not None:
                assert _close(cf.pend_kv, cs.pend_kv) and _close(cf.pend_gate, cs.pend_gate)


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "dense"])
@pytest.mark.parametrize("layer", [0, 1, 2, "csa-streamed"], ids=["swa", "csa", "hca", "csa-streamed"])
@torch.inference_mode()
def test_batched_attention_equals_per_sequence_attend(tiny_model, layer, paged, monkeypatch):
    """Prefill (uneven lengths), then chunks of uneven and of equal lengths, then decode steps; every output and
    the states after equal the per-sequence path. csa-streamed: the batched CSA layer takes its long-context path
    (streamed top-k per sequence, gathered entries) from the first entry on."""
    if layer == "csa-streamed":
        monkeypatch.setattr(attention, "STREAM_ENTRIES", 0)
        layer = 1
    attn = tiny_model.layers[layer].attn
    assert attn.ratio == (0, 4, 128)[layer]
    d = tiny_model.cfg.hidden_size
    g = torch.Generator().manual_seed(layer)
    fast, slow = _fresh(attn, paged), _fresh(attn, paged)
    chunks = [LENS, [1, 2, 5, 1, 3, 4, 1, 7, 2, 6, 1, 4], [3] * len(LENS)] + [[1] * len(LENS)] * 6
    for step, lens in enumerate(chunks):  # the decode steps cross 127/128/129, 255/256 and 4:1 boundaries
        xs = [torch.randn(n, d, generator=g) for n in lens]
        want = _step(attn, slow, xs, batched=False)
        got = _step(attn, fast, xs, batched=True)
        assert _close(got, want), f"step {step}"
    _assert_same_states(fast, slow)


def _pins_batch_tensor(st: LayerState) -> bool:
    """Some tensor of st is a view into a larger tensor (a batched step's padded tensor)."""
    ts = [st.window] + [t for cs in (st.comp, st.index) if cs is not None
                        for t in (cs.pend_kv, cs.pend_gate, cs.prev_kv, cs.prev_gate) if t is not None]
    return any(t.untyped_storage().nbytes() > t.numel() * t.element_size() for t in ts)


@torch.inference_mode()
def test_sequences_left_out_stop_pinning_batch_tensors(tiny_model):
    """Sequences that sit out later batched calls (chunked prefill, preemption) have their views into the old
    batch tensors copied out after VIEW_AGE calls; the ones scheduled every call keep the views (no copies), and
    the outputs still equal the per-sequence path."""
    from engine.model.attention import VIEW_AGE

    attn = tiny_model.layers[1].attn
    d = tiny_model.cfg.hidden_size
    g = torch.Generator().manual_seed(5)
    fast, slow = _fresh(attn, True), _fresh(attn, True)
    xs = [torch.randn(n, d, generator=g) for n in [5] * len(LENS)]
    want = _step(attn, slow, xs, batched=False)
    assert _close(_step(attn, fast, xs, batched=True), want)
    assert all(_pins_batch_tensor(st) for st in fast)
    first = attn._calls  # every forward counts (the reference `_step`s below too)
    for step in range(VIEW_AGE + 2):
        xs = [torch.randn(1, d, generator=g) for _ in range(2)]
        want = _step(attn, slow[:2], xs, batched=False)
        assert _close(_step(attn, fast[:2], xs, batched=True), want), f"step {step}"
        assert all(_pins_batch_tensor(st) for st in fast[:2])
        assert all(_pins_batch_tensor(st) for st in fast[2:]) == (attn._calls - first <= VIEW_AGE)
        assert not any(_pins_batch_tensor(st) for st in fast[2:]) == (attn._calls - first > VIEW_AGE)
    xs = [torch.randn(2, d, generator=g) for _ in LENS]
    assert _close(_step(attn, fast, xs, batched=True), _step(attn, slow, xs, batched=False))
    _assert_same_states(fast, slow)


@torch.inference_mode()
def test_long_chunk_left_out_stops_pinning_its_chunk(tiny_model):
    """A long chunk's last piece leaves a window viewing that round's padded tensor; left out of later calls, it is
    copied out too."""
    from engine.model.attention import VIEW_AGE

    attn = tiny_model.layers[0].attn
    d = tiny_model.cfg.hidden_size
    g = torch.Generator().manual_seed(6)
    sts = _fresh(attn, False)[:2]
    _step(attn, sts, [torch.randn(400, d, generator=g), torch.randn(1, d, generator=g)], batched=True)
    assert _pins_batch_tensor(sts[0])
    window = sts[0].window.clone()
    for _ in range(VIEW_AGE + 1):
        _step(attn, sts[1:], [torch.randn(1, d, generator=g)], batched=True)
    assert not _pins_batch_tensor(sts[0]) and torch.equal(sts[0].window, window)


def _assert_same_snapshots(fast: list[LayerState], slow: list[LayerState]) -> None:
    """Snapshots taken after a batched piece equal the reference's bit for bit (copies of the same rows)."""
    for f, s in zip(fast, slow, strict=True):
        assert f.snapshots.keys() == s.snapshots.keys()
        assert not f.snapshot_at and not s.snapshot_at
        for b, sf in f.snapshots.items():
            ss = s.snapshots[b]
            assert torch.equal(sf.window, ss.window), b
            for pf, ps in ((sf.comp_prev, ss.comp_prev), (sf.index_prev, ss.index_prev)):
                assert (pf is None) == (ps is None), b
                if pf is not None:
                    assert torch.equal(pf[0], ps[0]) and torch.equal(pf[1], ps[1]), b


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "dense"])
@pytest.mark.parametrize("layer", [0, 1, 2], ids=["swa", "csa", "hca"])
@torch.inference_mode()
def test_long_chunks_and_snapshots_run_batched_in_rounds(tiny_model, layer, paged):
    """Long chunks (several QUERY_BLOCK rounds, uneven last pieces), short chunks, decode tokens and snapshot
    boundaries (inside a chunk, at a round's cut, at a chunk's end, several in one chunk) in the same calls: the
    outputs, the states and the snapshots equal the per-sequence path."""
    from engine.model.attention import QUERY_BLOCK

    attn = tiny_model.layers[layer].attn
    d = tiny_model.cfg.hidden_size
    g = torch.Generator().manual_seed(20 + layer)
    fast, slow = _fresh(attn, paged, per_seq=12), _fresh(attn, paged, per_seq=12)
    steps = [  # (new tokens per sequence, {sequence: snapshot boundaries})
        ([600, 1, 300, 5, 129, 1, 513, 1, 2, 256, 3, 1], {2: [128, 256], 6: [384, 512], 9: [256]}),
        ([1, 700, 1, 260, 1, 1, 1, 3, 1, 1, 2 * QUERY_BLOCK + 1, 7], {1: [128, 640], 3: [256], 10: [256, 512]}),
        ([257, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], {0: [640, 768]}),
        ([1] * len(LENS), {}),
    ]
    for i, (lens, snaps) in enumerate(steps):
        for sts in (fast, slow):
            for k, bs in snaps.items():
                sts[k].snapshot_at.extend(bs)
        xs = [torch.randn(n, d, generator=g) for n in lens]
        want = _step(attn, slow, xs, batched=False)
        got = _step(attn, fast, xs, batched=True)
        assert _close(got, want), f"step {i}"
        _assert_same_states(fast, slow)
        _assert_same_snapshots(fast, slow)
    assert sum(len(st.snapshots) for st in fast) == 12


@torch.inference_mode()
def test_slices_of_one_state_continue_each_other(tiny_model):
    """Two slices of one sequence in one call run in order (the second sees the first in the cache), as the
    per-sequence path runs them."""
    attn = tiny_model.layers[1].attn
    d = tiny_model.cfg.hidden_size
    g = torch.Generator().manual_seed(12)
    fast, slow = _fresh(attn, True)[:2], _fresh(attn, True)[:2]
    x = torch.randn(300 + 5 + 40, d, generator=g)
    pos = torch.cat([torch.arange(300), torch.arange(5), torch.arange(300, 340)])
    outs = []
    for sts, batched in ((slow, False), (fast, True)):
        seqs = [SeqSlice(0, 300, sts[0]), SeqSlice(300, 5, sts[1]), SeqSlice(305, 40, sts[0])]
        sts[0].snapshot_at.append(256)
        attn.batched = batched
        try:
            outs.append(attn(x, pos, seqs))
        finally:
            attn.batched = True
    assert _close(outs[1], outs[0])
    _assert_same_states(fast, slow)
    _assert_same_snapshots(fast, slow)
    assert fast[0].num_tokens == 340


def test_groups_batch_by_queries_and_context(tiny_model):
    """A round's single tokens run as one group; the other pieces by context length, within BATCH_QUERIES padded
    queries and padded context of twice their own plus PAD_SLACK."""
    from engine.model.attention import BATCH_QUERIES, PAD_SLACK

    attn = tiny_model.layers[0].attn

    def piece(p0: int, n: int) -> SeqSlice:
        st = attn.new_state("cpu")
        st.num_tokens = p0
        return SeqSlice(0, n, st)

    def ids(groups: list[list[SeqSlice]]) -> list[list[int]]:
        return [[id(s) for s in grp] for grp in groups]

    short = [piece(0, 256) for _ in range(BATCH_QUERIES // 256 + 1)]
    dec = [piece(5, 1), piece(10**6, 1)]
    assert ids(attn._groups([dec[0], *short, dec[1]])) == ids([dec, short[:-1], short[-1:]])
    far = piece(4 * PAD_SLACK, 100)
    near = [piece(100, 100), piece(0, 200)]
    assert ids(attn._groups([far, *near])) == ids([near, [far]])
    assert len(attn._groups([piece(PAD_SLACK, 100), piece(PAD_SLACK // 2, 2)])) == 1


@torch.inference_mode()
def test_mixed_batch_long_chunk_and_snapshot(tiny_model):
    """A chunk longer than QUERY_BLOCK and a sequence with a pending snapshot in the same call as short ones."""
    attn = tiny_model.layers[1].attn
    d = tiny_model.cfg.hidden_size
    g = torch.Generator().manual_seed(11)
    fast, slow = _fresh(attn, True), _fresh(attn, True)
    lens = [300, 1, 128, 1, 2, 1, 128, 1, 1, 5, 1, 1]
    for sts in (fast, slow):
        sts[2].snapshot_at.append(128)
    xs = [torch.randn(n, d, generator=g) for n in lens]
    want = _step(attn, slow, xs, batched=False)
    got = _step(attn, fast, xs, batched=True)
    assert _close(got, want)
    _assert_same_states(fast, slow)
    snap_f, snap_s = fast[2].snapshots[128], slow[2].snapshots[128]
    assert _close(snap_f.window, snap_s.window) and _close(snap_f.comp_prev[0], snap_s.comp_prev[0])


@pytest.mark.parametrize("layer", [1, 2], ids=["csa", "hca"])
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "dense"])
@torch.inference_mode()
def test_batched_compressor_equals_per_sequence(tiny_model, layer, paged):
    attn = tiny_model.layers[layer].attn
    comp, m = attn.compressor, attn.ratio
    width = comp.ape.shape[1]
    g = torch.Generator().manual_seed(7)
    starts = [0, 2, 3, 4, 7, m - 1, m, 2 * m - 1, 2 * m + 1]
    fast = [s.comp for s in _fresh(attn, paged)[:len(starts)]]
    slow = [s.comp for s in _fresh(attn, paged)[:len(starts)]]
    for f, s, p in zip(fast, slow, starts, strict=True):
        kv, gate = torch.randn(p, width, generator=g), torch.randn(p, width, generator=g)
        comp(kv, gate, 0, f, attn.freqs)
        comp(kv, gate, 0, s, attn.freqs)
    # uneven chunks (windows completing several at once), then equal ones, then m + 2 decode steps
    chunks = [[5, 1, 2 * m + 3, 0, 3, m, 1, 4, 2], [2] * len(starts)] + [[1] * len(starts)] * (m + 2)
    pos = starts
    for lens in chunks:
        kv, gate = torch.randn(sum(lens), width, generator=g), torch.randn(sum(lens), width, generator=g)
        first = [sum(lens[:i]) for i in range(len(lens))]
        live = [i for i, n in enumerate(lens) if n]
        comp.forward_batch(kv, gate, _Batch([first[i] for i in live], [lens[i] for i in live], [pos[i] for i in live]),
                           [fast[i] for i in live], attn.freqs)
        for i in live:
            comp(kv[first[i]:first[i] + lens[i]], gate[first[i]:first[i] + lens[i]], pos[i], slow[i], attn.freqs)
        pos = [p + n for p, n in zip(pos, lens)]
    for f, s in zip(fast, slow, strict=True):
        assert f.store.n == s.store.n > 0
        assert _close(f.store.read(f.store.n), s.store.read(s.store.n))
        assert torch.equal(f.pend_kv, s.pend_kv) and torch.equal(f.pend_gate, s.pend_gate)
        if comp.overlap:
            assert torch.equal(f.prev_kv, s.prev_kv) and torch.equal(f.prev_gate, s.prev_gate)


def test_batched_compressor_rejects_positions_out_of_step(tiny_model):
    attn = tiny_model.layers[1].attn
    st = attn.compressor.new_state("cpu")
    row = torch.zeros(1, attn.compressor.ape.shape[1])
    with pytest.raises(AssertionError, match="out of step"):
        attn.compressor.forward_batch(row, row, _Batch([0], [1], [5]), [st], attn.freqs)


def test_paged_batched_read_and_append_equal_per_store():
    g = torch.Generator().manual_seed(3)
    pool = torch.zeros(10, 4, 3)
    tables = [[7, 2, 5], [0], [9, 1], [3, 4, 6, 8]]
    counts = [9, 2, 8, 13]
    fast = [PagedEntries(pool, t) for t in tables]
    dense = [DenseEntries(3, "cpu") for _ in tables]
    for s, dd, c in zip(fast, dense, counts, strict=True):
        e = torch.randn(c - 1, 3, generator=g)
        s.append(e)
        dd.append(e)
    last = torch.randn(len(tables), 3, generator=g)
    append_rows(fast, last)
    append_rows(dense, last)
    assert [s.n for s in fast] == [s.n for s in dense] == counts
    for stores in (fast, dense):
        got = read_padded(stores, counts)
        assert got.shape == (4, 13, 3)
        for i, s in enumerate(stores):
            assert torch.equal(got[i, :counts[i]], dense[i].read(counts[i]))
            assert torch.equal(s.read(counts[i]), dense[i].read(counts[i]))
    assert read_padded(fast, [0, 0, 0, 0]).shape == (4, 0, 3)


def test_paged_store_refuses_missing_pages():
    pool = torch.zeros(4, 2, 3)
    s = PagedEntries(pool, [1])
    s.append(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="needs page 1"):
        append_rows([s], torch.ones(1, 3))
    with pytest.raises(RuntimeError, match="needs 2 pages"):
        read_padded([s], [3])
