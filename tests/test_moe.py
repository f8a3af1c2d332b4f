"""MoE: the sorted expert paths (torch mm and the C kernel) equal the per-expert reference loop; the router
follows §4.1."""

from __future__ import annotations

import pytest
import torch

import engine.model.experts
from engine.kernels.cpu import moe_mlp_available
from engine.model.config import TINY, get_preset
from engine.model.moe import Expert, Gate, RoutedExperts, swiglu


@pytest.fixture(autouse=True)
def _one_thread():
    """The reference loop makes hundreds of small MKL calls; on a shared 2-core box 2 OpenMP threads make each
    one wait for a time slice (seconds per test). One thread keeps these correctness tests fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():  # as the engine runs (inference mode); under autograd the reference loop runs
        yield
    torch.set_num_threads(before)


def _experts(cfg, local):
    m = RoutedExperts(cfg, local, torch.float32)
    g = torch.Generator().manual_seed(0)
    for p in (m.w1, m.w2, m.w3):
        p.data.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return m


def _routing(n_experts: int, t: int, k: int, g: torch.Generator, experts: int | None = None, hot: int | None = None):
    """Top-k of `experts` (default all) random experts per token; `hot`: that expert in every token's top-k."""
    pool = experts or n_experts
    idx = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(t)])
    if hot is not None:
        has = (idx == hot).any(dim=1)
        idx[~has, 0] = hot
    return torch.rand(t, k, generator=g), idx


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return (got.float() - ref.float()).abs().max().item() <= 1e-5 * ref.float().abs().max().item()


def _kernel(monkeypatch, on: bool) -> list[int]:
    """Kernel availability on/off for engine.model.experts; returns a list that grows by one per kernel call."""
    calls: list[int] = []
    if on:
        if not moe_mlp_available():
            pytest.skip("the CPU moe_mlp kernel did not build here")
        real = engine.model.experts.moe_mlp

        def counted(x, offsets, *rest):
            calls.append(x.shape[0])
            return real(x, offsets, *rest)
        monkeypatch.setattr(engine.model.experts, "moe_mlp", counted)
    else:
        monkeypatch.setattr(engine.model.experts, "moe_mlp_available", lambda: False)
    return calls


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("tokens,hot,pool", [(32, None, None), (512, None, None), (96, 5, None), (40, None, 9)],
                         ids=["decode", "prefill", "one-hot-expert", "empty-experts"])
def test_grouped_equals_loop(monkeypatch, kernel, tokens, hot, pool):
    cfg = get_preset("small")
    m = _experts(cfg, list(range(cfg.n_routed_experts)))
    calls = _kernel(monkeypatch, kernel)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cfg.hidden_size, generator=g)
    w, idx = _routing(cfg.n_routed_experts, tokens, cfg.num_experts_per_tok, g, pool, hot)
    local = m.g2l[idx].flatten()
    counts = torch.bincount(local, minlength=cfg.n_routed_experts)
    ref = m._forward_loop(x, w, local, counts)
    padded = []
    real_padded = m._experts_padded
    monkeypatch.setattr(m, "_experts_padded", lambda *a: padded.append(1) or real_padded(*a))
    assert _close(m(x, w, idx), ref)
    small = int(((counts > 0) & (counts < m.KERNEL_MAX_ROWS)).sum())
    if kernel:  # the kernel ran exactly the slots below the crossover, all their rows in one call
        assert calls == ([int(counts[counts < m.KERNEL_MAX_ROWS].sum())] if small else [])
    # without the kernel, decode-size counts in (nearly) every slot take the padded bmm
    assert padded == ([1] if not kernel and tokens == 32 else [])
    if tokens == 512:
        assert small == 0 and int(counts.min()) >= m.KERNEL_MAX_ROWS  # prefill-size: the torch mm path
    if hot is not None:
        assert small > 0 and int(counts[hot]) == tokens  # one call mixes both paths
    if pool is not None:
        assert int((counts == 0).sum()) == cfg.n_routed_experts - pool


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("tokens,hot", [(160, 2), (32, None)], ids=["mixed", "decode"])
def test_grouped_with_limit_active(monkeypatch, kernel, tokens, hot):
    cfg = get_preset("small")
    m = _experts(cfg, list(range(cfg.n_routed_experts)))
    m.limit = 0.5
    _kernel(monkeypatch, kernel)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, cfg.hidden_size, generator=g)
    w, idx = _routing(cfg.n_routed_experts, tokens, cfg.num_experts_per_tok, g, hot=hot)
    h = x @ m.w1[2].detach().T
    assert (h > m.limit).float().mean() > 0.2 and ((x @ m.w3[2].detach().T).abs() > m.limit).float().mean() > 0.2
    local = m.g2l[idx].flatten()
    ref = m._forward_loop(x, w, local, torch.bincount(local, minlength=cfg.n_routed_experts))
    assert _close(m(x, w, idx), ref)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_forward_slots_replicated_slots(monkeypatch, kernel):
    cfg = get_preset("small")
    full = _experts(cfg, list(range(cfg.n_routed_experts)))
    local = [3, 7, 3, 11, 7, 3]  # replicas of experts 3 and 7 in several slots of this rank
    m = RoutedExperts(cfg, local, torch.float32)
    for name in ("w1", "w2", "w3"):
        getattr(m, name).data.copy_(getattr(full, name).detach()[local])
    calls = _kernel(monkeypatch, kernel)
    g = torch.Generator().manual_seed(4)
    big = m.KERNEL_MAX_ROWS + 9
    per_slot = torch.tensor([3, 1, big, 7, 0, big + 5])  # slot 4 gets no rows; 2 and 5 above the crossover
    slot = torch.repeat_interleave(torch.arange(len(local)), per_slot)
    slot = slot[torch.randperm(slot.numel(), generator=g)]
    rows = slot.numel()
    x = torch.randn(rows, cfg.hidden_size, generator=g)
    weight = torch.rand(rows, generator=g)
    got = m.forward_slots(x, slot, weight)
    counts = torch.bincount(slot, minlength=len(local))
    assert _close(got, m._forward_loop(x, weight[:, None], slot, counts))
    # against the unreplicated experts, row by row: slot s computes logical expert local[s]
    expect = full._forward_loop(x, weight[:, None], torch.tensor(local)[slot], torch.bincount(
        torch.tensor(local)[slot], minlength=cfg.n_routed_experts))
    assert _close(got, expect)
    assert m.forward_slots(x[:0], slot[:0], weight[:0]).shape == (0, cfg.hidden_size)
    if kernel:
        assert calls == [11]  # slots 0, 1, 3 run in the kernel, 2 and 5 in torch


def test_bf16_weights_use_torch_path_equal_loop(monkeypatch):
    cfg = get_preset("small")
    m = _experts(cfg, list(range(cfg.n_routed_experts))).to(torch.bfloat16)
    calls = _kernel(monkeypatch, True) if moe_mlp_available() else []
    g = torch.Generator().manual_seed(5)
    for tokens in (32, 256):
        x = torch.randn(tokens, cfg.hidden_size, generator=g)
        w, idx = _routing(cfg.n_routed_experts, tokens, cfg.num_experts_per_tok, g)
        local = m.g2l[idx].flatten()
        ref = m._forward_loop(x, w, local, torch.bincount(local, minlength=cfg.n_routed_experts))
        got = m(x, w, idx)
        assert got.dtype == torch.float32 and _close(got, ref)
    assert calls == []  # the kernel takes fp32 weights only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_expert_equals_plain_swiglu(dtype):
    e = Expert(64, 96, 0.5, dtype)
    g = torch.Generator().manual_seed(6)
    for p in e.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) / 8)
    x = torch.randn(20, 64, generator=g).to(dtype)
    w1, w3, w2 = (lin.weight.detach() for lin in (e.w1, e.w3, e.w2))
    gx, ux = (x @ w1.T).float(), (x @ w3.T).float()
    assert (gx > 0.5).any() and (ux.abs() > 0.5).any()  # the limit clamps
    ref = (swiglu(gx, ux, 0.5).to(dtype) @ w2.T).float()
    x0 = x.clone()
    assert _close(e(x), ref)
    assert torch.equal(x, x0)  # the in-place SwiGLU works on the projections, never on the input


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


def test_autograd_reaches_the_expert_weights():
    """Under autograd the routed experts run the reference loop: gradients flow to w1/w2/w3 and to x, equal
    to the gradients of the plain formula."""
    cfg = TINY
    m = _experts(cfg, list(range(cfg.n_routed_experts)))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, cfg.hidden_size, generator=g, requires_grad=True)
    w = torch.rand(5, cfg.num_experts_per_tok, generator=g)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok]
                       for _ in range(5)])
    with torch.enable_grad():
        m(x, w, idx).square().sum().backward()
    assert m.w1.grad is not None and m.w2.grad is not None and m.w3.grad is not None and x.grad is not None
    grads = [p.grad.clone() for p in (m.w1, m.w2, m.w3)] + [x.grad.clone()]
    for p in (m.w1, m.w2, m.w3):
        p.grad = None
    x.grad = None
    with torch.enable_grad():
        ref = torch.zeros(5, cfg.hidden_size)
        for t in range(5):
            for j, e in enumerate(idx[t].tolist()):
                a = swiglu(m.w1[e] @ x[t], m.w3[e] @ x[t], cfg.swiglu_limit) * w[t, j]
                ref = ref.index_add(0, torch.tensor([t]), (m.w2[e] @ a)[None])
        ref.square().sum().backward()
    for got, want in zip(grads, [m.w1.grad, m.w2.grad, m.w3.grad, x.grad], strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
