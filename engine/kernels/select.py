"""Which fast path runs a routed-expert group or a linear layer: the one place that decides.

Routed experts (`select_expert_path`): rows already sorted by local expert slot, with offsets
(engine.model.experts.RoutedExperts.run_sorted). "counts on the host": the caller may read the rows per slot
(eager forward, prefill); the static decode step (`sync_free`) may not, and then only paths that read the offsets
on the device are picked.

    condition (first match)                                      path
    autograd needs gradients                                     "reference"     (RoutedExperts._forward_loop)
    CUDA, dense/MXFP4, engine.kernels.triton's moe_grouped_gemm  "triton"        (one Triton grouped GEMM launch
                                                                                   per projection pair)
    CPU, C kernel, counts not on the host, dense weights, rows   "grouped_mm"    (torch._grouped_mm per projection)
      >= KERNEL_MAX_ROWS x slots, torch._grouped_mm takes them
    CPU, C kernel takes the tensors, counts not on the host or   "kernel"        (one C call over all slots; it
      every slot under KERNEL_MAX_ROWS rows                                        reads the offsets itself)
    CPU, C kernel takes the tensors, a slot >= KERNEL_MAX_ROWS   "kernel+sorted" (slots under KERNEL_MAX_ROWS in
                                                                                   the C kernel, the rest "sorted")
    counts not on the host, torch._grouped_mm takes the operands "grouped_mm"    (torch._grouped_mm per projection)
    counts not on the host                                       "padded"        (fixed capacity: every slot
                                                                                   padded to N rows, three bmm's)
    dense weights, every slot under KERNEL_MAX_ROWS, >= 3/4 busy "padded"        (slots padded to the most rows,
                                                                                   three bmm's over all slots)
    otherwise                                                    "sorted"        (torch mm per slot; quantized
                                                                                   weights dequantized one expert
                                                                                   at a time into scratch)

Quantized weights on "grouped_mm"/"padded" are dequantized whole (torch) into the compute dtype.

Before any sorting (`select_assigned_path`, RoutedExperts.run_assigned): on CPU, with the C kernel taking the
tensors, no autograd and fewer than KERNEL_MAX_ROWS tokens (decode), "kernel_topk": one C call from the router's
(slot, weight) pairs to the summed output, the grouping by slot done in C (the sort, counts, gathers and the
index_add of "kernel" are a dozen tiny ops a layer at decode); else "sorted" (sort, then `select_expert_path`).
Fewer than KERNEL_MAX_ROWS tokens means fewer rows per slot when a token's slots are distinct, so it is the
"kernel" row of the table above in one call.

mHC's mixing step (`select_mhc_path`): "kernel" (one C call for the sigmoids, softmax and Sinkhorn of all
tokens: CPU, C library built, no autograd), "triton" (CUDA, no autograd: engine.kernels.triton's `mhc_gates` for
those, one launch, and `mhc_post` for the write-back), else "torch" (engine.model.mhc, the reference).

RMSNorm and the rotary embedding (`select_norm_path`): "kernel" (one C call for all rows: CPU float32, C library
built, no autograd, up to NORM_KERNEL_MAX_ELEMENTS values), else "torch" (engine.model.layers and
engine.model.rope, the references).

The attention core (`select_attn_core_path`, Attention._core): "kernel" (one C call: CPU float32, C library built,
no autograd, one query per sequence, one or two blocks of keys shared by the sequence's queries), else "torch".

Linear layers with quantized weights (`select_linear_path`): "kernel" (C, reads the bytes; up to
LINEAR_KERNEL_MAX_ROWS rows), "tiles" (C dequantizes TILE_ROWS weight rows at a time into scratch, then the
BLAS), "triton" (CUDA, FP8 block-scaled GEMM when engine.kernels.triton has it), "torch" (dequantize whole,
F.linear). Triton is imported lazily and only for CUDA tensors: CPU never imports it.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch
import torch.nn.functional as F

from engine.kernels.cpu import attn_kernel, mhc_kernel, norm_kernel, quant_kernels
from engine.weights.formats import dequantize_fp4, dequantize_fp8_block

KERNEL_MAX_ROWS = 32  # crossover of the C expert kernel vs MKL (engine.model.experts.RoutedExperts)
LINEAR_KERNEL_MAX_ROWS = 32  # the same crossover for the quantized linear
NORM_KERNEL_MAX_ELEMENTS = 1 << 16  # RMSNorm: up to here one C call (decode sizes), above it torch's threaded ops
TILE_ROWS = 1024  # weight rows dequantized at a time for the BLAS (a multiple of the FP8 block, 128)


@functools.cache
def triton_kernels() -> ModuleType | None:
    """engine.kernels.triton when it imports (Triton installed, a CUDA build), else None."""
    try:
        return importlib.import_module("engine.kernels.triton")
    except ImportError:
        return None


def triton_has(name: str) -> bool:
    """engine.kernels.triton has `name` and can run on CUDA here (its `available("cuda")`, when it has one)."""
    mod = triton_kernels()
    if mod is None or not callable(getattr(mod, name, None)):
        return False
    available = getattr(mod, "available", None)
    return bool(available("cuda")) if callable(available) else True


def select_expert_path(device: str, weight_format: str, act_dtype: torch.dtype, max_rows: int | None,
                       busy_slots: int | None, slots: int, cpu_kernel: bool, grad: bool = False,
                       grouped_mm: bool = False, rows: int = 0) -> str:
    """The routed-expert path (module docstring). weight_format: "dense", "fp4" or "fp8"; max_rows: the most
    rows any slot has and busy_slots: slots with rows, of `slots` (both None: the counts are not read on the
    host, sync-free); cpu_kernel: the C kernel takes these tensors (built here, float32 CPU activations,
    contiguous weights: RoutedExperts._kernel_usable); grouped_mm: torch._grouped_mm takes the operands; rows: the
    rows of the call (a shape: known on the host even when the counts are not)."""
    if grad:
        return "reference"
    if device == "cuda" and weight_format in ("dense", "fp4") and triton_has("moe_grouped_gemm"):
        return "triton"
    if device == "cpu" and cpu_kernel:
        if max_rows is None and weight_format == "dense" and grouped_mm and rows >= KERNEL_MAX_ROWS * slots:
            return "grouped_mm"  # sync-free, slots average KERNEL_MAX_ROWS rows or more: MKL's grouped GEMM
        return "kernel" if max_rows is None or max_rows < KERNEL_MAX_ROWS else "kernel+sorted"
    if max_rows is None or busy_slots is None:
        return "grouped_mm" if grouped_mm else "padded"
    if weight_format == "dense" and max_rows < KERNEL_MAX_ROWS and 4 * busy_slots >= 3 * slots:
        return "padded"
    return "sorted"


def select_assigned_path(device: str, cpu_kernel: bool, tokens: int, grad: bool = False) -> str:
    """How `RoutedExperts.run_assigned` starts (module docstring): "kernel_topk" or "sorted"."""
    if device == "cpu" and cpu_kernel and not grad and tokens < KERNEL_MAX_ROWS and quant_kernels() is not None:
        return "kernel_topk"
    return "sorted"


def select_linear_path(device: str, weight_format: str, act_dtype: torch.dtype, rows: int, in_features: int) -> str:
    """The quantized-linear path (module docstring)."""
    if device == "cuda" and weight_format == "fp8" and triton_has("fp8_block_linear"):
        return "triton"
    if device == "cpu" and act_dtype == torch.float32 and in_features % 32 == 0 and quant_kernels() is not None:
        return "kernel" if rows <= LINEAR_KERNEL_MAX_ROWS else "tiles"
    return "torch"


def dequantize(w: torch.Tensor, scale: torch.Tensor | None, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """A quantized weight [.., R, K] ("fp4", "fp8", "bf16") in `dtype`, by torch (any device)."""
    if fmt == "fp4":
        return dequantize_fp4(w, scale, dtype)
    if fmt == "fp8":
        if w.dim() == 3:
            return torch.stack([dequantize_fp8_block(w[i], scale[i], dtype) for i in range(w.shape[0])])
        return dequantize_fp8_block(w, scale, dtype)
    if fmt == "bf16":
        return w.to(dtype)
    raise ValueError(f"unknown weight format {fmt!r}")


def linear_quantized(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    """x [.., K] @ W^T for a quantized W [N, K] ("fp8" + block scale, or "bf16"), computed in `compute_dtype`;
    the result in x's dtype."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.dtype != compute_dtype:
        x2 = x2.to(compute_dtype)
    path = select_linear_path(x.device.type, fmt, compute_dtype, x2.shape[0], x2.shape[1])
    if path == "kernel":
        y = quant_kernels().linear(x2 if x2.is_contiguous() else x2.contiguous(), w, scale, fmt)
    elif path == "tiles":
        y = _linear_tiles(x2.contiguous(), w, scale, fmt)
    elif path == "triton":
        y = triton_kernels().fp8_block_linear(x2, w, scale)
    else:
        y = F.linear(x2, dequantize(w, scale, fmt, compute_dtype))
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], w.shape[0])
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _linear_tiles(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """Prefill: TILE_ROWS weight rows at a time dequantized by the C kernel into one scratch, then x @ tile^T."""
    qk = quant_kernels()
    n, k = w.shape[0], x.shape[1]
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    scratch = torch.empty(min(n, TILE_ROWS), k, dtype=torch.float32)
    for r0 in range(0, n, TILE_ROWS):
        r1 = min(n, r0 + TILE_ROWS)
        sc = None if scale is None else scale[r0 // 128: -(-r1 // 128)].contiguous()
        tile = qk.dequant(w[r0:r1], sc, fmt, scratch[: r1 - r0])
        y[:, r0:r1] = x @ tile.t()
    return y


def select_mhc_path(device: str, grad: bool = False) -> str:
    """The mHC mixing path (module docstring)."""
    if grad:
        return "torch"
    if device == "cpu" and mhc_kernel() is not None:
        return "kernel"
    if device == "cuda" and triton_has("mhc_gates") and triton_has("mhc_post"):
        return "triton"
    return "torch"


def select_norm_path(x: torch.Tensor, grad: bool = False) -> str:
    """The RMSNorm path (module docstring)."""
    if not grad and x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() <= NORM_KERNEL_MAX_ELEMENTS \
            and norm_kernel() is not None:
        return "kernel"
    return "torch"


def select_attn_core_path(q: torch.Tensor, queries: int, key_dims: list[int], grad: bool = False) -> str:
    """The attention core's path (module docstring); key_dims: each block's keys.dim() (3: shared, 4: per query)."""
    if not grad and queries == 1 and q.dtype == torch.float32 and q.device.type == "cpu" \
            and 1 <= len(key_dims) <= 2 and all(k == 3 for k in key_dims) and attn_kernel() is not None:
        return "kernel"
    return "torch"
