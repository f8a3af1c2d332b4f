"""The V4 MoE layer: sqrtsoftplus router (or hash routing), SwiGLU experts with clamp (v4-model.md §4).

Routed experts are stored stacked (`w1/w3: [E_local, I, D]`, `w2: [E_local, D, I]`) for the
experts this rank holds; `local_experts` lists their global (logical) ids.

Expert parallelism: pass an `EPContext` (built by `Transformer(..., ep=EPContext(...))`). The routed experts
are then stored per physical slot of this rank (`local_experts[s]` = logical expert of slot s, which may
repeat when a hot expert has several replicas here), and `MoE.forward` hands router output to the shared
`comm.dispatch.Dispatcher`: tokens travel to the ranks holding their experts (replica = token_index %
logcnt), `RoutedExperts.forward_slots` runs the received rows, results come back. Hash-routed layers take the
same path. Every rank must run every MoE layer, with 0 tokens if it has none.

Load statistics: `MoE.load_recorder` (None by default) gets `record(layer, topk_idx)` for every call, e.g.
a `comm.expert_load.ExpertLoadWindow`; `Transformer.set_load_recorder` sets it on every layer.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from comm.dispatch import Dispatcher, backend_names
from comm.placement import Placement
from engine.kernels.cpu import moe_mlp, moe_mlp_available, quant_kernels
from engine.kernels.select import (
    KERNEL_MAX_ROWS,
    dequantize,
    linear_quantized,
    select_expert_path,
    triton_has,
    triton_kernels,
)
from engine.model import weight_format
from engine.model.config import ModelConfig
from engine.model.layers import Linear, frozen_parameter, linear


@dataclass(frozen=True)
class EPContext:
    """This rank's part in expert parallelism: its rank in the EP group, the placement, the backend.

    `backend`: a registered name (comm.dispatch.backend_names()). `group`: the torch.distributed group of the
    EP ranks (None: the default group). `num_waves`: for `wave` (None: its default). `max_tokens_per_rank` (the
    most tokens one forward passes to a MoE layer) and `capacity` (rows per destination, default
    max_tokens_per_rank x top-k): for `ll`, which needs one of them. Backends ignore the options of others.
    """

    ep_rank: int
    ep_size: int
    placement: Placement
    backend: str = "sync"
    group: Any = None
    num_waves: int | None = None
    max_tokens_per_rank: int | None = None
    capacity: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in backend_names():
            raise ValueError(f"EP backend {self.backend!r}: must be one of {backend_names()}")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank {self.ep_rank} outside [0, ep_size={self.ep_size})")
        if self.placement.ep_size != self.ep_size:
            raise ValueError(f"placement is for ep_size={self.placement.ep_size}, EPContext has {self.ep_size}")

    def dispatcher(self) -> Dispatcher:
        return Dispatcher(self.placement, self.ep_rank, self.ep_size, backend=self.backend, group=self.group,
                          num_waves=self.num_waves, max_tokens_per_rank=self.max_tokens_per_rank,
                          capacity=self.capacity)


class LoadRecorder(Protocol):
    def record(self, layer: int, topk_idx: torch.Tensor) -> None: ...


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(g, limit)) * clamp(u, -limit, limit) (§4.2), in the inputs' dtype."""
    return F.silu(g.clamp(max=limit)) * u.clamp(min=-limit, max=limit)


def swiglu_(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """`swiglu` in place in g (u is clamped in place too); same values, no temporaries. Returns g."""
    F.silu(g.clamp_(max=limit), inplace=True)
    return g.mul_(u.clamp_(min=-limit, max=limit))


class Gate(nn.Module):
    """Router: scores s = sqrt(softplus(x W^T)) in fp32; `s + bias` selects, unbiased `s` weighs (§4.1)."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.topk = cfg.num_experts_per_tok
        self.route_scale = cfg.routed_scaling_factor
        self.norm_topk = cfg.norm_topk_prob
        self.is_hash = cfg.is_hash_layer(layer_id)
        shape = (cfg.n_routed_experts, cfg.hidden_size)
        # BF16 in the checkpoint; the scores are computed in fp32 either way
        self.weight = (frozen_parameter(torch.zeros(shape, dtype=torch.bfloat16)) if weight_format.current().bf16
                       else nn.Parameter(torch.zeros(shape, dtype=torch.float32)))
        if self.is_hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.int64))
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D], input_ids [T] -> (topk_weights [T, k] f32, topk_idx [T, k] int64)."""
        logits = (linear(x.float(), self.weight) if self.weight.dtype == torch.float32
                  else linear_quantized(x.float(), self.weight, None, "bf16", torch.float32))
        scores = torch.sqrt(F.softplus(logits))  # [T, E]
        if self.is_hash:
            topk_idx = self.tid2eid[input_ids]  # hash layers: the token id picks the experts
        else:
            topk_idx = torch.topk(scores + self.bias, self.topk, dim=-1).indices
        w = scores.gather(1, topk_idx)
        if self.norm_topk:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.route_scale, topk_idx


class Expert(nn.Module):
    """One SwiGLU MLP (the shared expert): w2(swiglu(w1 x, w3 x))."""

    def __init__(self, dim: int, inter: int, limit: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter, dtype)
        self.w2 = Linear(inter, dim, dtype)
        self.w3 = Linear(dim, inter, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """w2(swiglu(w1 x, w3 x)): the SwiGLU in fp32, in place in the two fresh projections."""
        return self.w2(swiglu_(self.w1(x).float(), self.w3(x).float(), self.limit).to(x.dtype))


class RoutedExperts(nn.Module):
    """The routed experts a rank holds, stacked; `forward` runs them over assignments sorted by slot.

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

    def expert_weight(self, name: str, slot: int, dtype: torch.dtype) -> torch.Tensor:
        """Slot `slot`'s `name` ("w1", "w3", "w2") as a dense [rows, K] tensor in `dtype` (torch dequantizer)."""
        w = getattr(self, name)[slot]
        if self.fmt == "dense":
            return w.to(dtype)
        return dequantize(w, self._scale(name)[slot], self.fmt, dtype)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """x [T, D]; topk_* [T, k] over global expert ids -> sum_k w_k * E_k(x) over local experts: [T, D].

        The routing weight multiplies the SwiGLU output before w2, in fp32 (§4.2). Runs `_grouped`;
        `_forward_loop` is the plain reference it is tested against.
        """
        if not self.unique:
            raise RuntimeError("these routed experts hold replicated slots (EP): use forward_slots")
        local = self.g2l[topk_idx].flatten()  # [T*k], -1 where the expert is not on this rank
        counts = torch.bincount(local[local >= 0], minlength=len(self.local_experts))
        return self._grouped(x, topk_weights, local, counts)

    def forward_slots(self, x: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """EP: rows x [N, D] received for local slots `slot [N]` with routing weights [N] -> [N, D].

        Row i is weight_i * Expert_{slot_i}(x_i), weight applied before w2 as in `forward`.
        """
        counts = torch.bincount(slot, minlength=len(self.local_experts))
        return self._grouped(x, weight.unsqueeze(1), slot, counts)

    def run_sorted(self, x_sorted: torch.Tensor, offsets: torch.Tensor, route_w: torch.Tensor) -> torch.Tensor:
        """Rows already grouped by slot: x_sorted [N, D], offsets int64 [S+1] (rows offsets[s]:offsets[s+1] go to
        slot s), route_w [N] -> [N, D] float32, row i = route_w[i] * Expert_s(x_sorted[i]).

        The C kernel (CPU) and Triton (CUDA) read `offsets` themselves: no host sync, static shapes. Without
        either, the torch per-slot loop (which reads the counts on the host)."""
        route_w = route_w.float().contiguous()
        if x_sorted.device.type == "cuda" and self.fmt in ("dense", "fp4") and triton_has("moe_grouped_gemm"):
            tk = triton_kernels()
            ends = offsets[1:]  # cumulative row ends, as torch._grouped_mm's offs
            a = tk.moe_grouped_gemm(x_sorted, self.w1, ends, w_scale=self._scale("w1"), w3=self.w3,
                                    w3_scale=self._scale("w3"), swiglu_limit=self.limit, row_weight=route_w)
            return tk.moe_grouped_gemm(a, self.w2, ends, w_scale=self._scale("w2")).float()
        if self._kernel_usable(x_sorted):
            return self._kernel_call(x_sorted.contiguous(), offsets, route_w)
        out = torch.zeros(x_sorted.shape[0], x_sorted.shape[1], dtype=torch.float32, device=x_sorted.device)
        counts = (offsets[1:] - offsets[:-1])
        tok = torch.arange(x_sorted.shape[0], device=x_sorted.device)
        self._experts_sorted(x_sorted, tok, counts.tolist(), route_w, out)
        return out

    def _grouped(self, x: torch.Tensor, topk_weights: torch.Tensor, local: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
        """Assignments sorted by slot once, then the path `select_expert_path` picks (engine.kernels.select);
        the C kernel runs the slots under KERNEL_MAX_ROWS rows and torch mm's the rest, into one fp32 output."""
        n = int(counts.sum())
        if n == 0:
            return torch.zeros_like(x)
        grad = torch.is_grad_enabled() and (x.requires_grad or self.w1.requires_grad)
        # Under autograd the reference runs: the fast paths write into reused buffers and the kernels have no
        # backward, so the expert weights and the input get their gradients only there.
        path = select_expert_path(x.device.type, self.fmt, x.dtype, int(counts.max()), int((counts > 0).sum()),
                                  counts.numel(), cpu_kernel=self._kernel_usable(x), grad=grad)
        if path == "reference":
            return self._forward_loop(x, topk_weights, local, counts)
        k = topk_weights.shape[1]
        sel = torch.argsort(local, stable=True)[local.numel() - n:]  # -1 (not on this rank) sorts first
        tok = sel // k if k > 1 else sel
        route_w = topk_weights.reshape(-1).index_select(0, sel).float()
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        if path == "triton":
            offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=x.device)
            torch.cumsum(counts, 0, out=offsets[1:])
            out.index_add_(0, tok, self.run_sorted(x.index_select(0, tok), offsets, route_w))
            return out.to(x.dtype)
        if path == "padded":
            self._experts_padded(x, tok, counts, route_w, out)
            return out.to(x.dtype)
        min_rows = 0
        if path == "kernel":
            small = counts < self.KERNEL_MAX_ROWS
            if bool(small.any()):
                self._experts_kernel(x, tok, counts, small, route_w, out)
                min_rows = self.KERNEL_MAX_ROWS
        if min_rows == 0 or int(counts.max()) >= min_rows:
            self._experts_sorted(x, tok, counts.tolist(), route_w, out, min_rows)
        return out.to(x.dtype)

    def _experts_padded(self, x: torch.Tensor, tok: torch.Tensor, counts: torch.Tensor, route_w: torch.Tensor,
                        out: torch.Tensor) -> None:
        """Torch fallback for few rows in most slots (decode without the kernel, dense weights): rows padded to
        [S, max_count], three bmm's over the stacked weights. Fewer, larger calls than the per-slot loop, where
        2-thread MKL pays per call; padded rows carry routing weight 0 and are never read back."""
        w1, w3, w2 = self.w1, self.w3, self.w2
        wdt = w1.dtype
        s = counts.numel()
        row_slot = torch.repeat_interleave(torch.arange(s, device=counts.device), counts)
        pos = torch.arange(tok.numel(), device=tok.device) - (torch.cumsum(counts, 0) - counts)[row_slot]
        xb = x.new_zeros(s, int(counts.max()), x.shape[1], dtype=wdt)
        xb[row_slot, pos] = x.index_select(0, tok).to(wdt)
        h = torch.bmm(xb, w1.transpose(1, 2)).float()
        a = swiglu_(h, torch.bmm(xb, w3.transpose(1, 2)).float(), self.limit)
        wb = route_w.new_zeros(s, xb.shape[1], 1)
        wb[row_slot, pos, 0] = route_w
        y = torch.bmm(a.mul_(wb).to(wdt), w2.transpose(1, 2))
        out.index_add_(0, tok, y[row_slot, pos].float())

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
        """One C call over rows grouped by slot (fp32 or quantized weights)."""
        if self.fmt == "dense":
            return moe_mlp(xs, offsets, route_w, self.w1, self.w3, self.w2, self.limit)
        return quant_kernels().moe_mlp(xs, offsets, route_w, self.w1, self.w1_scale, self.w3, self.w3_scale,
                                       self.w2, self.w2_scale, self.fmt, self.limit)

    def _experts_kernel(self, x: torch.Tensor, tok: torch.Tensor, counts: torch.Tensor, small: torch.Tensor,
                        route_w: torch.Tensor, out: torch.Tensor) -> None:
        """The rows of the `small` slots (rows sorted by slot as in `_experts_sorted`) through the C kernel."""
        cnt = counts
        if not bool(small.all()):  # keep only the rows of the small slots (still sorted by slot)
            row_slot = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
            rows = torch.nonzero(small[row_slot]).flatten()
            tok, route_w = tok[rows], route_w[rows]
            cnt = torch.where(small, counts, 0)
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
        torch.cumsum(cnt, 0, out=offsets[1:])
        out.index_add_(0, tok, self._kernel_call(x.index_select(0, tok), offsets, route_w.contiguous()))

    def _experts_sorted(self, x: torch.Tensor, tok: torch.Tensor, counts: list[int], route_w: torch.Tensor,
                        out: torch.Tensor, min_rows: int = 0) -> None:
        """Adds route_w[r] * Expert_s(x[tok[r]]) into out[tok[r]] (fp32) for rows r sorted by slot s.

        Slot after slot over its `counts[s]` rows (slots with fewer than `min_rows` are skipped: the kernel
        ran them): gather them into a reused buffer, w1/w3 into two more [max_count, I] buffers, the SwiGLU
        and routing weight in place, w2, one index_add_. Reused buffers keep the working set in cache and
        avoid fresh large allocations (page faults). Quantized weights are dequantized one slot at a time
        into reused scratch (the C dequantizer where the kernel is built, else torch).
        """
        wdt = self.w1.dtype if self.fmt == "dense" else self.compute_dtype
        fp32 = wdt == torch.float32 and x.dtype == torch.float32
        cmax = max(counts)
        inter, dim = self.w1.shape[1], x.shape[1]
        if fp32:
            xbuf = x.new_empty(cmax, dim)
            hbuf = x.new_empty(cmax, inter)
            ubuf = x.new_empty(cmax, inter)
            ybuf = x.new_empty(cmax, dim)
        weight = self._slot_weights(x, wdt)
        start = 0
        for e, cnt in enumerate(counts):
            end = start + cnt
            if cnt == 0 or cnt < min_rows:
                start = end
                continue
            tok_e = tok[start:end]
            w1, w3, w2 = weight(e)
            if fp32:
                xe = torch.index_select(x, 0, tok_e, out=xbuf[:cnt])
                h = torch.mm(xe, w1.t(), out=hbuf[:cnt])
                u = torch.mm(xe, w3.t(), out=ubuf[:cnt])
            else:
                xe = x.index_select(0, tok_e).to(wdt)
                h = torch.mm(xe, w1.t()).float()
                u = torch.mm(xe, w3.t()).float()
            swiglu_(h, u, self.limit).mul_(route_w[start:end, None])
            if fp32:
                y = torch.mm(h, w2.t(), out=ybuf[:cnt])
            else:
                y = torch.mm(h.to(wdt), w2.t()).float()
            out.index_add_(0, tok_e, y)
            start = end

    def _slot_weights(self, x: torch.Tensor, wdt: torch.dtype):
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

    def _forward_loop(self, x: torch.Tensor, topk_weights: torch.Tensor, local: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
        """The plain reference: expert after expert, gather its tokens, MLP, index_add_ into the output
        (quantized weights through the torch dequantizers of engine.weights.formats)."""
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        order = torch.argsort(local, stable=True)
        start = int((local < 0).sum())
        k = topk_weights.shape[1]
        wdt = self.w1.dtype if self.fmt == "dense" else self.compute_dtype
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


class MoE(nn.Module):
    """y = sum_k w_k Expert_{idx_k}(x) + SharedExpert(x); every layer of V4 is MoE."""

    def __init__(self, cfg: ModelConfig, layer_id: int, local_experts: list[int], dtype: torch.dtype,
                 dispatcher: Dispatcher | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.dispatcher = dispatcher  # EP: shared by every MoE layer of the model
        self.load_recorder: LoadRecorder | None = None
        self.gate = Gate(cfg, layer_id)
        self.experts = RoutedExperts(cfg, local_experts, dtype)
        self.shared_experts = (
            Expert(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.swiglu_limit, dtype)
            if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, sync_free: bool = False) -> torch.Tensor:
        """x [T, D] (after ffn_norm), input_ids [T] (hash layers route by token id) -> [T, D].

        `sync_free` (the static decode step): routing by sort into one grouped GEMM (`routed_sync_free`), with no
        host read and no data-dependent shape."""
        topk_weights, topk_idx = self.gate(x, input_ids)
        if self.load_recorder is not None:
            self.load_recorder.record(self.layer_id, topk_idx)
        if self.dispatcher is not None:
            run = (lambda rows, slot, w: routed_sync_free(self.experts, rows, w[:, None], slot[:, None])) \
                if sync_free else self.experts.forward_slots
            return self.dispatcher(self.layer_id, x, topk_idx, topk_weights, run, self.shared_experts)
        if sync_free:
            y = routed_sync_free(self.experts, x, topk_weights, self.experts.g2l[topk_idx])
        else:
            y = self.experts(x, topk_weights, topk_idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def forward_steps(self, x: torch.Tensor, input_ids: torch.Tensor,
                      token_offset: int = 0) -> Generator[None, None, torch.Tensor]:
        """EP, model-level two-batch overlap: `forward` as a generator that yields while this micro-batch's
        tokens travel (the caller runs the other micro-batch) and again while its results travel back (the
        shared expert runs before that second yield). Returns the same [T, D] as `forward`."""
        if self.dispatcher is None:
            raise RuntimeError("forward_steps needs an EP model (a dispatcher)")
        topk_weights, topk_idx = self.gate(x, input_ids)
        if self.load_recorder is not None:
            self.load_recorder.record(self.layer_id, topk_idx)
        fl = self.dispatcher.begin(self.layer_id, x, topk_idx, topk_weights, token_offset)
        yield
        fl.run_experts(self.experts.forward_slots)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        yield
        y = self.dispatcher.finish(fl)
        return y if shared is None else y + shared


# ---- the sync-free routed path (static decode step) -------------------------------------------------------------
def routed_sync_free(experts: RoutedExperts, x: torch.Tensor, topk_weights: torch.Tensor,
                     local: torch.Tensor) -> torch.Tensor:
    """x [T, D], topk_weights [T, k], local [T, k] slot of each assignment (-1: not held here) -> [T, D]: the sum
    of w * Expert_slot(x) over the held assignments, like `RoutedExperts.forward` / `forward_slots`.

    Sorted by slot once, grouped by a fixed-size count (scatter_add, not bincount), one grouped GEMM per
    projection (`grouped_swiglu`). Assignments not held here ride in the last slot's group with weight 0, so every
    row is computed and every shape is T*k. No host read anywhere (the static decode step and CUDA graphs)."""
    t, k = local.shape
    n_slots = experts.w1.shape[0]
    if t == 0:  # EP: no row came to this rank (a shape, known on the host)
        return torch.zeros_like(x)
    local = local.reshape(-1)
    held = local >= 0
    key = torch.where(held, local, n_slots - 1)
    weight = torch.where(held, topk_weights.reshape(-1).float(), 0.0)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(n_slots, dtype=torch.int64, device=x.device).scatter_add_(0, key, torch.ones_like(key))
    ends = torch.cumsum(counts, 0)
    tok = order // k if k > 1 else order
    if experts.fmt == "dense":
        y = grouped_swiglu(x.index_select(0, tok), ends, counts, weight.index_select(0, order),
                           experts.w1, experts.w3, experts.w2, experts.limit)
    else:  # native FP4/FP8 slots: the kernels read the offsets themselves (C on CPU, Triton on CUDA)
        offsets = torch.cat([ends.new_zeros(1), ends])
        y = experts.run_sorted(x.index_select(0, tok), offsets, weight.index_select(0, order))
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tok, y)
    return out.to(x.dtype)


def _grouped_mm_runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm takes these operands: CPU float32/bfloat16, CUDA bfloat16; 16-byte aligned rows."""
    ok_dtype = w.dtype in (torch.float32, torch.bfloat16) if x.device.type == "cpu" else w.dtype == torch.bfloat16
    return (hasattr(torch, "_grouped_mm") and ok_dtype and x.dtype == w.dtype
            and all(s * w.element_size() % 16 == 0 for s in w.shape[1:]))


def grouped_swiglu(xs: torch.Tensor, ends: torch.Tensor, counts: torch.Tensor, route_w: torch.Tensor,
                   w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, limit: float) -> torch.Tensor:
    """Rows xs [N, D] sorted by slot (slot s owns rows ends[s]-counts[s] .. ends[s]-1, ends[-1] == N) ->
    route_w[r] * w2_s(swiglu(w1_s x_r, w3_s x_r)) [N, D] float32, the SwiGLU and routing weight in fp32 (§4.2).

    `torch._grouped_mm` where it runs; otherwise a fixed-capacity batched matmul (each slot padded to N rows: a
    fallback for small batches, e.g. float32 on CUDA; the Triton kernel replaces it there)."""
    wdt = w1.dtype
    xs = xs.to(wdt)
    if _grouped_mm_runs(xs, w1):
        offs = ends.to(torch.int32)
        h = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs).float()
        a = swiglu_(h, torch._grouped_mm(xs, w3.transpose(1, 2), offs=offs).float(), limit)
        a.mul_(route_w[:, None])
        return torch._grouped_mm(a.to(wdt), w2.transpose(1, 2), offs=offs).float()
    n, s = xs.shape[0], w1.shape[0]
    slot = torch.searchsorted(ends, torch.arange(n, device=xs.device), right=True)  # row -> its slot
    at = slot * n + torch.arange(n, device=xs.device) - (ends - counts)[slot]  # its place in [S, N]
    xb = xs.new_zeros(s * n, xs.shape[1]).index_copy_(0, at, xs).view(s, n, -1)
    h = torch.bmm(xb, w1.transpose(1, 2)).float()
    a = swiglu_(h, torch.bmm(xb, w3.transpose(1, 2)).float(), limit)
    wb = route_w.new_zeros(s * n).index_copy_(0, at, route_w).view(s, n, 1)  # padding rows weigh 0
    y = torch.bmm(a.mul_(wb).to(wdt), w2.transpose(1, 2)).view(s * n, -1)
    return y.index_select(0, at).float()
