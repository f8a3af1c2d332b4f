"""Hand-written CPU kernels, compiled with the system C compiler at first use (see `build`).

`moe_mlp(x, offsets, route_w, w1, w3, w2, limit)`: the routed-expert MLP over rows grouped by expert slot
(layout and math in `engine.kernels.cpu.moe_mlp`). Call it only when `moe_mlp_available()` is True: that is
False when env MEGASERVE_CPU_KERNELS=0, or there is no compiler, or compiling/loading failed (one warning
says why); callers then use their torch path.

`quant_kernels()`: the same library's entry points over FP4/FP8/BF16 weight bytes (`engine.kernels.cpu.quant`),
None when the kernel is unavailable. `mhc_kernel()`: its mHC mixing step (`engine.kernels.cpu.mhc`), likewise;
`norm_kernel()`: its RMSNorm and rotary embedding (`engine.kernels.cpu.norm`), likewise; `attn_kernel()`: its
attention core for one query per sequence (`engine.kernels.cpu.attn`), likewise.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from engine.kernels.cpu.attn import AttnKernel
from engine.kernels.cpu.build import KernelBuildError
from engine.kernels.cpu.mhc import MhcKernel
from engine.kernels.cpu.moe_mlp import MoeMlpKernel, check_args
from engine.kernels.cpu.norm import NormKernel
from engine.kernels.cpu.quant import QuantKernels

__all__ = ["moe_mlp", "moe_mlp_available", "quant_kernels", "mhc_kernel", "norm_kernel", "attn_kernel",
           "MoeMlpKernel", "QuantKernels", "MhcKernel", "NormKernel", "AttnKernel", "KernelBuildError", "check_args"]

log = logging.getLogger(__name__)


@functools.cache
def _default_kernel() -> MoeMlpKernel | None:
    if os.environ.get("MEGASERVE_CPU_KERNELS", "1").strip() == "0":
        log.warning("CPU kernels disabled (MEGASERVE_CPU_KERNELS=0): routed experts use the torch path")
        return None
    errors = []
    for openmp in (None, False):  # the OpenMP build on torch's libgomp, else the private pthread pool
        try:
            kernel = MoeMlpKernel(openmp=openmp)
        except (KernelBuildError, OSError, AttributeError) as e:
            errors.append(str(e))
            continue
        if errors:
            log.warning("CPU moe_mlp kernel: OpenMP build failed (%s); using the pthread build", errors[0])
        return kernel
    log.warning("CPU moe_mlp kernel unavailable, routed experts use the torch path: %s", errors[-1])
    return None


def moe_mlp_available() -> bool:
    """True when the kernel is compiled and loaded on this machine and not disabled (decided once, cached)."""
    return _default_kernel() is not None


def moe_mlp(x: torch.Tensor, offsets: torch.Tensor, route_w: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
            w2: torch.Tensor, limit: float) -> torch.Tensor:
    """y [N, D] with y[r] = w2[s] @ (route_w[r] * silu(min(w1[s] x[r], limit)) * clamp(w3[s] x[r], ±limit)).

    Rows offsets[s]:offsets[s+1] of x [N, D] belong to slot s; w1, w3 [S, I, D], w2 [S, D, I]; all float32
    contiguous on CPU, offsets int64 [S+1]. Bad input raises ValueError naming the argument; RuntimeError
    when the kernel is unavailable (check `moe_mlp_available()` first).
    """
    kernel = _default_kernel()
    if kernel is None:
        raise RuntimeError("the CPU moe_mlp kernel is unavailable (see moe_mlp_available())")
    return kernel.run(x, offsets, route_w, w1, w3, w2, limit)


def _entry_points(cls):
    """`cls` (QuantKernels, MhcKernel, ...) over the one compiled library, or None without it."""
    kernel = _default_kernel()
    return None if kernel is None else cls(kernel)


@functools.cache
def quant_kernels() -> QuantKernels | None:
    """The quantized-weight entry points (expert MLP, linear, dequantize), or None without the kernel."""
    return _entry_points(QuantKernels)


@functools.cache
def mhc_kernel() -> MhcKernel | None:
    """The mHC mixing step (`engine.kernels.cpu.mhc`), or None without the kernel."""
    return _entry_points(MhcKernel)


@functools.cache
def norm_kernel() -> NormKernel | None:
    """The RMSNorm and rotary embedding (`engine.kernels.cpu.norm`), or None without the kernel."""
    return _entry_points(NormKernel)


@functools.cache
def attn_kernel() -> AttnKernel | None:
    """The decode attention core (`engine.kernels.cpu.attn`), or None without the kernel."""
    return _entry_points(AttnKernel)
