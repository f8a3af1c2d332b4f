"""Routed-expert MLP on CPU for rows grouped by expert slot, as one C call (fp32).

Layout: x [N, D] float32 contiguous with rows grouped by local expert slot (rows offsets[s]:offsets[s+1] go to
slot s; offsets int64 [S+1], offsets[0] = 0, non-decreasing, offsets[S] = N, empty groups allowed);
route_w [N] float32; w1, w3 [S, I, D] and w2 [S, D, I] float32 contiguous (RoutedExperts' stacked layout).

Math (v4-model.md §4.2), for row r of slot s:
    g = w1[s] @ x[r],  u = w3[s] @ x[r]                                  (fp32)
    a = route_w[r] * silu(min(g, limit)) * clamp(u, -limit, limit)       (weight applied before w2)
    y[r] = w2[s] @ a

The kernel streams every weight row once per call and computes up to 12 activation rows (6 without AVX-512)
against it in registers, so at decode sizes (a few rows per expert) it runs near memory bandwidth instead of
padding rows into a bmm.

Threads: where torch runs on libgomp (the Linux wheels), the kernel is built with -fopenmp and binds to that
same already-loaded libgomp, so it runs on torch's own OpenMP pool (no second runtime, no oversubscription, and
no waiting for a core that torch's spinning workers hold). Elsewhere it uses a private pthread pool.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from engine.kernels.cpu.build import DEFAULT_FLAGS, KernelBuildError, compile_shared
from engine.kernels.cpu.moe_mlp_src import SOURCE

_SYMBOL = "megaserve_moe_mlp"
OPENMP_FLAGS = ("-fopenmp", "-DMEGASERVE_OMP")
_OMP_NAMES = ("libgomp", "libiomp", "libomp")


def openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process (empty where /proc is missing)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return set()
    return {p for p in paths if Path(p).name.startswith(_OMP_NAMES)}


def torch_uses_libgomp() -> bool:
    """True when torch's parallel backend is OpenMP and the one OpenMP runtime loaded is a libgomp."""
    loaded = openmp_runtimes()
    return ("OpenMP" in torch.__config__.parallel_info() and len(loaded) == 1
            and Path(next(iter(loaded))).name.startswith("libgomp"))


def check_args(x: torch.Tensor, offsets: torch.Tensor, route_w: torch.Tensor, w1: torch.Tensor,
               w3: torch.Tensor, w2: torch.Tensor, limit: float) -> tuple[int, int, int, int]:
    """Validate the layout above (not the offsets' values); returns (N, S, D, I). ValueError names the argument."""
    named = {"x": x, "offsets": offsets, "route_w": route_w, "w1": w1, "w3": w3, "w2": w2}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        want = torch.int64 if name == "offsets" else torch.float32
        if t.dtype != want:
            raise ValueError(f"{name}: dtype {t.dtype}, expected {want}")
        if t.device.type != "cpu":
            raise ValueError(f"{name}: on {t.device}, expected a CPU tensor")
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
    if x.dim() != 2:
        raise ValueError(f"x: expected [N, D], got shape {tuple(x.shape)}")
    n, d = x.shape
    if w1.dim() != 3 or w1.shape[2] != d:
        raise ValueError(f"w1: expected [S, I, D={d}], got shape {tuple(w1.shape)}")
    s, i = w1.shape[0], w1.shape[1]
    if w3.shape != w1.shape:
        raise ValueError(f"w3: shape {tuple(w3.shape)} differs from w1 {tuple(w1.shape)}")
    if tuple(w2.shape) != (s, d, i):
        raise ValueError(f"w2: expected [S, D, I] = {(s, d, i)}, got {tuple(w2.shape)}")
    if tuple(offsets.shape) != (s + 1,):
        raise ValueError(f"offsets: expected shape [S+1] = [{s + 1}], got {tuple(offsets.shape)}")
    if tuple(route_w.shape) != (n,):
        raise ValueError(f"route_w: expected shape [N] = [{n}], got {tuple(route_w.shape)}")
    if not isinstance(limit, (int, float)) or math.isnan(limit) or limit <= 0:
        raise ValueError(f"limit: expected a positive float (inf allowed), got {limit!r}")
    return n, s, d, i


def load_library(name: str, source: str, flags: tuple[str, ...], cache: Path | None,
                 openmp: bool | None) -> tuple[bool, tuple[str, ...], Path, ctypes.CDLL]:
    """Compile `source` as shared library `name` and load it: (openmp, flags, path, lib). `openmp`: thread on
    torch's libgomp (True) or not (False); None picks OpenMP when `torch_uses_libgomp()`. Raises KernelBuildError,
    also when loading it brought a second OpenMP runtime into the process."""
    use_omp = torch_uses_libgomp() if openmp is None else openmp
    flags = flags + OPENMP_FLAGS if use_omp else flags
    path = compile_shared(name, source, flags, cache)
    before = openmp_runtimes()
    lib = ctypes.CDLL(str(path))
    if use_omp and len(openmp_runtimes() - before) > 0:
        raise KernelBuildError(f"loading {path.name} brought a second OpenMP runtime "
                               f"({sorted(openmp_runtimes() - before)}); use openmp=False")
    return use_omp, flags, path, lib


class MoeMlpKernel:
    """The compiled kernel (one shared library); `run` is `moe_mlp` on it.

    `flags`: compiler flags (default: -O3 -march=native ...). `openmp`: thread on torch's libgomp (True) or a
    private pthread pool (False); None picks OpenMP when `torch_uses_libgomp()`. Raises KernelBuildError.
    """

    def __init__(self, flags: tuple[str, ...] = DEFAULT_FLAGS, cache: Path | None = None,
                 openmp: bool | None = None) -> None:
        self.openmp, self.flags, self.path, lib = load_library("moe_mlp", SOURCE, flags, cache, openmp)
        self.lib = lib  # also holds the quantized entry points (engine.kernels.cpu.quant)
        self._fn = getattr(lib, _SYMBOL)
        p = ctypes.c_void_p
        i64 = ctypes.c_int64
        self._fn.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int]
        self._fn.restype = ctypes.c_int

    def run(self, x: torch.Tensor, offsets: torch.Tensor, route_w: torch.Tensor, w1: torch.Tensor,
            w3: torch.Tensor, w2: torch.Tensor, limit: float, num_threads: int | None = None) -> torch.Tensor:
        """y [N, D] (see the module docstring); threads default to torch.get_num_threads()."""
        n, s, d, i = check_args(x, offsets, route_w, w1, w3, w2, limit)
        y = torch.empty(n, d, dtype=torch.float32)
        a = torch.empty(n, i, dtype=torch.float32)  # route_w * swiglu(...), between the two stages
        threads = torch.get_num_threads() if num_threads is None else num_threads
        rc = self._fn(x.data_ptr(), offsets.data_ptr(), route_w.data_ptr(), w1.data_ptr(), w3.data_ptr(),
                      w2.data_ptr(), a.data_ptr(), y.data_ptr(), n, s, d, i, float(limit), int(threads))
        if rc != 0:
            raise ValueError(f"offsets: must start at 0, never decrease and end at N={n}; got "
                             f"{offsets[:8].tolist()}{'...' if s + 1 > 8 else ''} ending at {int(offsets[-1])}")
        return y
