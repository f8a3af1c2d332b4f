"""Quantized weights on CPU: the routed-expert MLP, a linear layer and a dequantizer over FP4/FP8/BF16 bytes.

Formats and layouts are `engine.kernels.cpu.quant_src`'s: "fp4" (uint8 [.., R, K/2] packed MXFP4 + E8M0 scale
[.., R, K/32]), "fp8" (float8_e4m3fn [.., R, K] + scale [.., ceil(R/128), ceil(K/128)], E8M0 or float32) and
"bf16" (bfloat16 [.., R, K], no scale). Activations and outputs are float32. K must be a multiple of 32.
"""

from __future__ import annotations

import ctypes

import torch

from engine.kernels.cpu.moe_mlp import MoeMlpKernel

FORMATS = {"fp4": 1, "fp8": 2, "bf16": 3}
_WEIGHT_DTYPES = {"fp4": (torch.uint8, torch.int8), "fp8": (torch.float8_e4m3fn,), "bf16": (torch.bfloat16,)}
_SCALE_CODES = {torch.float8_e8m0fnu: 0, torch.uint8: 0, torch.float32: 1}


class QuantKernels:
    """The quantized entry points of a compiled `MoeMlpKernel` library."""

    CHECKED_MAX = 4096  # weights whose check is remembered (cleared whole past it)

    def __init__(self, kernel: MoeMlpKernel) -> None:
        lib = kernel.lib
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._moe = lib.megaserve_moe_mlp_q
        self._moe.argtypes = [p] * 9 + [i32, i32, p, p, i64, i64, i64, i64, ctypes.c_float, i32]
        self._moe.restype = i32
        self._linear = lib.megaserve_qlinear
        self._linear.argtypes = [p, p, p, i32, i32, p, i64, i64, i64, i32]
        self._linear.restype = i32
        self._topk = lib.megaserve_moe_topk
        self._topk.argtypes = [p] * 9 + [i32, i32, p, i64, i64, i64, i64, i64, ctypes.c_float, i32]
        self._topk.restype = i32
        self._dequant = lib.megaserve_dequant
        self._dequant.argtypes = [p, p, i32, i32, p, i64, i64, i32]
        self._dequant.restype = i32
        self._checked: set[tuple] = set()

    def moe_mlp(self, x: torch.Tensor, offsets: torch.Tensor, route_w: torch.Tensor, w1: torch.Tensor,
                s1: torch.Tensor | None, w3: torch.Tensor, s3: torch.Tensor | None, w2: torch.Tensor,
                s2: torch.Tensor | None, fmt: str, limit: float, num_threads: int | None = None) -> torch.Tensor:
        """`moe_mlp` (engine.kernels.cpu) with w1/w3 [S, I, D] and w2 [S, D, I] in `fmt` (logical shapes)."""
        n, d = x.shape
        s = offsets.numel() - 1
        i = _logical_rows(w1, fmt)
        _check_x(x, d)
        for name, w, sc, rows, k in (("w1", w1, s1, i, d), ("w3", w3, s3, i, d), ("w2", w2, s2, d, i)):
            self._check_weight_once(name, w, sc, fmt, (s, rows, k))
        if offsets.dtype != torch.int64 or route_w.dtype != torch.float32 or route_w.shape != (n,):
            raise ValueError("offsets must be int64 [S+1] and route_w float32 [N]")
        y = torch.empty(n, d, dtype=torch.float32)
        a = torch.empty(n, i, dtype=torch.float32)
        sfmt = _scale_code(s1)
        threads = torch.get_num_threads() if num_threads is None else num_threads
        rc = self._moe(x.data_ptr(), offsets.data_ptr(), route_w.data_ptr(), w1.data_ptr(), _ptr(s1), w3.data_ptr(),
                       _ptr(s3), w2.data_ptr(), _ptr(s2), FORMATS[fmt], sfmt, a.data_ptr(), y.data_ptr(), n, s, d, i,
                       float(limit), int(threads))
        if rc == -3:
            raise MemoryError(f"moe_mlp: no memory for the split copy of x ({n} x {d} floats)")
        if rc != 0:
            raise ValueError(f"offsets: must start at 0, never decrease and end at N={n} (rc {rc})")
        return y

    def moe_topk(self, x: torch.Tensor, slot: torch.Tensor, route_w: torch.Tensor, w1: torch.Tensor,
                 s1: torch.Tensor | None, w3: torch.Tensor, s3: torch.Tensor | None, w2: torch.Tensor,
                 s2: torch.Tensor | None, fmt: str, limit: float, num_threads: int | None = None) -> torch.Tensor:
        """The routed experts from the router's output, few tokens (decode): x [T, D], slot int64 [T, k] (the local
        slot of each assignment, -1: not held here), route_w float32 [T, k] -> y [T, D] float32, the sum over the
        held assignments of route_w * Expert_slot(x). The C side groups the assignments by slot (what `moe_mlp`
        takes) and sums the rows back per token. fmt: "dense" (float32 w1/w3 [S, I, D], w2 [S, D, I], no scales)
        or a quantized format as for `moe_mlp`."""
        t, d = x.shape
        _check_x(x, d)
        if slot.dtype != torch.int64 or slot.dim() != 2 or slot.shape[0] != t or not slot.is_contiguous():
            raise ValueError(f"slot: expected contiguous int64 [T={t}, k], got {slot.dtype} {tuple(slot.shape)}")
        k = slot.shape[1]
        if route_w.dtype != torch.float32 or route_w.shape != slot.shape or not route_w.is_contiguous():
            raise ValueError(f"route_w: expected contiguous float32 {tuple(slot.shape)}, got {route_w.dtype} "
                             f"{tuple(route_w.shape)}")
        s, i = w1.shape[0], w1.shape[1]
        if fmt == "dense":
            for name, w, shape in (("w1", w1, (s, i, d)), ("w3", w3, (s, i, d)), ("w2", w2, (s, d, i))):
                if w.dtype != torch.float32 or tuple(w.shape) != shape or not w.is_contiguous() \
                        or w.device.type != "cpu":
                    raise ValueError(f"{name}: expected contiguous float32 CPU {shape}, got {w.dtype} "
                                     f"{tuple(w.shape)}")
            code, sfmt = 0, 0
        else:
            for name, w, sc, rows, kk in (("w1", w1, s1, i, d), ("w3", w3, s3, i, d), ("w2", w2, s2, d, i)):
                self._check_weight_once(name, w, sc, fmt, (s, rows, kk))
            code, sfmt = FORMATS[fmt], _scale_code(s1)
        y = torch.empty(t, d, dtype=torch.float32)
        threads = torch.get_num_threads() if num_threads is None else num_threads
        rc = self._topk(x.data_ptr(), slot.data_ptr(), route_w.data_ptr(), w1.data_ptr(), _ptr(s1), w3.data_ptr(),
                        _ptr(s3), w2.data_ptr(), _ptr(s2), code, sfmt, y.data_ptr(), t, k, s, d, i, float(limit),
                        int(threads))
        if rc == -3:
            raise MemoryError(f"moe_topk: no memory for the grouped copy of x ({t * k} x {d} floats)")
        if rc != 0:
            raise ValueError(f"moe_topk failed (rc {rc})")
        return y

    def linear(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str,
               num_threads: int | None = None) -> torch.Tensor:
        """y [M, N] = x [M, K] @ W^T for W [N, K] in `fmt` (float32 x and y)."""
        m, k = x.shape
        n = w.shape[0]
        _check_x(x, k)
        self._check_weight_once("w", w, scale, fmt, (n, k))
        y = torch.empty(m, n, dtype=torch.float32)
        threads = torch.get_num_threads() if num_threads is None else num_threads
        rc = self._linear(x.data_ptr(), w.data_ptr(), _ptr(scale), FORMATS[fmt], _scale_code(scale), y.data_ptr(),
                          m, n, k, int(threads))
        if rc == -3:
            raise MemoryError(f"qlinear: no memory for the split copy of x ({m} x {k} floats)")
        if rc != 0:
            raise ValueError(f"qlinear failed (rc {rc})")
        return y

    def _check_weight_once(self, name: str, w: torch.Tensor, scale: torch.Tensor | None, fmt: str,
                           logical: tuple[int, ...]) -> None:
        """`_check_weight`, remembered by everything the check reads (the tensors' addresses, dtypes, shapes and
        strides, the format and the logical shape): a decode step calls the same resident weights over and over,
        and the full check cost as much as a small layer's dot products."""
        key = (name, fmt, logical, w.data_ptr(), w.dtype, w.shape, w.stride(), w.device.type,
               None if scale is None else (scale.data_ptr(), scale.dtype, scale.shape, scale.stride(),
                                           scale.device.type))
        if key in self._checked:
            return
        _check_weight(name, w, scale, fmt, logical)
        if len(self._checked) >= self.CHECKED_MAX:
            self._checked.clear()
        self._checked.add(key)

    def dequant(self, w: torch.Tensor, scale: torch.Tensor | None, fmt: str, out: torch.Tensor | None = None,
                num_threads: int | None = None) -> torch.Tensor:
        """W [R, K] in `fmt` -> float32 [R, K] (into `out` when given: float32 contiguous [R, K])."""
        r = w.shape[0]
        k = w.shape[1] * (2 if fmt == "fp4" else 1)
        _check_weight("w", w, scale, fmt, (r, k))
        if out is None:
            out = torch.empty(r, k, dtype=torch.float32)
        elif out.dtype != torch.float32 or tuple(out.shape) != (r, k) or not out.is_contiguous():
            raise ValueError(f"out: expected float32 contiguous [{r}, {k}], got {out.dtype} {tuple(out.shape)}")
        threads = torch.get_num_threads() if num_threads is None else num_threads
        self._dequant(w.data_ptr(), _ptr(scale), FORMATS[fmt], _scale_code(scale), out.data_ptr(), r, k, int(threads))
        return out


def _logical_rows(w: torch.Tensor, fmt: str) -> int:
    return w.shape[-2]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _scale_code(scale: torch.Tensor | None) -> int:
    if scale is None:
        return 0
    try:
        return _SCALE_CODES[scale.dtype]
    except KeyError:
        raise ValueError(f"scale: dtype {scale.dtype}, expected float8_e8m0fnu (or its uint8 bytes) or float32") \
            from None


def _check_x(x: torch.Tensor, k: int) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.dim() != 2:
        raise ValueError(f"x: expected a contiguous float32 CPU [M, K] tensor, got {x.dtype} {tuple(x.shape)}")
    if k % 32:
        raise ValueError(f"K = {k} must be a multiple of 32 for the quantized CPU kernels")


def _check_weight(name: str, w: torch.Tensor, scale: torch.Tensor | None, fmt: str, logical: tuple[int, ...]) -> None:
    """w holds `logical` ([.., R, K]) values in `fmt`, with the scale that format needs; contiguous, on CPU."""
    if fmt not in FORMATS:
        raise ValueError(f"{name}: format {fmt!r}, expected one of {sorted(FORMATS)}")
    if w.dtype not in _WEIGHT_DTYPES[fmt]:
        raise ValueError(f"{name}: dtype {w.dtype} is not a {fmt} weight ({_WEIGHT_DTYPES[fmt]})")
    *lead, rows, k = logical
    stored = (*lead, rows, k // 2) if fmt == "fp4" else logical
    if tuple(w.shape) != tuple(stored):
        raise ValueError(f"{name}: shape {tuple(w.shape)}, expected {tuple(stored)} for {fmt} [.., {rows}, {k}]")
    want = {"fp4": (*lead, rows, k // 32), "fp8": (*lead, -(-rows // 128), -(-k // 128)), "bf16": None}[fmt]
    if want is None:
        if scale is not None:
            raise ValueError(f"{name}: bf16 weights take no scale")
    elif scale is None or tuple(scale.shape) != tuple(want):
        raise ValueError(f"{name}: {fmt} scale must have shape {tuple(want)}, got "
                         f"{None if scale is None else tuple(scale.shape)}")
    for t, what in ((w, name), (scale, f"{name} scale")):
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
            raise ValueError(f"{what}: must be a contiguous CPU tensor")
