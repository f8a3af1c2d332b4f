"""RMSNorm on CPU (`engine.kernels.cpu.norm_src`): one C call for all rows. `engine.model.layers` keeps the torch
reference and picks this one for few float32 CPU rows without autograd (`select_norm_path`)."""

from __future__ import annotations

import ctypes

import torch

from engine.kernels.cpu.moe_mlp import MoeMlpKernel

_WEIGHT_CODES = {torch.float32: 1, torch.bfloat16: 2}


class NormKernel:
    """`megaserve_rmsnorm` of a compiled `MoeMlpKernel` library."""

    def __init__(self, kernel: MoeMlpKernel) -> None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._norm = kernel.lib.megaserve_rmsnorm
        self._norm.argtypes = [p, p, i32, ctypes.c_float, p, i64, i64]
        self._norm.restype = i32

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """x [.., D] float32 contiguous CPU -> x * rsqrt(mean(x^2, -1) + eps) (* weight [D], float32 or bfloat16),
        float32, x's shape."""
        d = x.shape[-1]
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError(f"rmsnorm: x must be a contiguous float32 CPU tensor, got {x.dtype} {tuple(x.shape)} "
                             f"on {x.device}")
        code = 0
        if weight is not None:
            code = _WEIGHT_CODES.get(weight.dtype, -1)
            if code < 0 or weight.shape != (d,) or not weight.is_contiguous() or weight.device.type != "cpu":
                raise ValueError(f"rmsnorm: weight must be a contiguous float32 or bfloat16 CPU [{d}], got "
                                 f"{weight.dtype} {tuple(weight.shape)}")
        y = torch.empty_like(x)
        self._norm(x.data_ptr(), None if weight is None else weight.data_ptr(), code, float(eps), y.data_ptr(),
                   x.numel() // d if d else 0, d)
        return y
