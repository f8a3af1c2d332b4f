"""The engine of one rank of an expert-parallel group (DESIGN.md "Parallel layout").

Attention is data-parallel: every rank runs its own scheduler and KV cache over its own requests, with the
replicated weights. Routed experts are sharded: the model holds only this rank's physical expert slots and
every MoE layer exchanges tokens with the other ranks (engine.model.moe.EPContext, comm.dispatch). Build one per
rank, after the process group is initialised (comm.group.init_process_group, or inside
comm.launch.run_ranks):

    engine = EPEngine(model_dir, EngineConfig(...), ep_rank, ep_size, backend="sync",
                      placement_config=PlacementConfig(policy="eplb", rebalance_interval_steps=512))

An LLMEngine (same surface: add_request, abort_request, step, stats, idle) whose `step()` is collective:
every rank of the group calls it on every iteration of its loop, work or not. The step loop is LLMEngine's;
this class fills in only its three collective hooks:

    _agree:          one all-reduce of [ranks with work, rebalance requests]; nobody has work -> the step
                     only reports finished requests (idle() is True: the caller may wait for input)
    _empty_forward:  a zero-token forward when the group is busy but this rank has no tokens, so every
                     MoE exchange completes
    _end_step:       record this rank's expert load; every rebalance_interval_steps steps (or on request):
                     rebalance the placement

A rebalance happens between two forwards at the same step on every rank: the ranks sum their expert-load
windows (comm.expert_load), compute a new placement with EPLB (comm.eplb), move the slot weights
(comm.rebalance) and switch every MoE layer to the new tables. The KV caches are untouched, so no request
is dropped. `stats()` never communicates: it reports the per-layer balancedness measured at the last sync
(every `load_window_steps` steps, at each rebalance, and when the group goes idle).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from comm.dispatch import backend_names
from comm.eplb import rebalance_experts
from comm.expert_load import ExpertLoadWindow, balancedness
from comm.placement import Placement
from comm.placement_policy import PLACEMENT_POLICIES
from comm.rebalance import move_expert_weights
from engine.core.engine import _DTYPES, EngineConfig, LLMEngine
from engine.model.moe import EPContext
from engine.weights.checkpoint import open_checkpoint
from engine.weights.loader import load_model


@dataclass(frozen=True)
class PlacementConfig:
    """Expert placement of an EP group (the topology's `parallel.placement`, same fields and meaning).

    policy: `static` (round-robin over ranks, never moves) or `eplb` (starts static; rebalanced from measured
    load every `rebalance_interval_steps` steps, 0 = only on `EPEngine.request_rebalance()`).
    redundant_experts: extra physical slots (replicas of hot experts); experts + redundant must divide by
    ep_size. load_window_steps: the steps of expert load EPLB and the balancedness figures look at.
    """

    policy: str = "static"
    redundant_experts: int = 0
    rebalance_interval_steps: int = 0
    load_window_steps: int = 128

    def __post_init__(self) -> None:
        if self.policy not in PLACEMENT_POLICIES:
            raise ValueError(f"placement policy {self.policy!r}: must be one of {PLACEMENT_POLICIES}")
        for key, lo in (("redundant_experts", 0), ("rebalance_interval_steps", 0), ("load_window_steps", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"placement {key} must be an int >= {lo}, got {v!r}")
        if self.policy == "static" and self.rebalance_interval_steps:
            raise ValueError("placement rebalance_interval_steps must be 0 with policy 'static' (only 'eplb' "
                             "rebalances)")

    @classmethod
    def from_spec(cls, spec: object) -> PlacementConfig:
        """From any object with the four topology fields (cluster.topology.PlacementSpec)."""
        return cls(policy=spec.policy, redundant_experts=spec.redundant_experts,
                   rebalance_interval_steps=spec.rebalance_interval_steps,
                   load_window_steps=spec.load_window_steps)


class EPEngine(LLMEngine):
    """One rank's engine in an EP group of `ep_size` ranks (module docstring).

    model_dir: checkpoint directory (every rank reads the replicated weights and its own experts).
    config: the per-rank engine settings (scheduler, cache); `device="cuda"` means this rank's current CUDA
    device (comm.group.init_process_group sets it). ep_rank / ep_size: this rank in `group` (default: the
    default process group, which must be initialised). backend: a comm.dispatch backend name (`sync`, `tbo`,
    `wave`, `ll`: its capacity is max_num_batched_tokens x top-k);
    num_waves: for `wave`. placement: the initial placement over the main MoE layers (default: static
    round-robin with `placement_config.redundant_experts` redundant slots).
    """

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, ep_rank: int | None = None,
                 ep_size: int | None = None, backend: str = "sync", placement_config: PlacementConfig | None = None,
                 group: dist.ProcessGroup | None = None, num_waves: int | None = None,
                 placement: Placement | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("EPEngine needs an initialised torch.distributed process group "
                               "(comm.group.init_process_group or comm.launch.run_ranks)")
        if backend not in backend_names():
            raise ValueError(f"EP backend {backend!r}: must be one of {backend_names()}")
        group_rank, group_size = dist.get_rank(group), dist.get_world_size(group)
        ep_rank = group_rank if ep_rank is None else ep_rank
        ep_size = group_size if ep_size is None else ep_size
        if (ep_rank, ep_size) != (group_rank, group_size):
            raise ValueError(f"ep_rank/ep_size {ep_rank}/{ep_size} disagree with the process group "
                             f"(rank {group_rank} of {group_size})")
        c = config or EngineConfig()
        if torch.device(c.device).type == "cuda":
            c = dataclasses.replace(c, device=f"cuda:{torch.cuda.current_device()}")
        pc = placement_config or PlacementConfig()
        self.ep_rank, self.ep_size, self.backend, self.group = ep_rank, ep_size, backend, group
        self.placement_config = pc

        cfg = open_checkpoint(model_dir).config
        num_layers, num_experts = cfg.num_hidden_layers, cfg.n_routed_experts
        # The runner runs the main layers only, so the placement covers those (no MTP experts are loaded).
        if placement is None:
            if (num_experts + pc.redundant_experts) % ep_size:
                raise ValueError(f"{num_experts} routed experts + {pc.redundant_experts} redundant = "
                                 f"{num_experts + pc.redundant_experts} slots cannot be split over ep_size={ep_size}")
            placement = Placement.static(num_layers, num_experts, ep_size, redundant=pc.redundant_experts)
        elif (placement.ep_size, placement.num_layers, placement.num_experts) != (ep_size, num_layers, num_experts):
            raise ValueError(f"placement is for ep_size={placement.ep_size}, {placement.num_layers} layers, "
                             f"{placement.num_experts} experts; this group needs ep_size={ep_size}, {num_layers} "
                             f"layers (the main MoE layers), {num_experts} experts")
        ep = EPContext(ep_rank, ep_size, placement, backend=backend, group=group, num_waves=num_waves,
                       max_tokens_per_rank=c.max_num_batched_tokens)  # a forward's tokens: bounds ll's capacity
        model = load_model(model_dir, dtype=_DTYPES[c.dtype], device=c.device, ep=ep, weights=c.weights)
        super().__init__(model_dir, c, model=model)
        self.placement = placement
        self.window = ExpertLoadWindow(num_layers, num_experts, pc.load_window_steps)
        # Its counters are allocated by the first record(): do that here, outside inference mode, so they are
        # ordinary tensors that end_step() may update in place (the forward records in inference mode).
        self.window.record(0, torch.zeros(0, dtype=torch.long, device=model.embed.weight.device))
        model.set_load_recorder(self.window)
        self._comm_device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")

        self.steps = 0  # steps in which some rank had work (the same count on every rank)
        self.dummy_steps = 0  # of those, steps this rank ran without tokens
        self.rebalances = 0
        self._busy_ranks = 0  # ranks with work at the last step's agreement
        self._rebalance_wanted = False
        self._balance: list[dict] = []  # per-layer balancedness at the last sync
        self._balance_step = -1
        self._last_rebalance: dict | None = None

    def idle(self) -> bool:
        """True when neither this rank nor (at the last step) any other rank had work: the caller may wait for
        input before the next step(). Keeps stepping (False) while another rank is busy."""
        return self._busy_ranks == 0 and not self.scheduler.has_unfinished()

    def request_rebalance(self) -> None:
        """Ask for a rebalance at the next step (any rank may ask; all ranks rebalance together)."""
        if self.placement_config.policy != "eplb":
            raise ValueError("request_rebalance needs placement policy 'eplb' (this group's is "
                             f"{self.placement_config.policy!r})")
        self._rebalance_wanted = True

    # ---- what is collective in LLMEngine.step (every rank calls step() each iteration, work or not) ----
    def _agree(self, has_work: bool) -> bool:
        """Collective: one all-reduce of [ranks with work, rebalance requests]; a requested rebalance runs here,
        between two forwards, on every rank."""
        flags = torch.tensor([int(has_work), int(self._rebalance_wanted)], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(flags, group=self.group)
        busy, rebalance = flags.tolist()
        was_busy, self._busy_ranks = self._busy_ranks, busy
        self._rebalance_wanted = False
        if rebalance:
            self._rebalance()
        if busy == 0 and was_busy:
            self._sync_balance()  # the group just went idle: fresh figures for stats()
        return busy > 0

    @torch.inference_mode()
    def _empty_forward(self) -> None:
        """A forward of zero tokens: this rank joins every MoE exchange of the step with nothing to send."""
        self.dummy_steps += 1
        self.model(torch.zeros(0, dtype=torch.long), [], [])

    def _end_step(self) -> None:
        """The rebalance point: every rebalance_interval_steps busy steps (else a balancedness sync every
        load_window_steps)."""
        self.window.end_step()
        self.steps += 1
        pc = self.placement_config
        if pc.rebalance_interval_steps and self.steps % pc.rebalance_interval_steps == 0:
            self._rebalance()
        elif self.steps % pc.load_window_steps == 0:
            self._sync_balance()

    # ---- expert load and placement ----
    def _global_load(self) -> torch.Tensor:
        """Tokens per logical expert over the window, summed over the group: int64 [L, E] (collective)."""
        load = self.window.load().to(self._comm_device)
        dist.all_reduce(load, group=self.group)
        return load.cpu()

    def _sync_balance(self) -> torch.Tensor:
        load = self._global_load()
        self._balance = balancedness(load, self.placement)
        self._balance_step = self.steps
        return load

    @torch.no_grad()
    def _rebalance(self) -> None:
        """Collective: new placement from the group's load (EPLB), weights moved, every MoE layer switched."""
        load = self._sync_balance()
        if int(load.sum()) == 0:
            return  # nothing measured yet: no basis for a new placement (every rank sees the same sum)
        old = self.placement
        # V4 routes without expert groups, so EPLB's global policy applies (one group, one node).
        phy2log, _, _ = rebalance_experts(load, old.num_physical, num_groups=1, num_nodes=1, num_gpus=self.ep_size)
        new = Placement.from_phy2log(phy2log, self.ep_size, num_experts=old.num_experts)
        moved = 0
        for layer, moe in enumerate(self.model.moe_layers()):
            if torch.equal(old.phy2log[layer], new.phy2log[layer]):
                continue
            slots = {name: t.data for name, t in moe.experts.slot_tensors().items()}  # as held: packed + scales
            fresh = move_expert_weights(slots, old.phy2log[layer], new.phy2log[layer], self.ep_rank, self.ep_size,
                                        self.group)
            for name, t in fresh.items():
                slots[name].copy_(t)
            moved += int((old.phy2log[layer] != new.phy2log[layer]).sum())
        self.model.set_placement(new)
        self.placement = new
        before = self._balance
        after = balancedness(load, new)
        self._balance = after
        self.rebalances += 1
        self._last_rebalance = {
            "step": self.steps, "moved_slots": moved,
            "balancedness_before": _mean(before), "balancedness_after": _mean(after),
        }

    # ---- figures (local: no communication) ----
    def stats(self) -> dict:
        """LLMEngine's figures plus EP ones; `expert_balance`: per layer, mean/max tokens per rank at the last
        sync (step `expert_balance_step`); `balancedness`: their mean over layers (None before any sync)."""
        return {
            **super().stats(),
            "num_pages": self.cache.num_pages,
            "ep_rank": self.ep_rank, "ep_size": self.ep_size, "ep_backend": self.backend,
            "placement_policy": self.placement_config.policy,
            "steps": self.steps, "dummy_steps": self.dummy_steps, "rebalances": self.rebalances,
            "expert_balance": [dict(row) for row in self._balance],
            "expert_balance_step": self._balance_step,
            "balancedness": _mean(self._balance) if self._balance else None,
            "last_rebalance": dict(self._last_rebalance) if self._last_rebalance else None,
            "dispatch": self.model.dispatcher.totals.as_dict(),
        }


def _mean(rows: list[dict]) -> float:
    return sum(r["balancedness"] for r in rows) / len(rows) if rows else 1.0


def make_ep_engine(model_dir: str | Path, config: EngineConfig | None = None, *, rank: int, world_size: int,
                   placement: Placement | None = None, backend: str = "sync",
                   placement_config: PlacementConfig | None = None) -> EPEngine:
    """EPEngine by keyword (cluster.rank_actor's spelling): rank `rank` of a `world_size`-rank EP group."""
    return EPEngine(model_dir, config, rank, world_size, backend=backend, placement_config=placement_config,
                    placement=placement)
