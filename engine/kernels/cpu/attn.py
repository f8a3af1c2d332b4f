"""V4's attention core for one query per sequence on CPU (`engine.kernels.cpu.attn_src`): one C call a layer.
`engine.model.attention.Attention._core` keeps the torch reference and picks this one (`select_attn_core_path`)."""

from __future__ import annotations

import ctypes

import torch

from engine.kernels.cpu.moe_mlp import MoeMlpKernel


class AttnKernel:
    """`megaserve_attn_decode` of a compiled `MoeMlpKernel` library."""

    MAX_BLOCKS = 2

    def __init__(self, kernel: MoeMlpKernel) -> None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._attn = kernel.lib.megaserve_attn_decode
        self._attn.argtypes = [p, p, p, i64, p, p, i64, p, ctypes.c_float, p, i64, i64, i64]
        self._attn.restype = ctypes.c_int

    def decode(self, q: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor | None]], sink: torch.Tensor,
               scale: float) -> torch.Tensor:
        """q [B, H, d]; blocks [(keys [B, L, d], visible bool [B, L] or None)] (one or two); sink [H] -> o [B, H, d]:
        softmax(scale * q.k over the visible keys, with the sink in the denominator) @ keys. All float32 CPU."""
        b, h, d = q.shape
        if not 1 <= len(blocks) <= self.MAX_BLOCKS:
            raise ValueError(f"attn_decode: 1 or {self.MAX_BLOCKS} key blocks, got {len(blocks)}")
        for name, t in (("q", q), ("sink", sink), *((f"keys[{i}]", k) for i, (k, _) in enumerate(blocks))):
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"attn_decode: {name} must be a contiguous float32 CPU tensor, got {t.dtype} "
                                 f"{tuple(t.shape)}")
        if sink.shape != (h,):
            raise ValueError(f"attn_decode: sink must be [{h}], got {tuple(sink.shape)}")
        args: list = []
        for i, (k, v) in enumerate([*blocks, *[(None, None)] * (self.MAX_BLOCKS - len(blocks))]):
            if k is None:
                args += [None, None, 0]
                continue
            if k.dim() != 3 or k.shape[0] != b or k.shape[2] != d:
                raise ValueError(f"attn_decode: keys[{i}] must be [{b}, L, {d}], got {tuple(k.shape)}")
            if v is not None and (v.dtype != torch.bool or v.shape != k.shape[:2] or not v.is_contiguous()):
                raise ValueError(f"attn_decode: visible[{i}] must be a contiguous bool {tuple(k.shape[:2])}, got "
                                 f"{v.dtype} {tuple(v.shape)}")
            args += [k.data_ptr(), None if v is None else v.data_ptr(), k.shape[1]]
        o = torch.empty(b, h, d, dtype=torch.float32)
        if b and h:
            rc = self._attn(q.data_ptr(), *args, sink.data_ptr(), float(scale), o.data_ptr(), b, h, d)
            if rc == -3:
                raise MemoryError("attn_decode: no memory for the scores")
        return o
