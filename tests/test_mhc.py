"""The optimised mHC / RMSNorm / RoPE functions against plain-torch copies of their defining formulas.

The reference functions below are written the obvious way (v4-model.md §2.1, §3), one tensor op per term;
the engine versions avoid temporaries and kernel launches but must agree to float rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model.layers import RMSNorm, rms_normalize, rsqrt_mean_square
from engine.model.mhc import hc_head, hc_post, hc_pre, sinkhorn
from engine.model.rope import apply_rope, rope_cos_sin

HC = 4
HC_EPS = 1e-6
NORM_EPS = 1e-6
ITERS = 20


# ---- plain references -------------------------------------------------------------------------------------

def ref_mixes(h, fn, eps):
    xf = h.flatten(1).float()
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return F.linear(xf, fn.float())


def ref_sinkhorn(comb, iters, eps):
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def ref_hc_pre(h, fn, base, scale, hc_eps, norm_eps, iters):
    t, hc = h.shape[0], h.shape[1]
    mixes = ref_mixes(h, fn, norm_eps)
    pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.float().split([hc, hc, hc * hc])
    scale = scale.float()
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb = torch.softmax(comb_w.reshape(t, hc, hc) * scale[2] + comb_b.view(hc, hc), dim=-1) + hc_eps
    comb = ref_sinkhorn(comb, iters, hc_eps)
    y = (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)
    return y, post, comb


def ref_hc_post(h, out, post, comb):
    dtype = h.dtype
    mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), h)
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + mixed


def ref_hc_head(h, fn, base, scale, hc_eps, norm_eps):
    mixes = ref_mixes(h, fn, norm_eps)
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)


def ref_rms_norm(x, weight, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (weight * xf).to(x.dtype)


def ref_rms_normalize(x, eps):
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def ref_apply_rope(x, cos, sin, inverse=False):
    r = cos.shape[-1] * 2
    extra = x.dim() - 2
    cos = cos.view(cos.shape[0], *([1] * extra), cos.shape[1])
    sin = sin.view(sin.shape[0], *([1] * extra), sin.shape[1])
    if inverse:
        sin = -sin
    rope = x[..., -r:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], rotated.to(x.dtype)], dim=-1)


# ---- helpers ----------------------------------------------------------------------------------------------

def assert_near(new: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """Same shape and dtype, and max |new - ref| <= rel * max |ref| (rel is a few float ulps, per dtype)."""
    assert new.shape == ref.shape and new.dtype == ref.dtype, (new.shape, new.dtype, ref.shape, ref.dtype)
    if ref.numel() == 0:
        return
    err = (new.double() - ref.double()).abs().max().item()
    bound = rel * ref.double().abs().max().item()
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


REL = {torch.float32: 4e-6, torch.bfloat16: 2 ** -7}


def mhc_params(d: int, n_mix: int, gen: torch.Generator):
    fn = torch.randn(n_mix, HC * d, generator=gen) * 0.05
    base = torch.randn(n_mix, generator=gen) * 0.5
    scale = torch.rand(3, generator=gen) + 0.5
    return fn, base, scale


def state(t: int, d: int, magnitude: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(t, HC, d, generator=gen) * magnitude).to(dtype)


CASES = [(0, 64), (1, 64), (33, 768), (4096, 64)]


# ---- mHC --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1.0, 3e4])
@pytest.mark.parametrize("t,d", CASES)
def test_hc_pre_matches_reference(t, d, magnitude, dtype):
    gen = torch.Generator().manual_seed(t * 7 + d)
    fn, base, scale = mhc_params(d, (2 + HC) * HC, gen)
    h = state(t, d, magnitude, dtype, gen)
    h_before = h.clone()
    y, post, comb = hc_pre(h, fn, base, scale, HC_EPS, NORM_EPS, ITERS)
    y_ref, post_ref, comb_ref = ref_hc_pre(h, fn, base, scale, HC_EPS, NORM_EPS, ITERS)
    assert torch.equal(h, h_before)
    assert_near(y, y_ref, REL[dtype])
    assert_near(post, post_ref, 1e-5)  # f32 whatever h's dtype; mixes round differently, then sigmoid
    assert_near(comb, comb_ref, 1e-5)
    torch.testing.assert_close(comb.sum(-2), torch.ones(t, HC), atol=1e-5, rtol=0)  # the last pass is by column


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1.0, 3e4])
@pytest.mark.parametrize("t,d", CASES)
def test_hc_post_matches_reference(t, d, magnitude, dtype):
    gen = torch.Generator().manual_seed(t * 11 + d)
    h = state(t, d, magnitude, dtype, gen)
    out = (torch.randn(t, d, generator=gen) * magnitude).to(dtype)
    post = 2 * torch.rand(t, HC, generator=gen)
    comb = ref_sinkhorn(torch.rand(t, HC, HC, generator=gen) + 0.01, ITERS, HC_EPS)
    h_before = h.clone()
    new = hc_post(h, out, post, comb)
    assert torch.equal(h, h_before)
    assert_near(new, ref_hc_post(h, out, post, comb), 2e-6 if dtype == torch.float32 else 2 ** -6)


def test_hc_post_promotes_like_the_formula():
    """An `out` of a wider dtype than h gives the wider result, as `post * out + mixed` does."""
    gen = torch.Generator().manual_seed(5)
    h = state(9, 32, 1.0, torch.bfloat16, gen)
    out = torch.randn(9, 32, generator=gen)
    post, comb = torch.rand(9, HC, generator=gen), torch.rand(9, HC, HC, generator=gen)
    new = hc_post(h, out, post, comb)
    assert new.dtype == torch.float32
    assert_near(new, ref_hc_post(h, out, post, comb), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1.0, 3e4])
@pytest.mark.parametrize("t,d", CASES)
def test_hc_head_matches_reference(t, d, magnitude, dtype):
    gen = torch.Generator().manual_seed(t * 13 + d)
    fn = torch.randn(HC, HC * d, generator=gen) * 0.05
    base, scale = torch.randn(HC, generator=gen), torch.rand(1, generator=gen) + 0.5
    h = state(t, d, magnitude, dtype, gen)
    assert_near(hc_head(h, fn, base, scale, HC_EPS, NORM_EPS), ref_hc_head(h, fn, base, scale, HC_EPS, NORM_EPS),
                REL[dtype])


@pytest.mark.parametrize("t", [0, 1, 33, 4096])
@pytest.mark.parametrize("iters", [1, 2, 20])
def test_sinkhorn_matches_reference_to_rounding(t, iters):
    gen = torch.Generator().manual_seed(t + iters)
    comb = torch.softmax(torch.randn(t, HC, HC, generator=gen) * 4, dim=-1) + HC_EPS
    before = comb.clone()
    new = sinkhorn(comb, iters, HC_EPS)
    ref = ref_sinkhorn(comb, iters, HC_EPS)
    assert torch.equal(comb, before)  # the input is not normalised in place
    assert_near(new, ref, 2e-6)
    if t:  # no less accurate than the plain loop against float64
        exact = ref_sinkhorn(comb.double(), iters, HC_EPS)
        err_new = (new.double() - exact).abs().max().item()
        err_ref = (ref.double() - exact).abs().max().item()
        assert err_new <= 2 * err_ref + 2e-7, (err_new, err_ref)


def test_sinkhorn_with_autograd_matches_and_differentiates():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, HC, HC, generator=gen).requires_grad_()
    comb = torch.softmax(logits, dim=-1) + HC_EPS
    new = sinkhorn(comb, ITERS, HC_EPS)
    assert_near(new.detach(), ref_sinkhorn(comb.detach(), ITERS, HC_EPS), 2e-6)
    new[:, 0, 0].sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_sinkhorn_non_contiguous_input():
    gen = torch.Generator().manual_seed(4)
    comb = (torch.rand(7, HC, HC, generator=gen) + 0.1).transpose(-1, -2)
    assert_near(sinkhorn(comb, ITERS, HC_EPS), ref_sinkhorn(comb, ITERS, HC_EPS), 2e-6)


# ---- RMSNorm / RoPE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 3e4])
@pytest.mark.parametrize("t", [0, 1, 33, 4096])
def test_rms_norms_match_reference(t, magnitude, dtype):
    gen = torch.Generator().manual_seed(t + 1)
    x = (torch.randn(t, 96, generator=gen) * magnitude).to(dtype)
    norm = RMSNorm(96, NORM_EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=gen) + 0.5)
    with torch.inference_mode():
        assert_near(norm(x), ref_rms_norm(x, norm.weight, NORM_EPS), REL[dtype])
    q = (torch.randn(t, 3, 64, generator=gen) * magnitude).to(dtype)
    assert_near(rms_normalize(q, NORM_EPS), ref_rms_normalize(q, NORM_EPS), REL[dtype])
    torch.testing.assert_close(rsqrt_mean_square(x, NORM_EPS),
                               torch.rsqrt(x.float().square().mean(-1, keepdim=True) + NORM_EPS),
                               rtol=2e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", [(0, 4, 64), (1, 4, 64), (33, 8, 128), (4096, 2, 64), (33, 64), (33, 3, 32)])
def test_apply_rope_matches_reference(shape, inverse, dtype):
    t = shape[0]
    gen = torch.Generator().manual_seed(sum(shape))
    freqs = 1.0 / (10000 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))  # r = 32
    cos, sin = rope_cos_sin(freqs, torch.randint(0, 70000, (t,), generator=gen))
    x = (torch.randn(*shape, generator=gen) * 50).to(dtype)
    before = x.clone()
    new = apply_rope(x, cos, sin, inverse=inverse)
    assert torch.equal(x, before) and new.is_contiguous()
    ref = ref_apply_rope(x, cos, sin, inverse=inverse)
    assert_near(new, ref, REL[dtype])
    assert torch.equal(new[..., :-32], x[..., :-32])  # the non-rotary channels are copied untouched


def test_apply_rope_round_trip_and_autograd():
    gen = torch.Generator().manual_seed(8)
    freqs = 1.0 / (160000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    cos, sin = rope_cos_sin(freqs, torch.arange(6))
    x = torch.randn(6, 2, 24, generator=gen, requires_grad=True)
    y = apply_rope(apply_rope(x, cos, sin), cos, sin, inverse=True)
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x), rtol=1e-5, atol=1e-5)


def test_norms_and_mhc_differentiate_like_the_reference():
    """With autograd (also after an inference-mode call filled a cache), the fast paths give the reference's
    gradients: no in-place op overwrites what a backward needs, no cached inference tensor is saved."""
    gen = torch.Generator().manual_seed(7)
    d = 32
    fn, base, scale = mhc_params(d, (2 + HC) * HC, gen)
    h = state(3, d, 1.0, torch.float32, gen)
    with torch.inference_mode():
        hc_pre(h, fn, base, scale, HC_EPS, NORM_EPS, ITERS)
    norm = RMSNorm(d, NORM_EPS)
    x = torch.randn(3, d, generator=gen)
    cases = [
        (lambda h, fn, base, scale: hc_pre(h, fn, base, scale, HC_EPS, NORM_EPS, ITERS),
         lambda h, fn, base, scale: ref_hc_pre(h, fn, base, scale, HC_EPS, NORM_EPS, ITERS), (h, fn, base, scale)),
        (lambda h, fn, base, scale: hc_head(h, fn, base, scale, HC_EPS, NORM_EPS),
         lambda h, fn, base, scale: ref_hc_head(h, fn, base, scale, HC_EPS, NORM_EPS),
         (h, fn[:HC], base[:HC], scale[:1])),
        (lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)),
         lambda x, w: ref_rms_norm(x, w, NORM_EPS), (x, norm.weight.detach() * 1.5)),
        (lambda x: rms_normalize(x, NORM_EPS), lambda x: ref_rms_normalize(x, NORM_EPS), (x,)),
    ]
    for new_fn, ref_fn, args in cases:
        grads = []
        for f in (new_fn, ref_fn):
            leaves = [a.detach().clone().requires_grad_() for a in args]
            outs = f(*leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            sum(o.float().sum() * (i + 1) for i, o in enumerate(outs)).backward()
            grads.append([leaf.grad for leaf in leaves])
        for g_new, g_ref in zip(*grads, strict=True):
            assert_near(g_new, g_ref, 1e-4)


@pytest.mark.parametrize("iters", [1, ITERS])
@pytest.mark.parametrize("t", [0, 1, 7, 33])
def test_hc_pre_kernel_matches_torch_path(t, iters, monkeypatch):
    """The C mixing step (engine.kernels.cpu.mhc, picked for float32 CPU tensors without autograd) against
    hc_pre's own torch path on the same inputs."""
    import engine.model.mhc as mhc
    from engine.kernels.cpu import mhc_kernel
    from engine.kernels.select import select_mhc_path

    if mhc_kernel() is None:
        pytest.skip("the CPU kernel library is not built here")
    assert select_mhc_path("cpu") == "kernel" and select_mhc_path("cpu", grad=True) == "torch"
    gen = torch.Generator().manual_seed(t + 100 * iters)
    fn, base, scale = mhc_params(64, (2 + HC) * HC, gen)
    h = state(t, 64, 1.0, torch.float32, gen)
    fast = hc_pre(h, fn, base, scale, HC_EPS, NORM_EPS, iters)
    monkeypatch.setattr(mhc, "select_mhc_path", lambda device, grad=False: "torch")
    plain = hc_pre(h, fn, base, scale, HC_EPS, NORM_EPS, iters)
    for a, b in zip(fast, plain, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_mhc_kernel_rejects_bad_input():
    from engine.kernels.cpu import mhc_kernel

    k = mhc_kernel()
    if k is None:
        pytest.skip("the CPU kernel library is not built here")
    with pytest.raises(ValueError, match="mixes must be float32"):
        k.mix(torch.zeros(2, 23), torch.zeros(24), torch.zeros(3), 4, 20, 1e-6)
    with pytest.raises(ValueError, match="hc = 20"):
        k.mix(torch.zeros(1, 440), torch.zeros(440), torch.zeros(3), 20, 20, 1e-6)


def _fused_kernel():
    from engine.kernels.cpu import mhc_kernel

    k = mhc_kernel()
    if k is None:
        pytest.skip("the CPU kernel library is not built here")
    return k


@pytest.mark.parametrize("hc", [4, 2])
@pytest.mark.parametrize("d", [64, 768])
@pytest.mark.parametrize("t", [0, 1, 3, 16])
def test_fused_hc_kernels_match_torch_path(t, d, hc, monkeypatch):
    """hc_pre / hc_post / hc_head at decode sizes on CPU (one C call each, engine.kernels.cpu.mhc) against their
    own torch path on the same inputs (different summation order of the hc*D-long dot products: rounding only)."""
    import engine.model.mhc as mhc

    k = _fused_kernel()
    assert t <= mhc.MHC_FUSED_MAX_TOKENS
    gen = torch.Generator().manual_seed(1000 * hc + 10 * t + d)
    n_mix = (2 + hc) * hc
    fn = torch.randn(n_mix, hc * d, generator=gen) * 0.05
    base, scale = torch.randn(n_mix, generator=gen) * 0.5, torch.rand(3, generator=gen) + 0.5
    head_fn, head_base = torch.randn(hc, hc * d, generator=gen) * 0.05, torch.randn(hc, generator=gen)
    head_scale = torch.rand(1, generator=gen) + 0.5
    h = torch.randn(t, hc, d, generator=gen)
    out = torch.randn(d, t, generator=gen).t()  # not contiguous: the wrapper copies it
    post = 2 * torch.rand(t, hc, generator=gen)
    comb = ref_sinkhorn(torch.rand(t, hc, hc, generator=gen) + 0.01, ITERS, HC_EPS)

    def run():
        return (*hc_pre(h, fn, base, scale, HC_EPS, NORM_EPS, ITERS), hc_post(h, out, post, comb),
                hc_head(h, head_fn, head_base, head_scale, HC_EPS, NORM_EPS))

    with torch.inference_mode():
        fast = run()
        # the fused path ran: the kernel's own outputs, bit for bit
        for a, b in zip(fast, (*k.pre(h, fn, base, scale, HC_EPS, NORM_EPS, ITERS), k.post(h, out, post, comb),
                               k.head(h, head_fn, head_base, head_scale, HC_EPS, NORM_EPS)), strict=True):
            assert torch.equal(a, b)
        monkeypatch.setattr(mhc, "select_mhc_path", lambda device, grad=False: "torch")
        plain = run()
    for name, a, b in zip(("y", "post", "comb", "hc_post", "hc_head"), fast, plain, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_fused_hc_kernels_reject_bad_input():
    k = _fused_kernel()
    h, fn, base, scale = torch.zeros(2, HC, 8), torch.zeros(24, HC * 8), torch.zeros(24), torch.zeros(3)
    out, post, comb = torch.zeros(2, 8), torch.zeros(2, HC), torch.zeros(2, HC, HC)
    hfn, hbase, hscale = torch.zeros(HC, HC * 8), torch.zeros(HC), torch.zeros(1)
    eps = (HC_EPS, NORM_EPS)
    with pytest.raises(ValueError, match="hc_pre: h must be float32"):
        k.pre(h.double(), fn, base, scale, *eps, ITERS)
    with pytest.raises(ValueError, match="hc_pre: fn must be float32 CPU \\[24, 32\\]"):
        k.pre(h, fn[:, :16], base, scale, *eps, ITERS)
    with pytest.raises(ValueError, match="hc_pre: base must be"):
        k.pre(h, fn, base.view(6, 4), scale, *eps, ITERS)
    with pytest.raises(ValueError, match="hc_pre: scale must be"):
        k.pre(h, fn, base, scale.half(), *eps, ITERS)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        k.pre(h, fn, base, scale, *eps, 0)
    with pytest.raises(ValueError, match="hc in \\[1, 16\\]"):
        k.pre(torch.zeros(1, 20, 8), torch.zeros(440, 160), torch.zeros(440), scale, *eps, ITERS)
    with pytest.raises(ValueError, match="hc_post: h must be \\[T, hc, D\\]"):
        k.post(h.flatten(1), out, post, comb)
    with pytest.raises(ValueError, match="hc_post: out must be float32 CPU \\[2, 8\\]"):
        k.post(h, out[:1], post, comb)
    with pytest.raises(ValueError, match="hc_post: post must be float32"):
        k.post(h, out, post.bfloat16(), comb)
    with pytest.raises(ValueError, match="hc_post: comb must be"):
        k.post(h, out, post, comb[:, :2])
    with pytest.raises(ValueError, match="hc_head: fn must be float32 CPU \\[4, 32\\]"):
        k.head(h, fn, hbase, hscale, *eps)
    with pytest.raises(ValueError, match="hc_head: scale must be"):
        k.head(h, hfn, hbase, scale, *eps)
    with pytest.raises(ValueError, match="hc_head: h must be float32"):
        k.head(h.bfloat16(), hfn, hbase, hscale, *eps)
