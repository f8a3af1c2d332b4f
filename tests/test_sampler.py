"""Sampler: greedy, temperature, top-k, top-p, seeded reproducibility, empirical frequencies, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.core.sampler import Sampler, SamplerOutput
from scheduler.sampling import SamplingParams

V = 50


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax():
    logits = _logits(6)
    out = Sampler()(logits, [SamplingParams(temperature=0)] * 6, [None] * 6)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 100.0])
def test_top_k_1_and_tiny_top_p_are_greedy(temperature):
    logits = _logits(8, seed=1)
    sampler = Sampler(seed=3)
    for _ in range(5):
        k1 = sampler(logits, [SamplingParams(temperature=temperature, top_k=1)] * 8, [None] * 8)
        assert k1.token_ids == logits.argmax(-1).tolist()
        p0 = sampler(logits, [SamplingParams(temperature=temperature, top_p=1e-6)] * 8, [None] * 8)
        assert p0.token_ids == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_stay_argmax():
    logits = _logits(4, seed=2)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, top_k=5)]
    out = Sampler()(logits, params, [None, _gen(1), None, None])
    argmax = logits.argmax(-1).tolist()
    assert out.token_ids[0] == argmax[0] and out.token_ids[2] == argmax[2]
    assert out.token_ids[3] in logits[3].topk(5).indices.tolist()


def _run_seeded(logits_rows, params, position, batch, steps, seed):
    """Sample `steps` tokens for a seeded row placed at `position` in a batch of random other rows."""
    gen = _gen(seed)
    sampler = Sampler(seed=123 + batch)
    others = torch.Generator().manual_seed(999 + batch)
    tokens = []
    for step in range(steps):
        logits = torch.randn(batch, V, generator=others) * 3
        logits[position] = logits_rows[step]
        ps = [SamplingParams(temperature=0.8, top_k=10, top_p=0.9)] * batch
        ps[position] = params
        gens = [_gen(7 + j) if j % 2 else None for j in range(batch)]
        gens[position] = gen
        tokens.append(sampler(logits, ps, gens).token_ids[position])
    return tokens


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=20),
                                    SamplingParams(temperature=1.3, top_p=0.8)])
def test_seeded_row_independent_of_batch(params):
    rows = torch.randn(20, V, generator=_gen(5))
    ref = _run_seeded(rows, params, position=0, batch=1, steps=20, seed=42)
    for position, batch in [(0, 3), (2, 3), (5, 8), (7, 8)]:
        assert _run_seeded(rows, params, position, batch, steps=20, seed=42) == ref
    assert _run_seeded(rows, params, 0, 1, steps=20, seed=43) != ref  # a different seed differs


def test_unseeded_rows_use_sampler_seed():
    logits = _logits(4, seed=4)
    ps = [SamplingParams(temperature=1.0)] * 4
    assert Sampler(seed=0)(logits, ps, [None] * 4).token_ids == Sampler(seed=0)(logits, ps, [None] * 4).token_ids
    s1, s2 = Sampler(seed=0), Sampler(seed=1)
    assert [s1(logits, ps, [None] * 4).token_ids for _ in range(10)] != \
        [s2(logits, ps, [None] * 4).token_ids for _ in range(10)]


def _frequencies(logits_row, params, draws=4000, seed=0):
    sampler = Sampler(seed=seed)
    logits = logits_row.expand(draws, -1).contiguous()
    out = sampler(logits, [params] * draws, [None] * draws)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=logits_row.numel()).float()
    return counts / draws


PROBS = torch.tensor([0.5, 0.25, 0.15, 0.10])


def test_empirical_frequencies_temperature_1():
    freq = _frequencies(PROBS.log(), SamplingParams(temperature=1.0))
    assert torch.all((freq - PROBS).abs() < 0.03), freq


def test_temperature_sharpens_and_flattens():
    sharp_expected = torch.softmax(PROBS.log() / 0.5, -1)  # p^2 normalised
    sharp = _frequencies(PROBS.log(), SamplingParams(temperature=0.5))
    assert torch.all((sharp - sharp_expected).abs() < 0.03), sharp
    assert sharp[0] > 0.6
    flat = _frequencies(PROBS.log(), SamplingParams(temperature=100.0))
    assert torch.all((flat - 0.25).abs() < 0.03), flat


def test_top_k_excludes_the_tail():
    freq = _frequencies(PROBS.log(), SamplingParams(temperature=1.0, top_k=2))
    assert freq[2] == 0 and freq[3] == 0
    expected = torch.tensor([2 / 3, 1 / 3])
    assert torch.all((freq[:2] - expected).abs() < 0.03), freq


def test_top_p_nucleus():
    # Mass 0.5 + 0.25 = 0.75 reaches 0.7: tokens 0 and 1 only.
    freq = _frequencies(PROBS.log(), SamplingParams(temperature=1.0, top_p=0.7))
    assert freq[2] == 0 and freq[3] == 0
    assert torch.all((freq[:2] - torch.tensor([2 / 3, 1 / 3])).abs() < 0.03), freq
    # 0.5 alone reaches 0.45: only the top token.
    assert _frequencies(PROBS.log(), SamplingParams(temperature=1.0, top_p=0.45))[0] == 1
    # Just above 0.9 needs the fourth token.
    freq = _frequencies(PROBS.log(), SamplingParams(temperature=1.0, top_p=0.91))
    assert torch.all((freq - PROBS).abs() < 0.03), freq


def test_top_k_then_top_p():
    # top-k 3 renormalises to [0.556, 0.278, 0.167]; top_p 0.8 then keeps tokens 0 and 1.
    freq = _frequencies(PROBS.log(), SamplingParams(temperature=1.0, top_k=3, top_p=0.8))
    assert freq[2] == 0 and freq[3] == 0
    freq = _frequencies(PROBS.log(), SamplingParams(temperature=1.0, top_k=3, top_p=0.9))
    assert freq[3] == 0 and freq[2] > 0.1


def test_logprobs_are_raw_log_softmax():
    logits = _logits(3, seed=6)
    params = [SamplingParams(temperature=0.5, top_k=3, logprobs=5), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logprobs=0)]
    out = Sampler()(logits, params, [_gen(0), None, None])
    ref = torch.log_softmax(logits, -1)
    lp0, top0 = out.logprobs[0]
    assert math.isclose(lp0, ref[0, out.token_ids[0]].item(), rel_tol=1e-6)
    vals, ids = ref[0].topk(5)
    assert list(top0) == ids.tolist()
    for tid, v in top0.items():
        assert math.isclose(v, ref[0, tid].item(), rel_tol=1e-6)
    assert out.logprobs[1] is None
    lp2, top2 = out.logprobs[2]
    assert top2 == {} and math.isclose(lp2, ref[2].max().item(), rel_tol=1e-6)


def test_logprobs_more_than_vocab():
    logits = _logits(1)
    out = Sampler()(logits, [SamplingParams(temperature=0, logprobs=1000)], [None])
    assert len(out.logprobs[0][1]) == V


def test_bad_shapes():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(V), [SamplingParams()], [None])
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, V), [SamplingParams()], [None])


@pytest.mark.gpu
def test_cuda_seeded_matches_across_batches():
    dev = torch.device("cuda")
    rows = torch.randn(10, V, generator=_gen(5)).to(dev)
    p = SamplingParams(temperature=0.9, top_p=0.95)

    def run(batch, position):
        g = torch.Generator(device=dev).manual_seed(11)
        sampler, toks = Sampler(), []
        for step in range(10):
            logits = torch.randn(batch, V, device=dev)
            logits[position] = rows[step]
            gens = [None] * batch
            gens[position] = g
            toks.append(sampler(logits, [p] * batch, gens).token_ids[position])
        return toks

    assert run(1, 0) == run(6, 4)
    out = Sampler()(rows, [SamplingParams(temperature=0, logprobs=2)] * 10, [None] * 10)
    assert out.token_ids == rows.argmax(-1).tolist()
