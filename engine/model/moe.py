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
from engine.kernels.cpu import moe_mlp, moe_mlp_available
from engine.model.config import ModelConfig
from engine.model.layers import Linear, linear


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
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        if self.is_hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.int64))
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D], input_ids [T] -> (topk_weights [T, k] f32, topk_idx [T, k] int64)."""
        scores = torch.sqrt(F.softplus(linear(x.float(), self.weight)))  # [T, E]
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
    """

    # Crossover measured on the 2-core Zen4 (small preset, 32 slots of n rows, interleaved repeats, medians of
    # per-core CPU time): the kernel, which streams each weight row once per 12 rows of a slot, takes 0.55x
    # MKL's time at 12 rows, 0.8x at 20, ties at 28-32, and 1.1x at 40-48. Under 32 rows it runs the kernel
    # (it also degrades far less than 2-thread MKL when the cores are shared).
    KERNEL_MAX_ROWS = 32

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
        self.w1 = nn.Parameter(torch.zeros(e, inter, d, dtype=dtype))
        self.w3 = nn.Parameter(torch.zeros(e, inter, d, dtype=dtype))
        self.w2 = nn.Parameter(torch.zeros(e, d, inter, dtype=dtype))

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

    def _grouped(self, x: torch.Tensor, topk_weights: torch.Tensor, local: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
        """Assignments sorted by slot once; slots with few rows go to the C kernel, the rest to torch mm's.

        Slots with fewer than `KERNEL_MAX_ROWS` rows run in `_experts_kernel` (when `_kernel_usable`),
        the others in `_experts_sorted`; both add into one fp32 output.
        """
        n = int(counts.sum())
        if n == 0:
            return torch.zeros_like(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.w1.requires_grad):
            # The fast paths write into reused buffers and the C kernel has no backward: under autograd run
            # the reference, so the expert weights and the input get their gradients.
            return self._forward_loop(x, topk_weights, local, counts)
        k = topk_weights.shape[1]
        sel = torch.argsort(local, stable=True)[local.numel() - n:]  # -1 (not on this rank) sorts first
        tok = sel // k if k > 1 else sel
        route_w = topk_weights.reshape(-1).index_select(0, sel).float()
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        min_rows = 0
        if self._kernel_usable(x):
            small = counts < self.KERNEL_MAX_ROWS
            if bool(small.any()):
                self._experts_kernel(x, tok, counts, small, route_w, out)
                min_rows = self.KERNEL_MAX_ROWS
        elif int(counts.max()) < self.KERNEL_MAX_ROWS and 4 * int((counts > 0).sum()) >= 3 * counts.numel():
            self._experts_padded(x, tok, counts, route_w, out)
            return out.to(x.dtype)
        if min_rows == 0 or int(counts.max()) >= min_rows:
            self._experts_sorted(x, tok, counts.tolist(), route_w, out, min_rows)
        return out.to(x.dtype)

    def _experts_padded(self, x: torch.Tensor, tok: torch.Tensor, counts: torch.Tensor, route_w: torch.Tensor,
                        out: torch.Tensor) -> None:
        """Torch fallback for few rows in most slots (decode without the kernel): rows padded to [S, max_count],
        three bmm's over the stacked weights. Fewer, larger calls than the per-slot loop, where 2-thread MKL
        pays per call; padded rows carry routing weight 0 and are never read back."""
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
        """The C kernel takes fp32 CPU tensors (contiguous weights) and must have compiled on this machine."""
        return (x.dtype == torch.float32 and x.device.type == "cpu" and self.w1.dtype == torch.float32
                and self.w1.device.type == "cpu" and self.w1.is_contiguous() and self.w3.is_contiguous()
                and self.w2.is_contiguous() and moe_mlp_available())

    def _experts_kernel(self, x: torch.Tensor, tok: torch.Tensor, counts: torch.Tensor, small: torch.Tensor,
                        route_w: torch.Tensor, out: torch.Tensor) -> None:
        """The rows of the `small` slots (rows sorted by slot as in `_experts_sorted`) through `moe_mlp`."""
        cnt = counts
        if not bool(small.all()):  # keep only the rows of the small slots (still sorted by slot)
            row_slot = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
            rows = torch.nonzero(small[row_slot]).flatten()
            tok, route_w = tok[rows], route_w[rows]
            cnt = torch.where(small, counts, 0)
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
        torch.cumsum(cnt, 0, out=offsets[1:])
        ys = moe_mlp(x.index_select(0, tok), offsets, route_w.contiguous(), self.w1, self.w3, self.w2, self.limit)
        out.index_add_(0, tok, ys)

    def _experts_sorted(self, x: torch.Tensor, tok: torch.Tensor, counts: list[int], route_w: torch.Tensor,
                        out: torch.Tensor, min_rows: int = 0) -> None:
        """Adds route_w[r] * Expert_s(x[tok[r]]) into out[tok[r]] (fp32) for rows r sorted by slot s.

        Slot after slot over its `counts[s]` rows (slots with fewer than `min_rows` are skipped: the kernel
        ran them): gather them into a reused buffer, w1/w3 into two more [max_count, I] buffers, the SwiGLU
        and routing weight in place, w2, one index_add_. Reused buffers keep the working set in cache and
        avoid fresh large allocations (page faults).
        """
        w1, w3, w2 = self.w1, self.w3, self.w2  # no autograd here (`_grouped` runs the reference under it)
        wdt = w1.dtype
        fp32 = wdt == torch.float32 and x.dtype == torch.float32
        cmax = max(counts)
        inter, dim = w1.shape[1], w1.shape[2]
        if fp32:
            xbuf = x.new_empty(cmax, dim)
            hbuf = x.new_empty(cmax, inter)
            ubuf = x.new_empty(cmax, inter)
            ybuf = x.new_empty(cmax, dim)
        start = 0
        for e, cnt in enumerate(counts):
            end = start + cnt
            if cnt == 0 or cnt < min_rows:
                start = end
                continue
            tok_e = tok[start:end]
            if fp32:
                xe = torch.index_select(x, 0, tok_e, out=xbuf[:cnt])
                h = torch.mm(xe, w1[e].t(), out=hbuf[:cnt])
                u = torch.mm(xe, w3[e].t(), out=ubuf[:cnt])
            else:
                xe = x.index_select(0, tok_e).to(wdt)
                h = torch.mm(xe, w1[e].t()).float()
                u = torch.mm(xe, w3[e].t()).float()
            swiglu_(h, u, self.limit).mul_(route_w[start:end, None])
            if fp32:
                y = torch.mm(h, w2[e].t(), out=ybuf[:cnt])
            else:
                y = torch.mm(h.to(wdt), w2[e].t()).float()
            out.index_add_(0, tok_e, y)
            start = end

    def _forward_loop(self, x: torch.Tensor, topk_weights: torch.Tensor, local: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
        """The plain reference: expert after expert, gather its tokens, MLP, index_add_ into the output."""
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        order = torch.argsort(local, stable=True)
        start = int((local < 0).sum())
        k = topk_weights.shape[1]
        for e, cnt in enumerate(counts.tolist()):
            if cnt == 0:
                continue
            sel = order[start:start + cnt]
            start += cnt
            tok = sel // k
            xe = x[tok].to(self.w1.dtype)
            a = swiglu(F.linear(xe, self.w1[e]).float(), F.linear(xe, self.w3[e]).float(), self.limit)
            a = a * topk_weights.flatten()[sel, None]
            out.index_add_(0, tok, F.linear(a.to(self.w2.dtype), self.w2[e]).float())
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
    y = grouped_swiglu(x.index_select(0, tok), ends, counts, weight.index_select(0, order),
                       experts.w1, experts.w3, experts.w2, experts.limit)
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
