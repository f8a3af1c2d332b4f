"""Measured expert load: tokens per logical expert over a sliding window of steps, and how evenly a
placement spreads that load over the EP ranks (balancedness = mean / max tokens per rank, the metric
vLLM, SGLang and DeepSeek report)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from comm.eplb import rank_load


class _PlacementTables(Protocol):
    """What `balancedness` needs from a placement (comm/placement.py's `Placement` has it)."""

    phy2log: Tensor  # [L, P]
    logcnt: Tensor  # [L, E]
    ep_size: int


class ExpertLoadWindow:
    """Counts tokens routed to each logical expert, per MoE layer, over the last `window_steps` steps.

    Per step: `record(layer, topk_idx)` for each MoE layer (any number of calls; counts add up), then
    `end_step()`. `record` runs on the device of `topk_idx` with no host read and no data-dependent shape (it
    runs inside the static decode step): one `scatter_add_` into a fixed [L, num_experts + 2] counter (bin 0
    takes -1, bins 1..E the experts, bin E + 1 any id outside [-1, E)) and one `aminmax` into the step's id
    range. `end_step()` checks that range once per step (one host read) and raises ValueError naming an
    out-of-range id; else the step's counts enter a ring of `window_steps` entries on the device, so nothing
    else is copied to the host until `load()`. Entries of -1 in `topk_idx` (padding, dropped tokens) are not
    counted.
    """

    def __init__(self, num_layers: int, num_experts: int, window_steps: int) -> None:
        for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("window_steps", window_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ExpertLoadWindow: {name} must be a positive int, got {value!r}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.window_steps = window_steps
        self._ring: Tensor | None = None  # [window_steps, L, E] int64, allocated on the first record's device
        self._current: Tensor | None = None  # [L, E + 2] counts of the step in progress (bins: -1, experts, bad)
        self._range: Tensor | None = None  # [2] int64: smallest and largest id recorded in the step in progress
        self._steps = 0  # completed steps, ever

    def record(self, layer: int, topk_idx: Tensor) -> None:
        """Add the tokens of one MoE layer call: `topk_idx` holds logical expert ids, any shape, -1 = none.

        Ids outside [-1, num_experts) are counted apart and make the next `end_step()` raise."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"ExpertLoadWindow.record: layer {layer} is outside [0, {self.num_layers})")
        if topk_idx.dtype.is_floating_point or topk_idx.is_complex() or topk_idx.dtype == torch.bool:
            raise ValueError(f"ExpertLoadWindow.record: topk_idx must hold integer expert ids, got {topk_idx.dtype}")
        if self._current is None:
            dev = topk_idx.device
            self._current = torch.zeros(self.num_layers, self.num_experts + 2, dtype=torch.int64, device=dev)
            self._ring = torch.zeros(self.window_steps, self.num_layers, self.num_experts, dtype=torch.int64,
                                     device=dev)
            self._range = torch.full((2,), -1, dtype=torch.int64, device=dev)  # -1 is a valid id: neutral
        if topk_idx.numel() == 0:
            return
        assert self._range is not None
        flat = topk_idx.reshape(-1).to(device=self._current.device, dtype=torch.int64)
        lo, hi = torch.aminmax(flat)
        torch.minimum(self._range[0], lo, out=self._range[0])
        torch.maximum(self._range[1], hi, out=self._range[1])
        bins = flat + 1  # -1 -> bin 0
        bins = torch.where((bins < 0) | (bins > self.num_experts), self.num_experts + 1, bins)
        self._current[layer].scatter_add_(0, bins, torch.ones_like(bins))

    def end_step(self) -> None:
        """Close the current step: its counts enter the window, the oldest step leaves it.

        Raises ValueError if the step recorded an id outside [-1, num_experts); that step's counts are then
        dropped (the window keeps the steps before it) and the step does not count."""
        if self._ring is None or self._current is None or self._range is None:
            self._steps += 1  # nothing recorded yet: the window is all zeros anyway
            return
        lo, hi = self._range.tolist()  # the step's one host read
        if lo < -1 or hi >= self.num_experts:
            self._current.zero_()
            self._range.fill_(-1)
            bad = f"expert id {lo} < -1" if lo < -1 else f"expert id {hi} >= num_experts {self.num_experts}"
            raise ValueError(f"ExpertLoadWindow.end_step: {bad} in a topk_idx recorded this step")
        self._ring[self._steps % self.window_steps].copy_(self._current[:, 1:-1])
        self._current.zero_()
        self._steps += 1

    @property
    def steps(self) -> int:
        """Completed steps so far (the window holds the last min(steps, window_steps) of them)."""
        return self._steps

    def load(self) -> Tensor:
        """Tokens per logical expert summed over the last `window_steps` completed steps: int64 [L, E], CPU."""
        if self._ring is None:
            return torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        return self._ring.sum(0).cpu()


def balancedness(load: Tensor, placement: _PlacementTables) -> list[dict]:
    """Per MoE layer: mean and max tokens per rank under `placement`, and balancedness = mean / max.

    A rank's tokens are the sum over its physical slots of the slot's logical expert load divided by that
    expert's replica count (tokens of a replicated expert are spread evenly over its replicas). A layer with
    no tokens at all counts as perfectly balanced (1.0).
    """
    phy2log, logcnt, ep_size = placement.phy2log, placement.logcnt, int(placement.ep_size)
    if load.dim() != 2 or load.shape != logcnt.shape:
        raise ValueError(f"balancedness: load shape {tuple(load.shape)} does not match the placement's "
                         f"[layers, experts] = {tuple(logcnt.shape)}")
    per_rank = rank_load(load.cpu(), phy2log.cpu(), logcnt.cpu(), ep_size)  # [L, ep_size], float64
    out = []
    for layer in range(per_rank.shape[0]):
        mean = float(per_rank[layer].mean())
        peak = float(per_rank[layer].max())
        out.append({"layer": layer, "mean_tokens_per_rank": mean, "max_tokens_per_rank": peak,
                    "balancedness": mean / peak if peak > 0 else 1.0})
    return out


__all__ = ["ExpertLoadWindow", "balancedness"]
