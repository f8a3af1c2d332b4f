"""Sampler logits controls: min_tokens, presence/frequency/repetition penalties, logit_bias, each checked
against a plain per-token reference on fixed logits; seeded sampling stays reproducible across batches."""

from __future__ import annotations

import math

import pytest
import torch

from engine.core.sampler import Sampler
from scheduler.sampling import SamplingParams

V = 40
EOS = 1


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 3


def _reference(row: list[float], p: SamplingParams, output: list[int], prompt: list[int]) -> list[float]:
    """The definitions of scheduler/sampling.py, one token at a time."""
    row = list(row)
    for t in range(V):
        n = output.count(t)
        if (n or t in prompt) and p.repetition_penalty != 1:
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        row[t] -= p.frequency_penalty * n + p.presence_penalty * (1 if n else 0)
    for t, b in p.logit_bias:
        row[t] += b
    if len(output) < p.min_tokens:
        for t in [*p.stop_token_ids, *(() if p.ignore_eos else (EOS,))]:
            row[t] = -math.inf
    return row


CASES = [
    (SamplingParams(temperature=0, presence_penalty=1.5), [3, 3, 7], [2]),
    (SamplingParams(temperature=0, frequency_penalty=0.7), [3, 3, 3, 7], [2]),
    (SamplingParams(temperature=0, frequency_penalty=-2.0, presence_penalty=0.5), [5, 9, 9], []),
    (SamplingParams(temperature=0, repetition_penalty=1.8), [3, 11], [4, 5, 3]),
    (SamplingParams(temperature=0, repetition_penalty=0.5), [3, 11], [4, 5]),
    (SamplingParams(temperature=0, logit_bias={6: 100, 2: -100, 8: 1.5}), [1, 2], []),
    (SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(5, 6)), [3, 4], []),
    (SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(5,)), [3, 4, 8], []),  # reached: no mask
    (SamplingParams(temperature=0, min_tokens=2, ignore_eos=True, stop_token_ids=(5,)), [], []),
    (SamplingParams(temperature=0.8, seed=1, repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.1,
                    logit_bias={0: -3}, min_tokens=9, max_tokens=20), [0, 1, 0, 2, 0], [7, 7]),
    (SamplingParams(temperature=0), [1, 2], [3]),  # no controls: untouched
]


def test_each_control_matches_the_reference():
    logits = _logits(len(CASES))
    params = [c[0] for c in CASES]
    outputs, prompts = [c[1] for c in CASES], [c[2] for c in CASES]
    got = Sampler(eos_token_id=EOS).apply_controls(logits, params, outputs, prompts)
    for i, (p, out, prompt) in enumerate(CASES):
        want = torch.tensor(_reference(logits[i].tolist(), p, out, prompt))
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5, msg=f"case {i}: {p}")
    assert got[len(CASES) - 1].equal(logits[len(CASES) - 1])
    # min_tokens: eos and the stop tokens masked only while fewer tokens are out
    assert got[6, EOS] == got[6, 5] == got[6, 6] == -math.inf and got[7, EOS] > -math.inf
    assert got[8, EOS] > -math.inf and got[8, 5] == -math.inf


def test_greedy_follows_the_controlled_logits():
    logits = _logits(len(CASES), seed=3)
    params = [c[0] for c in CASES]
    outputs, prompts = [c[1] for c in CASES], [c[2] for c in CASES]
    ref = [torch.tensor(_reference(logits[i].tolist(), *c)).argmax().item() for i, c in enumerate(CASES)]
    out = Sampler(eos_token_id=EOS)(logits, params, [None] * len(CASES), outputs, prompts)
    assert [t for t, p in zip(out.token_ids, params) if p.greedy] == [r for r, p in zip(ref, params) if p.greedy]
    assert out.token_ids[5] == 6  # the +100 bias wins


def test_min_tokens_keeps_eos_out_until_reached():
    logits = torch.zeros(1, V)
    logits[0, EOS] = 50.0  # eos would always win
    p = SamplingParams(temperature=0, min_tokens=4, max_tokens=10)
    sampler, out = Sampler(eos_token_id=EOS), []
    for _ in range(6):
        out.append(sampler(logits, [p], [None], [list(out)], [[]]).token_ids[0])
        if out[-1] == EOS:
            break
    assert out[:4] == [out[0]] * 4 and EOS not in out[:4] and out[4] == EOS


@pytest.mark.parametrize("batch, position", [(1, 0), (4, 2), (7, 6)])
def test_seeded_rows_with_controls_ignore_the_batch(batch, position):
    p = SamplingParams(temperature=1.0, seed=5, presence_penalty=0.8, repetition_penalty=1.2, logit_bias={3: 2.0})
    base = _logits(1, seed=11)[0]
    others = torch.Generator().manual_seed(100 + batch)
    tokens: list[int] = []
    for step in range(12):
        logits = torch.randn(batch, V, generator=others) * 3
        logits[position] = base
        params = [SamplingParams(temperature=0.5, frequency_penalty=1.0)] * batch
        params[position] = p
        gens = [None] * batch
        gens[position] = torch.Generator().manual_seed(5 * 1_000_003 + step)
        outs = [[step % 5, 1] for _ in range(batch)]
        outs[position] = list(tokens)
        tokens.append(Sampler(seed=batch)(logits, params, gens, outs, [[2]] * batch).token_ids[position])
    alone: list[int] = []
    for step in range(12):
        g = torch.Generator().manual_seed(5 * 1_000_003 + step)
        alone.append(Sampler()(base[None], [p], [g], [list(alone)], [[2]]).token_ids[0])
    assert tokens == alone


@pytest.mark.parametrize("kwargs, needle", [
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {3: 101}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias")])
def test_bad_params(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kwargs)


def test_controls_need_the_history():
    with pytest.raises(ValueError, match="output_token_ids"):
        Sampler()(_logits(1), [SamplingParams(presence_penalty=1.0)], [None])
