"""The mHC mixing step on CPU (`engine.kernels.cpu.mhc_src`): sigmoids, softmax and Sinkhorn of `hc_pre` in one
C call for all tokens. `engine.model.mhc` keeps the torch reference and picks this one for float32 CPU tensors
without autograd."""

from __future__ import annotations

import ctypes

import torch

from engine.kernels.cpu.moe_mlp import MoeMlpKernel


class MhcKernel:
    """`megaserve_mhc_mix` of a compiled `MoeMlpKernel` library."""

    def __init__(self, kernel: MoeMlpKernel) -> None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._mix = kernel.lib.megaserve_mhc_mix
        self._mix.argtypes = [p, p, p, i64, i32, i32, ctypes.c_float, p, p, p]
        self._mix.restype = i32

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
