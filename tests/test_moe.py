"""MoE: the batched expert path equals the per-expert reference loop; the router follows §4.1."""

from __future__ import annotations

import torch

from engine.config import TINY, get_preset
from engine.moe import Gate, RoutedExperts


def _experts(cfg, local):
    m = RoutedExperts(cfg, local, torch.float32)
    g = torch.Generator().manual_seed(0)
    for p in (m.w1, m.w2, m.w3):
        p.data.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return m


def test_bmm_path_equals_loop():
    cfg = get_preset("small")
    m = _experts(cfg, list(range(cfg.n_routed_experts)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, cfg.hidden_size, generator=g)
    w = torch.rand(32, 6, generator=g)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:6] for _ in range(32)])
    local = m.g2l[idx].flatten()
    counts = torch.bincount(local, minlength=cfg.n_routed_experts)
    ref = m._forward_loop(x, w, local, counts)
    got = m._forward_bmm(x, w, local, counts)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert torch.allclose(m(x, w, idx), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_experts_not_on_this_rank_contribute_nothing():
    cfg = TINY
    full = _experts(cfg, list(range(cfg.n_routed_experts)))
    part = RoutedExperts(cfg, [1, 4], torch.float32)
    part.w1.data.copy_(full.w1[[1, 4]])
    part.w2.data.copy_(full.w2[[1, 4]])
    part.w3.data.copy_(full.w3[[1, 4]])
    x = torch.randn(5, cfg.hidden_size)
    idx = torch.tensor([[1, 4], [0, 1], [2, 3], [4, 7], [1, 4]])
    w = torch.rand(5, 2)
    only = torch.where(torch.isin(idx, torch.tensor([1, 4])), w, torch.zeros_like(w))
    assert torch.allclose(part(x, w, idx), full(x, only, idx), atol=1e-6)


def test_router_bias_selects_but_does_not_weigh():
    cfg = get_preset("small")
    gate = Gate(cfg, layer_id=cfg.num_hash_layers)
    g = torch.Generator().manual_seed(2)
    gate.weight.data.copy_(torch.randn(gate.weight.shape, generator=g) / cfg.hidden_size**0.5)
    x = torch.randn(4, cfg.hidden_size, generator=g)
    gate.bias.data.zero_()
    gate.bias.data[7] = 100.0  # forces expert 7 into every selection
    w, idx = gate(x, torch.zeros(4, dtype=torch.long))
    assert (idx == 7).any(dim=1).all()
    s = torch.sqrt(torch.nn.functional.softplus(x @ gate.weight.T))
    expect = s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(w, expect, atol=1e-6)


def test_hash_layer_routes_by_token_id():
    gate = Gate(TINY, layer_id=0)
    gate.tid2eid.copy_(torch.randint(0, TINY.n_routed_experts, (TINY.vocab_size, TINY.num_experts_per_tok)))
    ids = torch.tensor([3, 99, 3])
    _, idx = gate(torch.randn(3, TINY.hidden_size), ids)
    assert torch.equal(idx, gate.tid2eid[ids])
