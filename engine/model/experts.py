"""The routed experts of one MoE layer (v4-model.md §4.2): stacked SwiGLU experts and their one batched path.

Every caller (`RoutedExperts.forward`, EP's `forward_slots`, the static decode step) goes through
`RoutedExperts.run_assigned`: the (token, k) assignments sorted by slot once (argsort; counts by scatter_add_,
offsets by cumsum: no host read), then one `run_sorted(x_sorted, offsets, route_w)`, which runs the path that
`engine.kernels.select.select_expert_path` picks. With `sync_free=True` only paths that never read the counts on
the host are picked (the static decode step, CUDA graphs). `RoutedExperts._forward_loop` is the plain reference.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.cpu import moe_mlp, moe_mlp_available, quant_kernels
from engine.kernels.select import (
    KERNEL_MAX_ROWS,
    dequantize,
    select_assigned_path,
    select_expert_path,
    triton_kernels,
)
from engine.model import weight_format
from engine.model.config import ModelConfig
from engine.model.layers import frozen_parameter

WeightsOf = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(g, limit)) * clamp(u, -limit, limit) (§4.2), in the inputs' dtype."""
    return F.silu(g.clamp(max=limit)) * u.clamp(min=-limit, max=limit)


def swiglu_(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """`swiglu` in place in g (u is clamped in place too); same values, no temporaries. Returns g."""
    F.silu(g.clamp_(max=limit), inplace=True)
    return g.mul_(u.clamp_(min=-limit, max=limit))


def grouped_mm_runs(x: torch.Tensor, w_dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """torch._grouped_mm takes these operands: CPU float32/bfloat16, CUDA bfloat16; weights of `w_dtype` whose
    rows (`dims`: the logical I and D) are 16-byte aligned."""
    ok_dtype = w_dtype in (torch.float32, torch.bfloat16) if x.device.type == "cpu" else w_dtype == torch.bfloat16
    return hasattr(torch, "_grouped_mm") and ok_dtype and all(s * w_dtype.itemsize % 16 == 0 for s in dims)


class RoutedExperts(nn.Module):
    """The routed experts a rank holds, stacked; every forward sorts the assignments by slot and runs `run_sorted`.

    Under EP `local_experts` has one entry per physical slot (repeats allowed) and `forward_slots` is used.
    Weights: `w1`, `w3` [S, I, D] and `w2` [S, D, I] in the model dtype (dense), or under native formats
    packed MXFP4 (int8 [S, I, D/2], `w1_scale` E8M0 [S, I, D/32], ...) or FP8 (e4m3 [S, I, D], `w1_scale`
    [S, ceil(I/128), ceil(D/128)], ...); `fmt` says which. `slot_tensors()` lists every per-slot tensor.
    Which path runs: engine.kernels.select.select_expert_path.
    """

    # Crossover measured on the 2-core Zen4 (small preset, 32 slots of n rows, interleaved repeats, medians of
    # per-core CPU time): the kernel, which streams each weight row once per 12 rows of a slot, takes 0.55x
    # MKL's time at 12 rows, 0.8x at 20, ties at 28-32, and 1.1x at 40-48. Under 32 rows it runs the kernel
    # (it also degrades far less than 2-thread MKL when the cores are shared).
    KERNEL_MAX_ROWS = KERNEL_MAX_ROWS

    def __init__(self, cfg: ModelConfig, local_experts: list[int], dtype: torch.dtype) -> None:
        super().__init__()
        d, inter = cfg.hidden_size, cfg.moe_intermediate_size
        e = len(local_experts)
        self.limit = cfg.swiglu_limit
        self.n_experts = cfg.n_routed_experts
        self.local_experts = list(local_experts)
        g2l = torch.full((cfg.n_routed_experts,), -1, dtype=torch.int64)
        self.unique = len(set(self.local_experts)) == e
        if self.unique:
            g2l[torch.tensor(self.local_experts, dtype=torch.int64)] = torch.arange(e)
        self.register_buffer("g2l", g2l, persistent=False)
        formats = weight_format.current()
        self.fmt = formats.experts
        self.compute_dtype = dtype
        shapes = {"w1": (inter, d), "w3": (inter, d), "w2": (d, inter)}
        for name, (rows, k) in shapes.items():
            if self.fmt == "dense":
                setattr(self, name, nn.Parameter(torch.zeros(e, rows, k, dtype=dtype)))
                continue
            sdt = weight_format.SCALE_DTYPES[formats.expert_scale]
            if self.fmt == "fp4":
                w, sc = torch.zeros(e, rows, k // 2, dtype=torch.int8), torch.zeros(e, rows, k // 32, dtype=sdt)
            else:
                w = torch.zeros(e, rows, k, dtype=torch.float8_e4m3fn)
                sc = torch.zeros(e, -(-rows // 128), -(-k // 128), dtype=sdt)
            setattr(self, name, frozen_parameter(w))
            setattr(self, f"{name}_scale", frozen_parameter(sc))

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor stacked per slot ([S, ...]): the weights and, when quantized, their scales."""
        names = ("w1", "w3", "w2") if self.fmt == "dense" else ("w1", "w3", "w2", "w1_scale", "w3_scale", "w2_scale")
        return {n: getattr(self, n) for n in names}

    def _scale(self, name: str) -> torch.Tensor | None:
        return getattr(self, f"{name}_scale", None)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the torch paths multiply in: the dense weights' own, the compute dtype for quantized ones."""
        return self.w1.dtype if self.fmt == "dense" else self.compute_dtype

    def expert_weight(self, name: str, slot: int, dtype: torch.dtype) -> torch.Tensor:
        """Slot `slot`'s `name` ("w1", "w3", "w2") as a dense [rows, K] tensor in `dtype` (torch dequantizer)."""
        w = getattr(self, name)[slot]
        if self.fmt == "dense":
            return w.to(dtype)
        return dequantize(w, self._scale(name)[slot], self.fmt, dtype)

    # ---- the entry points: all of them sort once and run `run_sorted` -------------------------------------------
    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_idx: torch.Tensor,
                sync_free: bool = False) -> torch.Tensor:
        """x [T, D]; topk_* [T, k] over global expert ids -> sum_k w_k * E_k(x) over local experts: [T, D].

        The routing weight multiplies the SwiGLU output before w2, in fp32 (§4.2). `_forward_loop` is the plain
        reference it is tested against."""
        if not self.unique:
            raise RuntimeError("these routed experts hold replicated slots (EP): use forward_slots")
        return self.run_assigned(x, topk_weights, self.g2l[topk_idx], sync_free)

    def forward_slots(self, x: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor,
                      sync_free: bool = False) -> torch.Tensor:
        """EP: rows x [N, D] received for local slots `slot [N]` with routing weights [N] -> [N, D].

        Row i is weight_i * Expert_{slot_i}(x_i), weight applied before w2 as in `forward`.
        """
        return self.run_assigned(x, weight.unsqueeze(1), slot.unsqueeze(1), sync_free)

    def run_assigned(self, x: torch.Tensor, topk_weights: torch.Tensor, local: torch.Tensor,
                     sync_free: bool = False) -> torch.Tensor:
        """x [T, D], topk_weights [T, k], local [T, k] slot of each assignment (-1: not held here) -> [T, D] in
        x's dtype: the sum of w * Expert_slot(x) over the held assignments.

        Sorted by slot once (stable argsort, counts by scatter_add_, offsets by cumsum). With `sync_free` nothing is
        read on the host: the assignments not held here ride in the last slot with weight 0 and every shape is
        T*k. Otherwise the counts are read once and those rows are left out."""
        t, k = local.shape
        if t == 0 or k == 0:  # e.g. EP: no row came to this rank (a shape, known on the host)
            return torch.zeros_like(x)
        n_slots = self.w1.shape[0]
        grad = torch.is_grad_enabled() and (x.requires_grad or self.w1.requires_grad)
        if select_assigned_path(x.device.type, self._kernel_usable(x), t, grad) == "kernel_topk":
            y = quant_kernels().moe_topk(x.contiguous(), local.contiguous(), topk_weights.float().contiguous(),
                                         self.w1, self._scale("w1"), self.w3, self._scale("w3"), self.w2,
                                         self._scale("w2"), self.fmt, self.limit)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        flat = local.reshape(-1)
        held = flat >= 0
        key = torch.where(held, flat, n_slots - 1 if sync_free else n_slots)  # not held: last slot, or past it
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(n_slots + 1, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        offsets = torch.zeros(n_slots + 2, dtype=torch.int64, device=x.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        route_w = torch.where(held, topk_weights.reshape(-1).float(), 0.0)
        host = None
        if not sync_free:
            host = counts[:n_slots].tolist()  # the one host read of the host-sync paths
            n = sum(host)
            if n == 0:
                return torch.zeros_like(x)
            order = order[:n]
        tok = order // k if k > 1 else order
        y = self.run_sorted(x.index_select(0, tok), offsets[:n_slots + 1], route_w.index_select(0, order),
                            sync_free=sync_free, counts=host)
        out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tok, y)
        return out.to(x.dtype)

    def run_sorted(self, x_sorted: torch.Tensor, offsets: torch.Tensor, route_w: torch.Tensor,
                   sync_free: bool = False, counts: list[int] | None = None) -> torch.Tensor:
        """Rows already grouped by slot: x_sorted [N, D], offsets int64 [S+1] (rows offsets[s]:offsets[s+1] go to
        slot s, offsets[-1] == N), route_w [N] -> [N, D] float32, row i = route_w[i] * Expert_s(x_sorted[i]).

        The path: `select_expert_path` (engine.kernels.select). `counts`: the rows per slot when the caller has
        read them on the host; with `sync_free` they are not read and only paths that never read them run."""
        route_w = route_w.float().contiguous()
        if counts is None and not sync_free:
            counts = (offsets[1:] - offsets[:-1]).tolist()
        # Under autograd the reference runs: the fast paths write into reused buffers and the kernels have no
        # backward, so the expert weights and the input get their gradients only there.
        grad = torch.is_grad_enabled() and (x_sorted.requires_grad or self.w1.requires_grad)
        path = select_expert_path(
            x_sorted.device.type, self.fmt, x_sorted.dtype,
            None if counts is None else max(counts), None if counts is None else sum(c > 0 for c in counts),
            self.w1.shape[0], cpu_kernel=self._kernel_usable(x_sorted), grad=grad,
            grouped_mm=grouped_mm_runs(x_sorted, self.weight_dtype, (self.w1.shape[1], self.w2.shape[1])),
            rows=x_sorted.shape[0])
        if path == "reference":
            cnt = (offsets[1:] - offsets[:-1]) if counts is None else torch.tensor(counts, device=x_sorted.device)
            row_slot = torch.repeat_interleave(torch.arange(cnt.numel(), device=cnt.device), cnt,
                                               output_size=x_sorted.shape[0])
            return self._forward_loop(x_sorted, route_w[:, None], row_slot, cnt).float()
        if path == "triton":
            tk = triton_kernels()
            ends = offsets[1:]  # cumulative row ends, as torch._grouped_mm's offs
            a = tk.moe_grouped_gemm(x_sorted, self.w1, ends, w_scale=self._scale("w1"), w3=self.w3,
                                    w3_scale=self._scale("w3"), swiglu_limit=self.limit, row_weight=route_w)
            return tk.moe_grouped_gemm(a, self.w2, ends, w_scale=self._scale("w2")).float()
        if path == "kernel":
            return self._kernel_call(x_sorted.contiguous(), offsets, route_w)
        if path == "grouped_mm":
            return self._experts_grouped_mm(x_sorted, offsets, route_w)
        if path == "padded":
            return self._experts_padded(x_sorted, offsets, route_w, x_sorted.shape[0] if counts is None
                                        else max(counts))
        out = torch.empty(x_sorted.shape[0], x_sorted.shape[1], dtype=torch.float32, device=x_sorted.device)
        min_rows = 0
        if path == "kernel+sorted":
            min_rows = self.KERNEL_MAX_ROWS
            self._experts_kernel(x_sorted, counts, route_w, out)
        self._experts_sorted(x_sorted, counts, route_w, out, min_rows)
        return out

    # ---- the paths --------------------------------------------------------------------------------------------
    def _kernel_usable(self, x: torch.Tensor) -> bool:
        """The C kernel takes fp32 CPU activations and contiguous CPU weights (fp32, or quantized with K a
        multiple of 32), and must have compiled on this machine."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or self.w1.device.type != "cpu":
            return False
        if not (self.w1.is_contiguous() and self.w3.is_contiguous() and self.w2.is_contiguous()):
            return False
        if self.fmt == "dense":
            return self.w1.dtype == torch.float32 and moe_mlp_available()
        return self.w2.shape[1] % 32 == 0 and self.w1.shape[1] % 32 == 0 and moe_mlp_available()

    def _kernel_call(self, xs: torch.Tensor, offsets: torch.Tensor, route_w: torch.Tensor) -> torch.Tensor:
        """One C call over rows grouped by slot (fp32 or quantized weights); it reads `offsets` itself."""
        if self.fmt == "dense":
            return moe_mlp(xs, offsets, route_w, self.w1, self.w3, self.w2, self.limit)
        return quant_kernels().moe_mlp(xs, offsets, route_w, self.w1, self.w1_scale, self.w3, self.w3_scale,
                                       self.w2, self.w2_scale, self.fmt, self.limit)

    def _experts_kernel(self, xs: torch.Tensor, counts: list[int], route_w: torch.Tensor,
                        out: torch.Tensor) -> None:
        """The rows of the slots under KERNEL_MAX_ROWS rows (sorted by slot) through one C kernel call into out."""
        small = [c if c < self.KERNEL_MAX_ROWS else 0 for c in counts]
        if not any(small):
            return
        rows = torch.tensor([r for s, c in zip(_starts(counts), small, strict=True) for r in range(s, s + c)],
                            dtype=torch.int64, device=xs.device)
        y = self._kernel_call(xs.index_select(0, rows), _offsets(small, xs.device), route_w.index_select(0, rows))
        out.index_copy_(0, rows, y)

    def _experts_sorted(self, xs: torch.Tensor, counts: list[int], route_w: torch.Tensor, out: torch.Tensor,
                        min_rows: int = 0) -> None:
        """out[r] = route_w[r] * Expert_s(xs[r]) (fp32) for rows r sorted by slot s, slot after slot.

        Slots with fewer than `min_rows` rows are skipped (the kernel ran them). Each slot's rows are one
        contiguous block of xs and of out: w1/w3 into two reused [max_count, I] buffers, the SwiGLU and routing
        weight in place, w2 straight into out. Reused buffers keep the working set in cache and avoid fresh
        large allocations (page faults). Quantized weights are dequantized one slot at a time into reused
        scratch (the C dequantizer where the kernel is built, else torch)."""
        wdt = self.weight_dtype
        fp32 = wdt == torch.float32 and xs.dtype == torch.float32
        cmax = max(c for c in counts if c >= min_rows)
        if fp32:
            hbuf = xs.new_empty(cmax, self.w1.shape[1])
            ubuf = xs.new_empty(cmax, self.w1.shape[1])
        weight = self._slot_weights(xs, wdt)
        for e, (start, cnt) in enumerate(zip(_starts(counts), counts, strict=True)):
            if cnt == 0 or cnt < min_rows:
                continue
            end = start + cnt
            w1, w3, w2 = weight(e)
            if fp32:
                xe = xs[start:end]
                h = torch.mm(xe, w1.t(), out=hbuf[:cnt])
                u = torch.mm(xe, w3.t(), out=ubuf[:cnt])
            else:
                xe = xs[start:end].to(wdt)
                h = torch.mm(xe, w1.t()).float()
                u = torch.mm(xe, w3.t()).float()
            swiglu_(h, u, self.limit).mul_(route_w[start:end, None])
            if fp32:
                torch.mm(h, w2.t(), out=out[start:end])
            else:
                out[start:end] = torch.mm(h.to(wdt), w2.t())

    def _slot_weights(self, x: torch.Tensor, wdt: torch.dtype) -> WeightsOf:
        """slot -> (w1, w3, w2) dense in `wdt`: views of the stacked weights, or a dequantized copy in scratch."""
        if self.fmt == "dense":
            return lambda e: (self.w1[e], self.w3[e], self.w2[e])
        if self._kernel_usable(x):
            qk = quant_kernels()
            bufs = {n: torch.empty(getattr(self, n).shape[1], getattr(self, n).shape[2] * (2 if self.fmt == "fp4"
                                   else 1), dtype=torch.float32) for n in ("w1", "w3", "w2")}
            return lambda e: tuple(qk.dequant(getattr(self, n)[e], self._scale(n)[e], self.fmt, bufs[n])
                                   for n in ("w1", "w3", "w2"))
        return lambda e: tuple(self.expert_weight(n, e, wdt) for n in ("w1", "w3", "w2"))

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) of every slot, dense in `weight_dtype` (quantized ones dequantized whole, by torch)."""
        if self.fmt == "dense":
            return self.w1, self.w3, self.w2
        return tuple(dequantize(getattr(self, n), self._scale(n), self.fmt, self.compute_dtype)
                     for n in ("w1", "w3", "w2"))

    def _experts_grouped_mm(self, xs: torch.Tensor, offsets: torch.Tensor, route_w: torch.Tensor) -> torch.Tensor:
        """torch._grouped_mm once per projection over the slot groups (reads `offsets` on the device)."""
        w1, w3, w2 = self._stacked()
        wdt = w1.dtype
        xs = xs.to(wdt)
        offs = offsets[1:].to(torch.int32)
        h = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs).float()
        a = swiglu_(h, torch._grouped_mm(xs, w3.transpose(1, 2), offs=offs).float(), self.limit)
        a.mul_(route_w[:, None])
        return torch._grouped_mm(a.to(wdt), w2.transpose(1, 2), offs=offs).float()

    def _experts_padded(self, xs: torch.Tensor, offsets: torch.Tensor, route_w: torch.Tensor,
                        capacity: int) -> torch.Tensor:
        """Rows padded to [S, capacity] (capacity >= the most rows of a slot: N when the counts are not read),
        three bmm's over the stacked weights. Fewer, larger calls than the per-slot loop, where 2-thread MKL
        pays per call; padded rows carry routing weight 0 and are never read back. No host read."""
        w1, w3, w2 = self._stacked()
        wdt = w1.dtype
        n, s = xs.shape[0], w1.shape[0]
        pos = torch.arange(n, device=xs.device)
        slot = torch.searchsorted(offsets[1:], pos, right=True)  # row -> its slot
        at = slot * capacity + pos - offsets[slot]  # its place in [S, capacity]
        xb = xs.new_zeros(s * capacity, xs.shape[1], dtype=wdt).index_copy_(0, at, xs.to(wdt))
        xb = xb.view(s, capacity, -1)
        h = torch.bmm(xb, w1.transpose(1, 2)).float()
        a = swiglu_(h, torch.bmm(xb, w3.transpose(1, 2)).float(), self.limit)
        wb = route_w.new_zeros(s * capacity).index_copy_(0, at, route_w).view(s, capacity, 1)
        y = torch.bmm(a.mul_(wb).to(wdt), w2.transpose(1, 2)).view(s * capacity, -1)
        return y.index_select(0, at).float()

    # ---- the plain reference ----------------------------------------------------------------------------------
    def _forward_loop(self, x: torch.Tensor, topk_weights: torch.Tensor, local: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
        """The plain reference: expert after expert, gather its tokens, MLP, index_add_ into the output
        (quantized weights through the torch dequantizers of engine.weights.formats)."""
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        order = torch.argsort(local, stable=True)
        start = int((local < 0).sum())
        k = topk_weights.shape[1]
        wdt = self.weight_dtype
        for e, cnt in enumerate(counts.tolist()):
            if cnt == 0:
                continue
            sel = order[start:start + cnt]
            start += cnt
            tok = sel // k
            xe = x[tok].to(wdt)
            w1, w3, w2 = (self.expert_weight(n, e, wdt) if self.fmt != "dense" else getattr(self, n)[e]
                          for n in ("w1", "w3", "w2"))
            a = swiglu(F.linear(xe, w1).float(), F.linear(xe, w3).float(), self.limit)
            a = a * topk_weights.flatten()[sel, None]
            out.index_add_(0, tok, F.linear(a.to(wdt), w2).float())
        return out.to(x.dtype)


def _starts(counts: list[int]) -> list[int]:
    """The first row of each slot, rows sorted by slot."""
    return [0, *itertools.accumulate(counts)][:-1]


def _offsets(counts: list[int], device: torch.device) -> torch.Tensor:
    """int64 [S+1]: 0 then the cumulative row ends."""
    return torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int64, device=device)
