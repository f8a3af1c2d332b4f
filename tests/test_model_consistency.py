"""Our own consistency: full prefill == chunked prefill == prefix + decode, packed == alone (fp32, 1e-5)."""

from __future__ import annotations

import torch

from engine.model.generate import greedy_generate
from engine.model.model import Transformer

TOL = 1e-5


def _ids(n: int, seed: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g)


@torch.inference_mode()
def _run_chunks(model: Transformer, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    st = model.new_state()
    out, pos = [], 0
    for n in chunks:
        out.append(model.compute_logits(model(ids[pos:pos + n], [st], [n])))
        pos += n
    assert st.num_tokens == pos == len(ids)
    return torch.cat(out)


def test_chunked_prefill_equals_full(tiny_model):
    ids = _ids(400, 0, tiny_model.cfg.vocab_size)
    full = _run_chunks(tiny_model, ids, [400])
    # chunk ends at 1, 4, 8, 127, 128, 130, 256, 384, 400: window, 4:1 and 128:1 boundaries
    chunked = _run_chunks(tiny_model, ids, [1, 3, 4, 119, 1, 2, 126, 128, 16])
    assert torch.isfinite(full).all()
    assert (full - chunked).abs().max().item() <= TOL


def test_prefix_then_decode_equals_full(tiny_model):
    ids = _ids(300, 1, tiny_model.cfg.vocab_size)
    full = _run_chunks(tiny_model, ids, [300])
    decode = _run_chunks(tiny_model, ids, [100] + [1] * 200)  # decode crosses 127/128, 255/256 and every 4
    assert (full - decode).abs().max().item() <= TOL


def test_packed_batch_equals_each_alone(tiny_model):
    lens = [300, 5, 129, 64]
    seqs = [_ids(n, 10 + i, tiny_model.cfg.vocab_size) for i, n in enumerate(lens)]
    alone = [_run_chunks(tiny_model, s, [len(s)]) for s in seqs]
    with torch.inference_mode():
        states = [tiny_model.new_state() for _ in seqs]
        packed = tiny_model.compute_logits(tiny_model(torch.cat(seqs), states, lens))
    assert (torch.cat(alone) - packed).abs().max().item() <= TOL
    # then one mixed step: a decode token for two sequences and a chunk for another
    with torch.inference_mode():
        nxt = [_ids(1, 50, 512), _ids(7, 51, 512), _ids(1, 52, 512)]
        mixed = tiny_model.compute_logits(tiny_model(torch.cat(nxt), [states[0], states[2], states[3]], [1, 7, 1]))
    solo = [_run_chunks(tiny_model, torch.cat([seqs[i], t]), [len(seqs[i]), len(t)])[-len(t):]
            for i, t in zip([0, 2, 3], nxt)]
    assert (torch.cat(solo) - mixed).abs().max().item() <= TOL


def test_greedy_batch_equals_alone(tiny_model):
    prompts = [_ids(n, 20 + n, 512).tolist() for n in (3, 130, 40)]
    batched = greedy_generate(tiny_model, prompts, max_new_tokens=12)
    alone = [greedy_generate(tiny_model, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert all(len(o) == 12 for o in batched)


def test_mtp_runs_and_is_consistent(tiny_model):
    """MTP: logits for t+2 from h_t and token t+1; full == chunked through its own window cache."""
    ids = _ids(200, 3, tiny_model.cfg.vocab_size)
    with torch.inference_mode():
        st = tiny_model.new_state()
        h = tiny_model(ids[:-1], [st], [199])
        _, full = tiny_model.mtp_forward(h, ids[1:], [st], [199])
        st2 = tiny_model.new_state()
        parts, pos = [], 0
        for n in (130, 1, 68):
            hh = tiny_model(ids[pos:pos + n], [st2], [n])
            parts.append(tiny_model.mtp_forward(hh, ids[pos + 1:pos + n + 1], [st2], [n])[1])
            pos += n
    assert full.shape == (199, tiny_model.cfg.vocab_size) and torch.isfinite(full).all()
    assert (full - torch.cat(parts)).abs().max().item() <= TOL


def test_bfloat16_runs_close_to_float32(tiny_ckpt, tiny_model):
    from engine.weights.loader import load_model

    bf = load_model(tiny_ckpt, dtype=torch.bfloat16)
    ids = _ids(260, 4, 512)
    ref = _run_chunks(tiny_model, ids, [260])
    got = _run_chunks(bf, ids, [200, 60])
    assert torch.isfinite(got).all()
    # bf16 carries ~3 significant digits: compare the distributions, not the digits
    p, q = ref.softmax(-1), got.softmax(-1)
    assert (p - q).abs().sum(-1).max().item() < 0.15
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean().item() > 0.9


def _set_batched(model: Transformer, batched: bool) -> None:
    for block in model.layers:
        block.attn.batched = batched


@torch.inference_mode()
def test_batched_attention_equals_reference_in_the_model(tiny_model):
    """The production attention path (`batched`: long chunks in rounds of QUERY_BLOCK pieces, snapshot boundaries
    cut, short chunks and decode tokens batched) equals the per-sequence reference through the whole model:
    logits within 1e-5, every layer's prefix-cache snapshot equal."""
    cfg = tiny_model.cfg
    steps = [  # (new tokens per sequence, {sequence: snapshot boundaries}); boundaries at 128-token pages
        ([700, 1, 300, 9, 513], {0: [128, 512, 640], 2: [256], 4: [512]}),
        ([1, 600, 1, 260, 2], {1: [128, 384], 3: [256]}),
        ([1, 1, 1, 1, 1], {}),
    ]
    ids = [[_ids(n, 100 + 10 * i + k, cfg.vocab_size) for k, n in enumerate(lens)] for i, (lens, _) in enumerate(steps)]
    runs = {}
    try:
        for batched in (False, True):
            _set_batched(tiny_model, batched)
            states = [tiny_model.new_state() for _ in steps[0][0]]
            logits = []
            for (lens, snaps), x in zip(steps, ids, strict=True):
                for k, bs in snaps.items():
                    for layer in states[k].layers[:cfg.num_hidden_layers]:
                        layer.snapshot_at.extend(bs)
                logits.append(tiny_model.compute_logits(tiny_model(torch.cat(x), states, lens)))
            runs[batched] = torch.cat(logits), states
    finally:
        _set_batched(tiny_model, True)
    (want, slow), (got, fast) = runs[False], runs[True]
    assert torch.isfinite(want).all() and (got - want).abs().max().item() <= TOL
    n_snaps = 0
    for f, s in zip(fast, slow, strict=True):
        for i, (lf, ls) in enumerate(zip(f.layers[:cfg.num_hidden_layers], s.layers, strict=False)):
            # the first layer sees the same inputs: copies of the same rows; later ones inputs within rounding
            same = torch.equal if i == 0 else _close
            assert lf.snapshots.keys() == ls.snapshots.keys()
            for b, sf in lf.snapshots.items():
                ss = ls.snapshots[b]
                assert same(sf.window, ss.window), (i, b)
                for pf, ps in ((sf.comp_prev, ss.comp_prev), (sf.index_prev, ss.index_prev)):
                    assert (pf is None) == (ps is None)
                    assert pf is None or (same(pf[0], ps[0]) and same(pf[1], ps[1])), (i, b)
                n_snaps += 1
    assert n_snaps == 8 * cfg.num_hidden_layers


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= TOL
