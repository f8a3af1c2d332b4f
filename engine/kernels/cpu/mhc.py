"""The mHC steps on CPU (`engine.kernels.cpu.mhc_src`): `mix` (sigmoids, softmax and Sinkhorn of `hc_pre` in one C
call for all tokens), and `pre`, `post`, `head` (the whole of `hc_pre`, `hc_post`, `hc_head`, one single-threaded C
call each, for decode-sized T). `engine.model.mhc` keeps the torch reference and picks these for float32 CPU
tensors without autograd.

The wrappers run ~12 times per decode step, so they check only what the C side trusts (dtype, device and shape
of every argument, in one expression; ValueError names the bad one), copy an argument only when it is not
contiguous, and allocate only the outputs."""

from __future__ import annotations

import ctypes

import torch

from engine.kernels.cpu.moe_mlp import MoeMlpKernel

MHC_MAX = 16  # the C side's largest hc
_F32 = torch.float32


def _raise_bad(op: str, named: tuple[tuple[str, torch.Tensor, tuple[int, ...]], ...]) -> None:
    """The ValueError naming the first of `named` (name, tensor, wanted shape) that is no float32 CPU tensor of
    its shape (the callers test all of them in one expression first, and come here only when that fails)."""
    for name, x, shape in named:
        if x.dtype != _F32 or not x.is_cpu or x.shape != shape:
            raise ValueError(f"{op}: {name} must be float32 CPU {list(shape)}, got {x.dtype} {list(x.shape)} "
                             f"on {x.device}")
    raise AssertionError(f"{op}: no bad argument found")  # the callers' test and this loop disagree


def _state(op: str, h: torch.Tensor) -> tuple[int, int, int]:
    """(T, hc, D) of h [T, hc, D]; ValueError unless hc is in [1, MHC_MAX] (h's dtype and device: the caller)."""
    if h.dim() != 3 or not 1 <= h.shape[1] <= MHC_MAX:
        raise ValueError(f"{op}: h must be [T, hc, D] with hc in [1, {MHC_MAX}], got {list(h.shape)}")
    t, hc, d = h.shape
    return t, hc, d


class MhcKernel:
    """The mHC entry points (`megaserve_mhc_mix`, `megaserve_hc_pre/post/head`) of a compiled `MoeMlpKernel`."""

    def __init__(self, kernel: MoeMlpKernel) -> None:
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib = kernel.lib
        self._mix = lib.megaserve_mhc_mix
        self._mix.argtypes = [p, p, p, i64, i32, i32, f32, p, p, p]
        self._mix.restype = i32
        self._pre = lib.megaserve_hc_pre
        self._pre.argtypes = [p, p, p, p, i64, i32, i64, i32, f32, f32, p, p, p]
        self._pre.restype = i32
        self._post = lib.megaserve_hc_post
        self._post.argtypes = [p, p, p, p, i64, i32, i64, p]
        self._post.restype = i32
        self._head = lib.megaserve_hc_head
        self._head.argtypes = [p, p, p, p, i64, i32, i64, f32, f32, p]
        self._head.restype = i32

    def mix(self, mixes: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc: int, iters: int,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mixes [T, (2+hc)*hc], base [(2+hc)*hc], scale [3] (float32, CPU) -> (pre [T, hc], post [T, hc],
        comb [T, hc, hc]) as `engine.model.mhc.hc_pre` computes them."""
        t = mixes.shape[0]
        width = (2 + hc) * hc
        for name, x, shape in (("mixes", mixes, (t, width)), ("base", base, (width,)), ("scale", scale, (3,))):
            if x.dtype != torch.float32 or x.device.type != "cpu" or tuple(x.shape) != shape:
                raise ValueError(f"mhc_mix: {name} must be float32 CPU {shape}, got {x.dtype} {tuple(x.shape)} "
                                 f"on {x.device}")
        if iters < 1:
            raise ValueError(f"mhc_mix: iters must be >= 1, got {iters}")
        mixes, base, scale = mixes.contiguous(), base.contiguous(), scale.contiguous()
        pre = torch.empty(t, hc, dtype=torch.float32)
        post = torch.empty(t, hc, dtype=torch.float32)
        comb = torch.empty(t, hc, hc, dtype=torch.float32)
        rc = self._mix(mixes.data_ptr(), base.data_ptr(), scale.data_ptr(), t, hc, iters, float(eps), pre.data_ptr(),
                       post.data_ptr(), comb.data_ptr())
        if rc != 0:
            raise ValueError(f"mhc_mix: hc = {hc} is outside [1, 16]")
        return pre, post, comb

    def pre(self, h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
            norm_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`engine.model.mhc.hc_pre` in one call: h [T, hc, D], fn [(2+hc)*hc, hc*D], base [(2+hc)*hc], scale [3]
        (float32, CPU) -> (y [T, D], post [T, hc], comb [T, hc, hc])."""
        t, hc, d = _state("hc_pre", h)
        n_mix = (2 + hc) * hc
        if not (h.dtype is fn.dtype is base.dtype is scale.dtype is _F32 and h.is_cpu and fn.is_cpu and base.is_cpu
                and scale.is_cpu and fn.shape == (n_mix, hc * d) and base.shape == (n_mix,) and scale.shape == (3,)):
            _raise_bad("hc_pre", (("h", h, (t, hc, d)), ("fn", fn, (n_mix, hc * d)), ("base", base, (n_mix,)),
                                  ("scale", scale, (3,))))
        if iters < 1:
            raise ValueError(f"hc_pre: iters must be >= 1, got {iters}")
        h, fn, base, scale = h.contiguous(), fn.contiguous(), base.contiguous(), scale.contiguous()  # no-op if so
        y = torch.empty(t, d, dtype=torch.float32)
        post = torch.empty(t, hc, dtype=torch.float32)
        comb = torch.empty(t, hc, hc, dtype=torch.float32)
        rc = self._pre(h.data_ptr(), fn.data_ptr(), base.data_ptr(), scale.data_ptr(), t, hc, d, iters, hc_eps,
                       norm_eps, y.data_ptr(), post.data_ptr(), comb.data_ptr())
        if rc:
            raise ValueError(f"hc_pre: hc = {hc} is outside [1, {MHC_MAX}]")
        return y, post, comb

    def post(self, h: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """`engine.model.mhc.hc_post` in one call: h [T, hc, D], out [T, D], post [T, hc], comb [T, hc, hc]
        (float32, CPU) -> [T, hc, D] = post_j * out + sum_i comb[i, j] * h_i."""
        t, hc, d = _state("hc_post", h)
        if not (h.dtype is out.dtype is post.dtype is comb.dtype is _F32 and h.is_cpu and out.is_cpu and post.is_cpu
                and comb.is_cpu and out.shape == (t, d) and post.shape == (t, hc) and comb.shape == (t, hc, hc)):
            _raise_bad("hc_post", (("h", h, (t, hc, d)), ("out", out, (t, d)), ("post", post, (t, hc)),
                                   ("comb", comb, (t, hc, hc))))
        h, out, post, comb = h.contiguous(), out.contiguous(), post.contiguous(), comb.contiguous()
        res = torch.empty(t, hc, d, dtype=torch.float32)
        if self._post(h.data_ptr(), out.data_ptr(), post.data_ptr(), comb.data_ptr(), t, hc, d, res.data_ptr()):
            raise ValueError(f"hc_post: hc = {hc} is outside [1, {MHC_MAX}]")
        return res

    def head(self, h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
             norm_eps: float) -> torch.Tensor:
        """`engine.model.mhc.hc_head` in one call: h [T, hc, D], fn [hc, hc*D], base [hc], scale [1] (float32,
        CPU) -> y [T, D]."""
        t, hc, d = _state("hc_head", h)
        if not (h.dtype is fn.dtype is base.dtype is scale.dtype is _F32 and h.is_cpu and fn.is_cpu and base.is_cpu
                and scale.is_cpu and fn.shape == (hc, hc * d) and base.shape == (hc,) and scale.shape == (1,)):
            _raise_bad("hc_head", (("h", h, (t, hc, d)), ("fn", fn, (hc, hc * d)), ("base", base, (hc,)),
                                   ("scale", scale, (1,))))
        h, fn, base, scale = h.contiguous(), fn.contiguous(), base.contiguous(), scale.contiguous()
        y = torch.empty(t, d, dtype=torch.float32)
        if self._head(h.data_ptr(), fn.data_ptr(), base.data_ptr(), scale.data_ptr(), t, hc, d, hc_eps, norm_eps,
                      y.data_ptr()):
            raise ValueError(f"hc_head: hc = {hc} is outside [1, {MHC_MAX}]")
        return y
