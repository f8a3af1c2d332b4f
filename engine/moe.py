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

from comm.dispatch import BACKENDS, Dispatcher
from comm.placement import Placement
from engine.config import ModelConfig
from engine.layers import Linear, linear


@dataclass(frozen=True)
class EPContext:
    """This rank's part in expert parallelism: its rank in the EP group, the placement, the backend.

    `group`: the torch.distributed group of the EP ranks (None: the default group). `num_waves`: for the
    `wave` backend (None: its default).
    """

    ep_rank: int
    ep_size: int
    placement: Placement
    backend: str = "sync"
    group: Any = None
    num_waves: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"EP backend {self.backend!r}: must be one of {BACKENDS}")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank {self.ep_rank} outside [0, ep_size={self.ep_size})")
        if self.placement.ep_size != self.ep_size:
            raise ValueError(f"placement is for ep_size={self.placement.ep_size}, EPContext has {self.ep_size}")

    def dispatcher(self) -> Dispatcher:
        return Dispatcher(self.placement, self.ep_rank, self.ep_size, backend=self.backend, group=self.group,
                          num_waves=self.num_waves)


class LoadRecorder(Protocol):
    def record(self, layer: int, topk_idx: torch.Tensor) -> None: ...


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(g, limit)) * clamp(u, -limit, limit) (§4.2), in the inputs' dtype."""
    return F.silu(g.clamp(max=limit)) * u.clamp(min=-limit, max=limit)


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
        return self.w2(swiglu(self.w1(x).float(), self.w3(x).float(), self.limit).to(x.dtype))


class RoutedExperts(nn.Module):
    """The routed experts a rank holds, stacked; `forward` runs the reference grouped loop.

    Under EP `local_experts` has one entry per physical slot (repeats allowed) and `forward_slots` is used.
    """

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

        The routing weight multiplies the SwiGLU output before w2, in fp32 (§4.2). Decode-sized
        batches, where most experts get a few tokens each, go through one padded bmm per weight
        (`_forward_bmm`); otherwise experts run one after another (`_forward_loop`, the reference).
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
        if int(counts.sum()) == 0:
            return torch.zeros_like(x)
        n_active = int((counts > 0).sum())
        if n_active * 4 >= 3 * len(self.local_experts) and int(counts.max()) * n_active <= 2 * int(counts.sum()):
            return self._forward_bmm(x, topk_weights, local, counts)
        return self._forward_loop(x, topk_weights, local, counts)

    def _forward_loop(self, x: torch.Tensor, topk_weights: torch.Tensor, local: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
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

    def _forward_bmm(self, x: torch.Tensor, topk_weights: torch.Tensor, local: torch.Tensor,
                     counts: torch.Tensor) -> torch.Tensor:
        """Tokens gathered into [E, max_count, D] (zero rows pad), three bmm's over the stacked weights."""
        k = topk_weights.shape[1]
        sel = torch.nonzero(local >= 0).flatten()
        sel = sel[torch.argsort(local[sel], stable=True)]  # assignments grouped by expert
        expert = local[sel]
        offsets = torch.cumsum(counts, 0) - counts
        slot = torch.arange(sel.numel(), device=x.device) - offsets[expert]
        xb = torch.zeros(len(self.local_experts), int(counts.max()), x.shape[1], dtype=self.w1.dtype, device=x.device)
        xb[expert, slot] = x[sel // k].to(self.w1.dtype)
        a = swiglu(torch.bmm(xb, self.w1.transpose(1, 2)).float(), torch.bmm(xb, self.w3.transpose(1, 2)).float(),
                   self.limit)  # [E, C, I]
        a = a[expert, slot] * topk_weights.flatten()[sel, None]  # [n_assign, I]
        ab = torch.zeros_like(xb[..., :1]).expand(-1, -1, a.shape[1]).contiguous()
        ab[expert, slot] = a.to(ab.dtype)
        y = torch.bmm(ab, self.w2.transpose(1, 2))[expert, slot].float()  # [n_assign, D]
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, sel // k, y)
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

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [T, D] (after ffn_norm), input_ids [T] (hash layers route by token id) -> [T, D]."""
        topk_weights, topk_idx = self.gate(x, input_ids)
        if self.load_recorder is not None:
            self.load_recorder.record(self.layer_id, topk_idx)
        if self.dispatcher is not None:
            return self.dispatcher(self.layer_id, x, topk_idx, topk_weights, self.experts.forward_slots,
                                   self.shared_experts)
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
