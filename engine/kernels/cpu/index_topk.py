"""The lightning indexer's streamed top-k on CPU, as one C call (float32; source and loop in `index_topk_src`).

`IndexTopkKernel().run(q, w, pool, table, n_visible, k)` -> (values [n, k], indices [n, k]): for every query t
the k entries i < n_visible[t] with the highest sum_h w[t, h] * relu(q[t, h] . K[i]), entry i being
pool[table[i // per_page], i % per_page]. Unordered; value -inf (index 0) where fewer than k are visible. The
plain-torch twin is `engine.model.indexer_topk.topk_streamed` (tests compare the two).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

from engine.kernels.cpu.build import DEFAULT_FLAGS, KernelBuildError
from engine.kernels.cpu.index_topk_src import SOURCE
from engine.kernels.cpu.moe_mlp import load_library

_SYMBOL = "megaserve_index_topk"
HEAD_GROUP = 16  # heads per group of accumulators in the kernel: heads are padded (w = 0) to a multiple

log = logging.getLogger(__name__)


class IndexTopkKernel:
    """The compiled kernel. `openmp`: run query blocks on torch's libgomp pool (None: when torch uses libgomp),
    else serially. Raises KernelBuildError."""

    def __init__(self, flags: tuple[str, ...] = DEFAULT_FLAGS, cache: Path | None = None,
                 openmp: bool | None = None) -> None:
        self.openmp, self.flags, self.path, self.lib = load_library("index_topk", SOURCE, flags, cache, openmp)
        self._fn = getattr(self.lib, _SYMBOL)
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fn.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, p, p, ctypes.c_int]
        self._fn.restype = ctypes.c_int

    def run(self, q: torch.Tensor, w: torch.Tensor, pool: torch.Tensor, table: torch.Tensor,
            n_visible: torch.Tensor, k: int, num_threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [n, H, d], w [n, H] (scale folded in), pool [pages, per_page, d] float32, table [>= pages used] long,
        n_visible [n] long -> (values [n, k] float32, indices [n, k] long)."""
        n, h, d = q.shape
        if pool.dtype != torch.float32 or pool.dim() != 3 or pool.shape[2] != d or not pool.is_contiguous():
            raise ValueError(f"pool: expected a contiguous float32 [pages, per_page, {d}], got {pool.dtype} "
                             f"{tuple(pool.shape)}")
        if tuple(w.shape) != (n, h) or tuple(n_visible.shape) != (n,):
            raise ValueError(f"w {tuple(w.shape)} / n_visible {tuple(n_visible.shape)} do not match q {(n, h, d)}")
        per_page = pool.shape[1]
        vmax = int(n_visible.max()) if n else 0
        if vmax > table.shape[0] * per_page:
            raise ValueError(f"{vmax} entries visible, the page table holds {table.shape[0] * per_page}")
        hp = -(-h // HEAD_GROUP) * HEAD_GROUP
        qf = torch.zeros(n, hp, d, dtype=torch.float32)
        wf = torch.zeros(n, hp, dtype=torch.float32)
        qf[:, :h], wf[:, :h] = q, w
        qf = qf.view(n, hp // HEAD_GROUP, HEAD_GROUP, d).transpose(2, 3).contiguous()  # the kernel's layout
        table = table.to(torch.long).contiguous()
        nv = n_visible.to(torch.long).contiguous()
        vals = torch.empty(n, k, dtype=torch.float32)
        idx = torch.empty(n, k, dtype=torch.long)
        threads = torch.get_num_threads() if num_threads is None else num_threads
        rc = self._fn(qf.data_ptr(), wf.data_ptr(), pool.data_ptr(), table.data_ptr(), nv.data_ptr(), n, hp, d,
                      per_page, k, vals.data_ptr(), idx.data_ptr(), int(threads))
        if rc != 0:
            raise RuntimeError(f"{_SYMBOL} failed (rc {rc})")
        return vals, idx


@functools.cache
def default_index_topk() -> IndexTopkKernel | None:
    """The kernel for this machine, or None (disabled by MEGASERVE_CPU_KERNELS=0, or it failed to build: one
    warning; callers use the torch path)."""
    if os.environ.get("MEGASERVE_CPU_KERNELS", "1").strip() == "0":
        return None
    errors = []
    for openmp in (None, False):
        try:
            return IndexTopkKernel(openmp=openmp)
        except (KernelBuildError, OSError, AttributeError) as e:
            errors.append(str(e))
    log.warning("CPU index_topk kernel unavailable, the indexer uses the torch path: %s", errors[-1])
    return None
