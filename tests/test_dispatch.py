"""comm.dispatch: every backend equals the local reference on 2 and 4 gloo ranks; stats add up."""

from __future__ import annotations

import pytest
import torch

from comm.dispatch import Dispatcher
from comm.launch import run_ranks
from comm.placement import Placement

E, D, K = 8, 16, 3
BACKENDS = ("sync", "tbo", "wave")  # the count-exchange backends; ll: tests/test_dispatch_ll.py


def _weights() -> torch.Tensor:
    return torch.randn(E, D, D, generator=torch.Generator().manual_seed(7)) / D**0.5


def _batch(rank: int, t: int, seed: int):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randn(t, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]) if t else torch.zeros(0, K).long()
    w = torch.rand(t, K, generator=g)
    return x, idx, w


def _reference(x, idx, w, weights, shared):
    y = torch.zeros_like(x)
    for j in range(idx.shape[1]):
        y += w[:, j:j + 1] * torch.einsum("td,tdo->to", x, weights[idx[:, j]])
    return y + (x @ shared if shared is not None else 0)


def _cases(world: int):
    # (tokens per rank, placement kwargs)
    yield [5, 3, 0, 7][:world], {}
    yield [0] * (world - 1) + [9], {"redundant": world}
    yield [4] * world, {"redundant": 2 * world, "policy": "contiguous"}
    yield [0] * world, {}


def _rank_fn(rank: int, world: int) -> list:
    weights = _weights()
    shared = torch.randn(D, D, generator=torch.Generator().manual_seed(3)) / D**0.5
    errors = []
    for ci, (tokens, pkw) in enumerate(_cases(world)):
        placement = Placement.static(num_layers=2, num_experts=E, ep_size=world, **pkw)
        local = placement.local_logical(1, rank)
        seen = []

        def expert_fn(xr, slot, wr, local=local, seen=seen):
            seen.append(slot)
            le = torch.tensor(local)[slot]
            return wr[:, None] * torch.einsum("nd,ndo->no", xr, weights[le])

        x, idx, w = _batch(rank, tokens[rank], ci)
        for backend in BACKENDS:
            for use_shared in (False, True):
                d = Dispatcher(placement, rank, world, backend=backend, num_waves=2)
                y = d(1, x, idx, w, expert_fn, (lambda v: v @ shared) if use_shared else None)
                ref = _reference(x, idx, w, weights, shared if use_shared else None)
                err = (y - ref).abs().max().item() if y.numel() else 0.0
                errors.append((ci, backend, use_shared, tuple(y.shape) == tuple(x.shape), err,
                               d.last_stats.as_dict()))
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_backends_match_reference(world):
    out = run_ranks(_rank_fn, world, timeout_s=120)
    n = len(out[0])
    for i in range(n):
        ci, backend, shared, shape_ok, _, _ = out[0][i]
        for r in range(world):
            assert out[r][i][3], (r, ci, backend)
            assert out[r][i][4] < 1e-5, (r, ci, backend, shared, out[r][i][4])
        stats = [out[r][i][5] for r in range(world)]
        assert sum(s["bytes_sent"] for s in stats) == sum(s["bytes_recv"] for s in stats)
        assert sum(s["bytes_sent_remote"] for s in stats) == sum(s["bytes_recv_remote"] for s in stats)
        tokens = [s["tokens"] for s in stats]
        assert sum(s["assignments_sent"] for s in stats) == K * sum(tokens)
        assert sum(s["assignments_recv"] for s in stats) == K * sum(tokens)
        # one count exchange + one all-to-all each way per chunk
        chunks = {"sync": 1, "tbo": 2, "wave": 2}[backend]
        assert all(s["collectives"] == 1 + 2 * chunks for s in stats)
        row = D * 4
        expect = K * sum(tokens) * (2 * row + 8) + world * world * 8 * chunks
        assert sum(s["bytes_sent"] for s in stats) == expect


def test_bad_arguments():
    p = Placement.static(num_layers=1, num_experts=E, ep_size=1)
    with pytest.raises(ValueError, match="backend 'nccl-magic'"):
        Dispatcher(p, 0, 1, backend="nccl-magic")
    with pytest.raises(RuntimeError, match="process group"):
        Dispatcher(Placement.static(num_layers=1, num_experts=E, ep_size=2), 0, 2)
    with pytest.raises(ValueError, match="num_waves"):
        Dispatcher(p, 0, 1, backend="wave", num_waves=0)
    d = Dispatcher(p, 0, 1)
    x, idx, w = _batch(0, 4, 0)
    with pytest.raises(ValueError, match="outside"):
        d(0, x, idx + E, w, lambda a, b, c: a)
    with pytest.raises(ValueError, match="shapes"):
        d(0, x, idx[:2], w, lambda a, b, c: a)


def test_single_rank_loopback_equals_reference():
    p = Placement.static(num_layers=1, num_experts=E, ep_size=1, redundant=3)
    weights = _weights()
    local = p.local_logical(0, 0)
    x, idx, w = _batch(0, 6, 1)
    for backend in BACKENDS:
        d = Dispatcher(p, 0, 1, backend=backend)
        y = d(0, x, idx, w,
              lambda xr, s, wr: wr[:, None] * torch.einsum("nd,ndo->no", xr, weights[torch.tensor(local)[s]]))
        assert (y - _reference(x, idx, w, weights, None)).abs().max().item() < 1e-5
        assert d.last_stats.bytes_sent_remote == 0 and d.totals.calls == 1
    # the staged form (model-level tbo drives two of these interleaved)
    d = Dispatcher(p, 0, 1, backend="tbo")
    fls = [d.begin(0, x[:2], idx[:2], w[:2]), d.begin(0, x[2:], idx[2:], w[2:], token_offset=2)]
    fn = lambda xr, s, wr: wr[:, None] * torch.einsum("nd,ndo->no", xr, weights[torch.tensor(local)[s]])  # noqa: E731
    for fl in fls:
        fl.run_experts(fn)
    y = torch.cat([d.finish(fl) for fl in fls])
    assert (y - _reference(x, idx, w, weights, None)).abs().max().item() < 1e-5
    assert d.totals.calls == 2 and d.totals.tokens == 6
    with pytest.raises(RuntimeError, match="stage 'done'"):
        fls[0].finish()


def test_bfloat16_rows_survive_the_byte_packing():
    p = Placement.static(num_layers=1, num_experts=E, ep_size=1, redundant=1)
    weights = _weights()
    local = torch.tensor(p.local_logical(0, 0))
    x, idx, w = _batch(0, 5, 2)
    ref = _reference(x, idx, w, weights, None)
    for backend in BACKENDS:
        d = Dispatcher(p, 0, 1, backend=backend, num_waves=3)
        y = d(0, x.bfloat16(), idx, w,
              lambda xr, s, wr: (wr[:, None] * torch.einsum("nd,ndo->no", xr.float(), weights[local[s]])).bfloat16())
        assert y.dtype == torch.bfloat16
        assert (y.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
        chunks = {"sync": 1, "tbo": 2, "wave": 3}[backend]
        assert d.last_stats.bytes_sent == 5 * K * (2 * D * 2 + 8) + 8 * chunks  # bf16 rows + meta + counts
