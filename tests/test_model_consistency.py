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
