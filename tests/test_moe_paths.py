"""The one batched routed-expert path (RoutedExperts.run_assigned -> run_sorted) equals the plain reference
(`_forward_loop`) on every path the table can pick on CPU, for dense, MXFP4 and FP8 experts, with empty slots,
slots over KERNEL_MAX_ROWS rows, assignments not held here and (forward_slots) replicated slots; the sync-free
paths read nothing on the host."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine.model.experts
from engine.kernels.cpu import moe_mlp_available
from engine.kernels.select import KERNEL_MAX_ROWS
from engine.model.config import get_preset
from engine.model.experts import RoutedExperts
from engine.model.weight_format import WeightFormats, building
from engine.weights.formats import quantize_fp4, quantize_fp8_block

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.bincount.default,
              aten.masked_select.default, aten.repeat_interleave.Tensor, aten._unique2.default}
SYNC_FREE_PATHS = ("kernel", "grouped_mm", "padded")
HOST_PATHS = ("kernel", "kernel+sorted", "grouped_mm", "padded", "sorted")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(before)


def _build(fmt: str, local: list[int], seed: int = 0) -> RoutedExperts:
    """`small`-preset routed experts holding `local`, random weights in `fmt` (same logical expert -> same weights)."""
    cfg = get_preset("small")
    with building(WeightFormats(experts=fmt)):
        m = RoutedExperts(cfg, local, torch.float32)
    for name in ("w1", "w3", "w2"):
        p = getattr(m, name)
        rows, k = (p.shape[1], p.shape[2] * (2 if fmt == "fp4" else 1))
        for s, e in enumerate(local):
            w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed * 1000 + e)) / k ** 0.5
            if fmt == "dense":
                p[s].copy_(w)
                continue
            q, sc = quantize_fp4(w) if fmt == "fp4" else quantize_fp8_block(w)
            p[s].copy_(q)
            getattr(m, f"{name}_scale")[s].copy_(sc.to(getattr(m, f"{name}_scale").dtype))
    return m


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return (got.float() - ref.float()).abs().max().item() <= 1e-5 * ref.float().abs().max().item()


def _force(monkeypatch, path: str) -> list[str]:
    """Make run_sorted take `path`; returns the paths the table would have picked, one per call."""
    picked: list[str] = []
    real = engine.model.experts.select_expert_path

    def forced(*args, **kwargs):
        picked.append(real(*args, **kwargs))
        return path
    monkeypatch.setattr(engine.model.experts, "select_expert_path", forced)
    return picked


class _HostReads(TorchDispatchMode):
    """Records ops that read device data on the host or have a data-dependent shape; `tolist` is patched too
    (it reads without dispatching)."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self.bad: list[str] = []
        real = torch.Tensor.tolist

        def tolist(t):
            self.bad.append("tolist")
            return real(t)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.bad.append(str(func))
        return func(*args, **(kwargs or {}))


def _needs(path: str, sync_free: bool) -> None:
    if path.startswith("kernel") and not moe_mlp_available():
        pytest.skip("the CPU moe_mlp kernel did not build here")
    if path == "kernel+sorted" and sync_free:
        pytest.skip("kernel+sorted reads the counts on the host")
    if path == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm here")


def _paths():
    return [(p, False) for p in HOST_PATHS] + [(p, True) for p in SYNC_FREE_PATHS]


@pytest.mark.parametrize("fmt", ["dense", "fp4", "fp8"])
@pytest.mark.parametrize("path,sync_free", _paths(), ids=[f"{p}-{'syncfree' if s else 'host'}" for p, s in _paths()])
def test_forward_equals_loop_on_every_path(monkeypatch, fmt, path, sync_free):
    """8 of 32 experts held here (the rest map to -1); expert 2 in every token (over KERNEL_MAX_ROWS rows),
    experts 5 and 6 in none."""
    _needs(path, sync_free)
    m = _build(fmt, list(range(8)))
    cfg = get_preset("small")
    g = torch.Generator().manual_seed(1)
    t, k = KERNEL_MAX_ROWS + 8, cfg.num_experts_per_tok
    pool = torch.tensor([e for e in range(cfg.n_routed_experts) if e not in (2, 5, 6)])
    idx = torch.stack([torch.cat([torch.tensor([2]), pool[torch.randperm(pool.numel(), generator=g)[:k - 1]]])
                       for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    x = torch.randn(t, cfg.hidden_size, generator=g)
    local = m.g2l[idx].flatten()
    counts = torch.bincount(local[local >= 0], minlength=8)
    assert counts[2] == t > KERNEL_MAX_ROWS and counts[5] == counts[6] == 0 and (local < 0).any()
    ref = m._forward_loop(x, w, local, counts)
    picked = _force(monkeypatch, path)
    if sync_free:
        with _HostReads(monkeypatch) as rec:
            got = m(x, w, idx, sync_free=True)
        assert rec.bad == []
        assert picked and all(p in SYNC_FREE_PATHS for p in picked)  # the table picks a sync-free path
    else:
        got = m(x, w, idx)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert _close(got, ref)


@pytest.mark.parametrize("fmt", ["dense", "fp4", "fp8"])
@pytest.mark.parametrize("path,sync_free", _paths(), ids=[f"{p}-{'syncfree' if s else 'host'}" for p, s in _paths()])
def test_forward_slots_replicated_equals_loop_on_every_path(monkeypatch, fmt, path, sync_free):
    """EP rows for replicated slots: slot 4 empty, slots 2 and 5 over KERNEL_MAX_ROWS rows; against the
    replicated module's reference and the unreplicated experts' reference."""
    _needs(path, sync_free)
    local = [3, 7, 3, 11, 7, 3]
    m = _build(fmt, local)
    full = _build(fmt, [3, 7, 11])
    g = torch.Generator().manual_seed(4)
    big = KERNEL_MAX_ROWS + 9
    per_slot = torch.tensor([3, 1, big, 7, 0, big + 5])
    slot = torch.repeat_interleave(torch.arange(len(local)), per_slot)
    slot = slot[torch.randperm(slot.numel(), generator=g)]
    x = torch.randn(slot.numel(), m.w2.shape[1], generator=g)
    weight = torch.rand(slot.numel(), generator=g)
    ref = m._forward_loop(x, weight[:, None], slot, torch.bincount(slot, minlength=len(local)))
    logical = torch.tensor([0, 1, 0, 2, 1, 0])[slot]  # slot -> its expert's place in `full`
    ref_full = full._forward_loop(x, weight[:, None], logical, torch.bincount(logical, minlength=3))
    _force(monkeypatch, path)
    if sync_free:
        with _HostReads(monkeypatch) as rec:
            got = m.forward_slots(x, slot, weight, sync_free=True)
        assert rec.bad == []
    else:
        got = m.forward_slots(x, slot, weight)
    assert _close(got, ref) and _close(got, ref_full)
    assert m.forward_slots(x[:0], slot[:0], weight[:0], sync_free=sync_free).shape == (0, x.shape[1])


def test_host_reads_are_seen(monkeypatch):
    """The host-read check of these tests fails on the host-sync paths (it can fail)."""
    m = _build("dense", list(range(8)))
    t = KERNEL_MAX_ROWS  # from KERNEL_MAX_ROWS tokens on, the assignments are sorted and the counts read
    x = torch.randn(t, m.w2.shape[1])
    idx = torch.tensor([[0, 1, 2, 3, 4, 5]] * t)
    with _HostReads(monkeypatch) as rec:
        m(x, torch.rand(t, 6), idx)
    assert "tolist" in rec.bad


def test_path_table_sync_free():
    """Counts not on the host (max_rows None): only paths that read the offsets on the device."""
    from engine.kernels import select

    f32 = torch.float32
    assert select.select_expert_path("cpu", "dense", f32, None, None, 32, cpu_kernel=True) == "kernel"
    assert select.select_expert_path("cpu", "fp4", f32, 40, 30, 32, cpu_kernel=True) == "kernel+sorted"
    # sync-free with slots averaging KERNEL_MAX_ROWS rows or more: MKL's grouped GEMM for dense weights
    big = dict(cpu_kernel=True, grouped_mm=True, rows=KERNEL_MAX_ROWS * 32)
    assert select.select_expert_path("cpu", "dense", f32, None, None, 32, **big) == "grouped_mm"
    assert select.select_expert_path("cpu", "fp4", f32, None, None, 32, **big) == "kernel"
    assert select.select_expert_path("cpu", "dense", f32, None, None, 32, **{**big, "rows": 6}) == "kernel"
    assert select.select_expert_path("cpu", "dense", f32, None, None, 32, cpu_kernel=False, grouped_mm=True) \
        == "grouped_mm"
    assert select.select_expert_path("cuda", "fp8", torch.bfloat16, None, None, 32, cpu_kernel=False) == "padded"
    assert select.select_expert_path("cpu", "fp8", f32, 40, 30, 32, cpu_kernel=False, grouped_mm=True) == "sorted"


@pytest.mark.parametrize("fmt", ["dense", "fp4", "fp8"])
@pytest.mark.parametrize("tokens", [1, 5, KERNEL_MAX_ROWS - 1])
def test_decode_sizes_take_one_topk_kernel_call(monkeypatch, fmt, tokens):
    """Under KERNEL_MAX_ROWS tokens the assignments go to the C kernel unsorted ("kernel_topk": grouped by slot
    in C): equal to the reference and to the sorted start, with assignments not held here, a token naming one
    slot twice, and nothing read on the host; forward_slots (k = 1) likewise."""
    if not moe_mlp_available():
        pytest.skip("the CPU moe_mlp kernel did not build here")
    from engine.kernels import select

    m = _build(fmt, list(range(8)))
    cfg = get_preset("small")
    g = torch.Generator().manual_seed(tokens)
    k = cfg.num_experts_per_tok
    idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:k] for _ in range(tokens)])
    idx[0, 1] = idx[0, 0] = 3  # one token names expert 3 twice (its weight counts twice, as in the reference)
    w = torch.rand(tokens, k, generator=g)
    x = torch.randn(tokens, cfg.hidden_size, generator=g)
    local = m.g2l[idx].flatten()
    assert (local < 0).any()
    ref = m._forward_loop(x, w, local, torch.bincount(local[local >= 0], minlength=8))
    calls = []
    real = select.select_assigned_path
    monkeypatch.setattr(engine.model.experts, "select_assigned_path",
                        lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1])
    with _HostReads(monkeypatch) as rec:
        got = m(x, w, idx, sync_free=True)
    assert rec.bad == [] and calls == ["kernel_topk"]
    assert got.dtype == x.dtype and got.shape == x.shape and _close(got, ref)
    monkeypatch.setattr(engine.model.experts, "select_assigned_path", lambda *a, **kw: "sorted")
    assert _close(got, m(x, w, idx))
    monkeypatch.setattr(engine.model.experts, "select_assigned_path", real)
    slot = local.clamp(min=0)[:tokens]
    ref1 = m._forward_loop(x, w[:, :1], slot, torch.bincount(slot, minlength=8))
    assert _close(m.forward_slots(x, slot, w[:, 0]), ref1)


def test_topk_kernel_rejects_bad_input():
    from engine.kernels.cpu import quant_kernels

    if quant_kernels() is None:
        pytest.skip("the CPU kernel did not build here")
    m = _build("fp8", list(range(4)))
    x = torch.randn(2, m.w2.shape[1])
    slot, w = torch.zeros(2, 6, dtype=torch.int64), torch.rand(2, 6)
    args = (m.w1, m.w1_scale, m.w3, m.w3_scale, m.w2, m.w2_scale, "fp8", 10.0)
    with pytest.raises(ValueError, match="slot"):
        quant_kernels().moe_topk(x, slot.int(), w, *args)
    with pytest.raises(ValueError, match="route_w"):
        quant_kernels().moe_topk(x, slot, w[:, :5].contiguous(), *args)
    with pytest.raises(ValueError, match="w2"):
        quant_kernels().moe_topk(x, slot, w, m.w1, m.w1_scale, m.w3, m.w3_scale, m.w2[:, :8], m.w2_scale, "fp8", 10.0)
    dense = _build("dense", list(range(4)))
    with pytest.raises(ValueError, match="w1"):
        quant_kernels().moe_topk(x, slot, w, dense.w1.double(), None, dense.w3, None, dense.w2, None, "dense", 10.0)
