"""The Triton kernels (engine.kernels.triton) against the plain-torch references, at small shapes.

Without CUDA they run on CPU under Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before anything
imports triton (Triton chooses the interpreter when triton.language is first imported, and transformers imports
triton during collection). With CUDA the compiled kernels run. fp32 activations and `input_precision="ieee"` (the
interpreter's bf16 `tl.dot` is wrong; fp32's default is tf32). Skipped without triton.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels.select import select_mhc_path  # noqa: E402
from engine.kernels.triton import (  # noqa: E402
    TileConfig,
    available,
    fp8_block_linear,
    mhc_gates,
    mhc_post,
    moe_grouped_gemm,
)
from engine.kernels.triton.moe import ExpertWeights, routed_experts, sort_by_expert  # noqa: E402
from engine.kernels.triton.reference import fp8_block_linear_ref, moe_grouped_gemm_ref  # noqa: E402
from engine.model.mhc import hc_post as hc_post_ref  # noqa: E402
from engine.model.mhc import mhc_gates as mhc_gates_ref  # noqa: E402
from engine.weights.formats import dequantize_fp4, quantize_fp4, quantize_fp8_block  # noqa: E402

IEEE = {"input_precision": "ieee"}
DEV = "cuda" if available("cuda") else "cpu"
if not available(DEV):
    pytest.skip("the Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton was imported (conftest.py)",
                allow_module_level=True)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    # fp32 with ieee dots: only the summation order differs
    got, want = got.cpu(), want.cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * max(1.0, want.abs().max().item()))


def _dev(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEV) for t in ts]


# ---- FP8 block-scaled linear ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_fmt", ["e8m0", "fp32"])
def test_fp8_block_linear_matches_reference(scale_fmt):
    g = torch.Generator().manual_seed(0)
    n, k = 200, 300  # neither a multiple of 128: partial scale blocks on both edges
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 1, n).unsqueeze(1)  # scales differ per row block
    q, s = quantize_fp8_block(w)
    if scale_fmt == "fp32":
        s = torch.rand(s.shape, generator=g) + 0.5  # not powers of two
    x = torch.randn(2, 3, k, generator=g)
    y = fp8_block_linear(*_dev(x, q, s), **IEEE)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    ref = fp8_block_linear_ref(x, q, s)
    _close(y, ref)
    # the reference itself is x @ dequant(W)^T: against the unquantized weight within FP8's rounding
    if scale_fmt == "e8m0":
        assert (ref - x @ w.t()).abs().max() < 0.1 * (x @ w.t()).abs().max()


def test_fp8_block_linear_takes_uint8_bytes_strided_x_and_many_rows():
    g = torch.Generator().manual_seed(1)
    q, s = quantize_fp8_block(torch.randn(64, 256, generator=g))
    x = torch.randn(256, 70, generator=g).t()  # [70, 256], non-contiguous; 70 rows: several M tiles
    y = fp8_block_linear(*_dev(x, q.view(torch.uint8), s.view(torch.uint8)), **IEEE)
    _close(y, fp8_block_linear_ref(x, q, s))
    y2 = fp8_block_linear(*_dev(x, q, s), **IEEE, tiles=TileConfig(block_m=16, block_n=16, block_k=32))
    _close(y2, y)


def test_fp8_block_linear_rejects_bad_layouts():
    q, s = quantize_fp8_block(torch.randn(130, 64))
    with pytest.raises(ValueError, match="w_scale must be"):
        fp8_block_linear(torch.randn(2, 64), q, s[:1])
    with pytest.raises(ValueError, match="x has K=32"):
        fp8_block_linear(torch.randn(2, 32), q, s)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_block_linear(torch.randn(2, 64), q.float(), s)
    with pytest.raises(ValueError, match="TileConfig.block_n must be one of"):
        TileConfig(block_n=48)


# ---- grouped MoE GEMM ------------------------------------------------------------------------------------------
def _offsets(counts: list[int], dtype=torch.int32) -> torch.Tensor:
    return torch.tensor(counts, dtype=dtype).cumsum(0).to(dtype)


@pytest.mark.parametrize("block_m", [16, 64])
def test_grouped_gemm_dense_weights_match_reference(block_m):
    g = torch.Generator().manual_seed(2)
    e, n, k = 5, 40, 48
    counts = [3, 0, 37, 1, 0]  # empty experts, one spanning several 16-row tiles
    t = sum(counts) + 6  # 6 padding rows past offsets[-1]
    w = torch.randn(e, k, n, generator=g).transpose(1, 2)  # [E, N, K] with non-contiguous strides
    x = torch.randn(t, k, generator=g)
    off = _offsets(counts, torch.int64)
    out = torch.full((t, n), float("nan"), device=DEV)
    y = moe_grouped_gemm(*_dev(x, w, off), tiles=TileConfig(block_m=block_m), out=out, **IEEE)
    assert y is out
    y = y.cpu()
    ref = moe_grouped_gemm_ref(x, w, off)
    _close(y, ref)
    assert (y[sum(counts):] == 0).all()  # padding rows zeroed, not left as they were
    start = counts[0]  # an independent check of one expert's rows
    _close(y[start + 0:start + 37], x[start:start + 37] @ w[2].t())


def test_grouped_gemm_mxfp4_matches_dequantized_reference():
    g = torch.Generator().manual_seed(3)
    e, n, k = 6, 48, 96  # K = 3 groups of 32: the kernel's K step is 32
    w = torch.randn(e, n, k, generator=g)
    packed, scale = quantize_fp4(w)
    counts = [4, 0, 9, 2, 20, 1]
    x = torch.randn(sum(counts), k, generator=g)
    off = _offsets(counts)
    y = moe_grouped_gemm(*_dev(x, packed, off), w_scale=scale.to(DEV), **IEEE)
    _close(y, moe_grouped_gemm_ref(x, packed, off, w_scale=scale))
    deq = dequantize_fp4(packed, scale, dtype=torch.float32)
    _close(y[4 + 9:4 + 9 + 2], x[13:15] @ deq[3].t())
    # other tiles (32 columns, one 32-wide scale group per K step, 32 rows): the same result
    y2 = moe_grouped_gemm(*_dev(x, packed, off), w_scale=scale.to(DEV), **IEEE,
                          tiles=TileConfig(block_m=32, block_n=32, block_k=32, num_warps=2, num_stages=2))
    _close(y2, y)
    with pytest.raises(ValueError, match="must be at least 32 and divide K=96"):
        moe_grouped_gemm(*_dev(x, packed, off), w_scale=scale.to(DEV), tiles=TileConfig(block_k=64))


@pytest.mark.parametrize("fmt", ["fp32", "mxfp4"])
def test_grouped_gemm_fused_swiglu_and_row_weight(fmt):
    g = torch.Generator().manual_seed(4)
    e, n, k = 4, 32, 128
    w1, w3 = torch.randn(e, n, k, generator=g), torch.randn(e, n, k, generator=g)
    counts = [5, 17, 0, 2]
    t = sum(counts) + 3
    x = torch.randn(t, k, generator=g) * 0.3
    rw = torch.rand(t, generator=g)
    off = _offsets(counts)
    kw: dict = {"swiglu_limit": 2.0, "row_weight": rw}
    if fmt == "mxfp4":
        (w1, s1), (w3, s3) = quantize_fp4(w1), quantize_fp4(w3)
        kw.update(w_scale=s1, w3_scale=s3)
    y = moe_grouped_gemm(*_dev(x, w1, off), w3=w3.to(DEV), **{a: v.to(DEV) if isinstance(v, torch.Tensor) else v
                                                             for a, v in kw.items()}, **IEEE).cpu()
    ref = moe_grouped_gemm_ref(x, w1, off, w3=w3, **kw)
    _close(y, ref)
    assert ref.abs().max() > 1.0 and (y[sum(counts):] == 0).all()
    # the clamp is active: without it the values differ
    unclamped = moe_grouped_gemm_ref(x, w1, off, w3=w3, **{**kw, "swiglu_limit": None})
    assert (unclamped - ref).abs().max() > 0.1


def test_grouped_gemm_rejects_bad_layouts():
    w = torch.randn(3, 16, 64)
    packed, scale = quantize_fp4(w)
    x, off = torch.randn(4, 64), _offsets([1, 1, 2])
    w, packed, scale, x, off = (t.to(DEV) for t in (w, packed, scale, x, off))  # the shape checks, not the device's
    with pytest.raises(ValueError, match="3 experts"):
        moe_grouped_gemm(x, w, off[:2])
    with pytest.raises(ValueError, match=r"scale must be \[E, N, K/32\]"):
        moe_grouped_gemm(x, packed, off, w_scale=scale[:, :, :1])
    with pytest.raises(ValueError, match="packed MXFP4 with w_scale"):
        moe_grouped_gemm(x, packed, off)
    with pytest.raises(ValueError, match="w3 must match w"):
        moe_grouped_gemm(x, w, off, w3=w[:, :8])
    with pytest.raises(ValueError, match="need w3"):
        moe_grouped_gemm(x, w, off, swiglu_limit=1.0)


# ---- one MoE layer's routed experts ----------------------------------------------------------------------------
def test_sort_by_expert_offsets():
    idx = torch.tensor([[2, 0], [2, 3], [0, 2]])
    order, off = sort_by_expert(idx, 5)
    assert off.tolist() == [2, 2, 5, 6, 6] and off.dtype == torch.int32
    assert idx.flatten()[order].tolist() == [0, 0, 2, 2, 2, 3]
    # -1: not on this rank, sorted after every expert's rows
    order, off = sort_by_expert(torch.tensor([[-1, 1], [0, -1]]), 2)
    assert off.tolist() == [1, 2] and order.tolist() == [2, 1, 0, 3]


@pytest.mark.parametrize("fmt", ["fp32", "mxfp4"])
def test_routed_experts_match_the_model_reference(fmt):
    """Against the engine's own routed-expert loop (engine.model.experts) on the same (dequantized) weights."""
    from engine.model.config import TINY
    from engine.model.moe import RoutedExperts

    cfg = TINY
    e, d, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    g = torch.Generator().manual_seed(5)
    w1, w3 = torch.randn(e, inter, d, generator=g) * 0.2, torch.randn(e, inter, d, generator=g) * 0.2
    w2 = torch.randn(e, d, inter, generator=g) * 0.2
    if fmt == "mxfp4":
        (w1, s1), (w3, s3), (w2, s2) = quantize_fp4(w1), quantize_fp4(w3), quantize_fp4(w2)
        weights = ExpertWeights(w1, w3, w2, s1, s3, s2)
        w1, w3, w2 = (dequantize_fp4(p, s, dtype=torch.float32) for p, s in ((w1, s1), (w3, s3), (w2, s2)))
    else:
        weights = ExpertWeights(w1, w3, w2)
    ref_mod = RoutedExperts(cfg, list(range(e)), torch.float32)
    with torch.no_grad():
        for name, t in (("w1", w1), ("w3", w3), ("w2", w2)):
            getattr(ref_mod, name).copy_(t)
    t = 9
    x = torch.randn(t, d, generator=g)
    topk_idx = torch.rand(t, e, generator=g).argsort(1)[:, :cfg.num_experts_per_tok]
    topk_w = torch.rand(t, cfg.num_experts_per_tok, generator=g)
    local = topk_idx.flatten()
    want = ref_mod._forward_loop(x, topk_w, local, torch.bincount(local, minlength=e))
    dev_weights = ExpertWeights(*(None if a is None else a.to(DEV) for a in vars(weights).values()))
    got = routed_experts(*_dev(x, topk_w, topk_idx), dev_weights, cfg.swiglu_limit, **IEEE)
    _close(got, want)
    # a rank holding experts 0..3 only: the others map to -1 and contribute nothing (the model's g2l convention)
    g2l = torch.where(torch.arange(e) < 4, torch.arange(e), -1)
    four = ExpertWeights(*(None if a is None else a[:4] for a in vars(dev_weights).values()))
    part = routed_experts(*_dev(x, topk_w, g2l[topk_idx]), four, cfg.swiglu_limit, **IEEE)
    ref_part = RoutedExperts(cfg, [0, 1, 2, 3], torch.float32)
    with torch.no_grad():
        for name, t in (("w1", w1), ("w3", w3), ("w2", w2)):
            getattr(ref_part, name).copy_(t[:4])
    local = ref_part.g2l[topk_idx].flatten()
    _close(part, ref_part._forward_loop(x, topk_w, local, torch.bincount(local[local >= 0], minlength=4)))


# ---- mHC gates (pre / post sigmoids, comb's softmax + Sinkhorn) -------------------------------------------------
def _mhc_inputs(t: int, hc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = (2 + hc) * hc
    # mixes of a few units and scales around 1: logits of either sign, comb's softmax far from uniform
    return torch.randn(t, n, generator=g) * 3, torch.randn(n, generator=g), torch.rand(3, generator=g) * 2


def _close_fp32(got: torch.Tensor, want: torch.Tensor) -> None:
    # fp32 math on values of order 1 (post up to 2): only the rounding of each op differs (1-2 ulp seen)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hc", [4, 3])  # 3: the padded lanes (HC_P = 4) must add nothing
@pytest.mark.parametrize("t", [1, 7, 33])
def test_mhc_gates_match_torch_reference(t, hc):
    mixes, base, scale = _mhc_inputs(t, hc, seed=t + hc)
    want = mhc_gates_ref(mixes, base, scale, hc, 1e-6, 20)
    got = mhc_gates(*_dev(mixes, base, scale), hc, 1e-6, 20)
    for name, a, b in zip(("pre", "post", "comb"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        _close_fp32(a, b)
    comb = got[2].cpu().double()  # Sinkhorn's output: columns sum to 1 (the last pass), rows nearly
    assert (comb.sum(-2) - 1).abs().max() < 1e-5 and (comb.sum(-1) - 1).abs().max() < 1e-3


def test_mhc_gates_strided_mixes_small_blocks_and_one_iteration():
    mixes, base, scale = _mhc_inputs(33, 4, seed=5)
    wide = torch.zeros(33, 2 * mixes.shape[1])
    wide[:, ::2] = mixes  # column stride 2
    for iters, block_t in ((20, 4), (1, 8), (3, None)):  # several programs, the last one partly past T
        want = mhc_gates_ref(mixes, base, scale.double(), 4, 1e-6, iters)
        got = mhc_gates(*_dev(wide[:, ::2], base.view(6, 4), scale.double()), 4, 1e-6, iters, block_t=block_t)
        for a, b in zip(got, want, strict=True):
            _close_fp32(a, b)
    pre, post, comb = mhc_gates(*_dev(torch.empty(0, 24), base, scale), 4, 1e-6, 20)
    assert pre.shape == post.shape == (0, 4) and comb.shape == (0, 4, 4)


def test_mhc_gates_rejects_bad_arguments():
    mixes, base, scale = _dev(*_mhc_inputs(3, 4, seed=0))
    with pytest.raises(ValueError, match=r"mixes must be float32 \[T, \(2\+hc\)\*hc\] = \[T, 24\]"):
        mhc_gates(mixes[:, :20], base, scale, 4, 1e-6, 20)
    with pytest.raises(ValueError, match="mixes must be float32"):
        mhc_gates(mixes.double(), base, scale, 4, 1e-6, 20)
    with pytest.raises(ValueError, match="scale 3"):
        mhc_gates(mixes, base, scale[:2], 4, 1e-6, 20)
    with pytest.raises(ValueError, match="sinkhorn_iters must be at least 1"):
        mhc_gates(mixes, base, scale, 4, 1e-6, 0)
    with pytest.raises(ValueError, match="block_t must be a power of two"):
        mhc_gates(mixes, base, scale, 4, 1e-6, 20, block_t=3)


def test_hc_pre_and_hc_post_through_the_kernels_equal_the_torch_path(monkeypatch):
    """hc_pre / hc_post with the kernels (forced here: select_mhc_path picks them on CUDA only) against their
    torch paths; with autograd on, both keep the torch path (the kernels have no backward)."""
    import engine.model.mhc as mhc

    g = torch.Generator().manual_seed(3)
    t, hc, d = 7, 4, 32
    h = torch.randn(t, hc, d, generator=g)
    fn = torch.randn((2 + hc) * hc, hc * d, generator=g) * 0.05
    base, scale = torch.randn((2 + hc) * hc, generator=g), torch.rand(3, generator=g)
    out = torch.randn(t, d, generator=g)
    assert select_mhc_path("cpu") != "triton" and select_mhc_path("cuda", grad=True) == "torch"
    monkeypatch.setattr(mhc, "select_mhc_path", lambda device, grad=False: "torch")
    with torch.no_grad():  # the torch paths (the references)
        want = mhc.hc_pre(h, fn, base, scale, 1e-6, 1e-6, 20)
        want_new = mhc.hc_post(h, out, want[1], want[2])
    calls = []
    monkeypatch.setattr(mhc, "select_mhc_path", lambda device, grad=False: calls.append(grad) or
                        ("torch" if grad else "triton"))
    with torch.no_grad():
        got = mhc.hc_pre(*_dev(h, fn, base, scale), 1e-6, 1e-6, 20)
        for a, b in zip(got, want, strict=True):
            _close_fp32(a, b)
        _close_fp32(mhc.hc_post(*_dev(h, out), got[1], got[2]), want_new)
    fn.requires_grad_(True)
    y, post, comb = mhc.hc_pre(*_dev(h, fn, base, scale), 1e-6, 1e-6, 20)
    new = mhc.hc_post(*_dev(h), y, post, comb)
    # every choice without autograd asked grad=False, every one with it grad=True (hc_pre and hc_post each ask
    # once, plus once more for the CPU decode-size check)
    assert calls == sorted(calls) and calls.count(False) >= 2 and calls.count(True) >= 2 and new.requires_grad


def _post_inputs(t: int, hc: int, d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, hc, d, generator=g).to(dtype)
    out = torch.randn(t, d, generator=g).to(dtype)
    post = torch.rand(t, hc, generator=g) * 2
    comb = torch.softmax(torch.randn(t, hc, hc, generator=g), -1)
    return h, out, post, comb


@pytest.mark.parametrize("hc", [4, 3])
@pytest.mark.parametrize("t,d,block_d", [(1, 32, None), (7, 100, 32), (33, 64, None)])  # 100: a partial D block
def test_mhc_post_matches_hc_post_reference(t, d, block_d, hc):
    h, out, post, comb = _post_inputs(t, hc, d, torch.float32, seed=t + d)
    want = hc_post_ref(h, out, post, comb)  # on CPU: the torch ops
    got = mhc_post(*_dev(h, out, post, comb), block_d=block_d)
    assert got.shape == (t, hc, d) and got.dtype == torch.float32
    _close_fp32(got, want)
    # any strides: h streams-last, out transposed
    hs = h.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    os_ = out.t().contiguous().t()
    _close_fp32(mhc_post(*_dev(hs, os_, post, comb), block_d=block_d), want)


@pytest.mark.skipif(DEV == "cpu", reason="the interpreter runs fp32 only")
def test_mhc_post_bf16_within_one_rounding():
    h, out, post, comb = _post_inputs(9, 4, 512, torch.bfloat16, seed=0)
    exact = post.double()[..., None] * out.double()[:, None] + comb.double().transpose(-1, -2) @ h.double()
    got = mhc_post(*_dev(h, out, post, comb)).cpu().double()
    assert ((got - exact).abs() <= 2 ** -8 * exact.abs() + 1e-5).all()  # fp32 math, one bf16 rounding


def test_mhc_post_rejects_bad_arguments():
    h, out, post, comb = _dev(*_post_inputs(3, 4, 16, torch.float32, seed=0))
    with pytest.raises(ValueError, match="out must be"):
        mhc_post(h, out[:, :8], post, comb)
    with pytest.raises(ValueError, match="in h's dtype"):
        mhc_post(h, out.double(), post, comb)
    with pytest.raises(ValueError, match="post and comb must be float32"):
        mhc_post(h, out, post.double(), comb)
    with pytest.raises(ValueError, match="block_d must be a power of two"):
        mhc_post(h, out, post, comb, block_d=24)
