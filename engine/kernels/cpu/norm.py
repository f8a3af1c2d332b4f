"""RMSNorm and the rotary embedding on CPU (`engine.kernels.cpu.norm_src`, `rope_src`): one C call for all rows.
`engine.model.layers` and `engine.model.rope` keep the torch references and pick these for few float32 CPU rows
without autograd (`select_norm_path`)."""

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
        self._rope = kernel.lib.megaserve_rope
        self._rope.argtypes = [p, p, p, p, i64, i64, i64, i64, i32]
        self._rope.restype = i32

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

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """`engine.model.rope.apply_rope` for float32 x [T, ..., d] (contiguous CPU) and cos/sin [T, r/2] float32."""
        t, d = x.shape[0], x.shape[-1]
        h = cos.shape[-1]
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError(f"rope: x must be a contiguous float32 CPU tensor, got {x.dtype} {tuple(x.shape)} "
                             f"on {x.device}")
        for name, c in (("cos", cos), ("sin", sin)):
            if c.dtype != torch.float32 or c.shape != (t, h) or not c.is_contiguous() or c.device.type != "cpu":
                raise ValueError(f"rope: {name} must be a contiguous float32 CPU [{t}, r/2], got {c.dtype} "
                                 f"{tuple(c.shape)}")
        if 2 * h > d:
            raise ValueError(f"rope: {2 * h} rotated channels exceed the last dim {d}")
        y = torch.empty_like(x)
        if x.numel():
            self._rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), t, x.numel() // (t * d), d, 2 * h,
                       int(inverse))
        return y
