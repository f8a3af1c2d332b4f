"""The V4 MoE layer: sqrtsoftplus router (or hash routing), SwiGLU experts with clamp (v4-model.md §4).

Routed experts are stored stacked (`w1/w3: [E_local, I, D]`, `w2: [E_local, D, I]`) for the
experts this rank holds; `local_experts` lists their global (logical) ids (engine.model.experts: RoutedExperts
and its one batched path).

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

import functools
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from comm.dispatch import Dispatcher, backend_names
from comm.placement import Placement
from engine.kernels.select import linear_quantized
from engine.model import weight_format
from engine.model.config import ModelConfig
from engine.model.experts import RoutedExperts, swiglu, swiglu_
from engine.model.layers import Linear, frozen_parameter, linear

# RoutedExperts and the SwiGLU live in engine.model.experts; imported from here as before
__all__ = ["EPContext", "Expert", "Gate", "LoadRecorder", "MoE", "RoutedExperts", "swiglu", "swiglu_"]


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

        `sync_free` (the static decode step): the routed experts read nothing on the host and make no
        data-dependent shape (`RoutedExperts.run_assigned`)."""
        topk_weights, topk_idx = self.gate(x, input_ids)
        if self.load_recorder is not None:
            self.load_recorder.record(self.layer_id, topk_idx)
        if self.dispatcher is not None:
            run = functools.partial(self.experts.forward_slots, sync_free=sync_free)
            return self.dispatcher(self.layer_id, x, topk_idx, topk_weights, run, self.shared_experts)
        y = self.experts(x, topk_weights, topk_idx, sync_free=sync_free)
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
