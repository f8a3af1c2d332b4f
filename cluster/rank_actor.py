"""RankActor: the body of one rank's Ray actor (the launcher wraps it with `ray.remote`).

Life of a rank: `__init__` (imports torch; a warm standby waits here) -> `endpoint()` (rank 0: its IP and a
free port for the process group) -> `start(master_addr, master_port, timeout_s, secret)` (join torch.distributed,
load only this rank's weights, start the RankWorker: step loop + TCP server that admits only peers proving the
launch secret, which arrives here as a Ray call argument and is kept only in memory) -> `health()` every
ping interval -> killed by the launcher, together with its whole group.

`health()` answers from the actor's own thread while the step thread runs, so a rank whose step hangs
still answers: its step counter stops advancing, and the launcher calls that a hang after step_timeout_s.
`inject_fault(...)` is for tests: the next step sleeps (a hang) or raises (a crashed step loop).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from cluster.topology import Topology

_SAFETY_BYTES = 2 * 2**30  # on cuda: memory kept free beside weights and cache (activations, NCCL buffers)


class _FaultInjector:
    """Wraps an engine; a test can make its next step sleep or raise. Everything else passes through."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._sleep_s = 0.0
        self._raise: str | None = None

    def arm(self, sleep_s: float = 0.0, raise_msg: str | None = None) -> None:
        with self._lock:
            self._sleep_s = sleep_s
            self._raise = raise_msg

    def step(self) -> Any:
        with self._lock:
            sleep_s, msg = self._sleep_s, self._raise
            self._sleep_s, self._raise = 0.0, None
        if sleep_s:
            time.sleep(sleep_s)
        if msg is not None:
            raise RuntimeError(msg)
        return self._engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class RankActor:
    def __init__(self, topo: Topology, rank: int, generation: int = 0) -> None:
        import torch

        torch.set_num_threads(1)
        self.topo = topo
        self.rank = rank
        self.generation = generation
        self.spec = topo.ranks()[rank]
        self.node = topo.node(self.spec.node)
        self.worker: Any = None
        self.engine: Any = None
        self._faults: _FaultInjector | None = None
        self.local_experts: list[list[int]] = []
        self.load_s = 0.0

    # ---- where am I ---------------------------------------------------------------------------------
    def endpoint(self) -> dict[str, Any]:
        """This rank's node IP, Ray node id, pid, and a free port (rank 0's is the process group's)."""
        import ray

        from comm.launch import free_port

        ip = ray.util.get_node_ip_address()
        return {"rank": self.rank, "ip": ip, "port": free_port(ip), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}

    # ---- start --------------------------------------------------------------------------------------
    def start(self, master_addr: str, master_port: int, timeout_s: float = 120.0,
              secret: bytes | None = None) -> dict[str, Any]:
        """Join the process group, load this rank's weights, start the step loop and the TCP server (which
        admits only peers that prove they hold `secret`, the launch secret; required)."""
        from comm.auth import check_secret

        secret = check_secret(secret)
        import ray

        from cluster.rank_server import RankWorker
        from comm.group import init_process_group

        t0 = time.perf_counter()
        device = init_process_group(self.rank, self.topo.world_size, master_addr, master_port, self.node.device,
                                    timeout_s=max(timeout_s, self.topo.health.step_timeout_s))
        self.engine, self.local_experts = build_rank_engine(self.topo, self.rank, str(device))
        self._faults = _FaultInjector(self.engine)
        ip = ray.util.get_node_ip_address()
        self.worker = RankWorker(self._faults, host=ip, port=0, rank=self.rank, secret=secret).start()
        self.load_s = time.perf_counter() - t0
        host, port = self.worker.address
        model = getattr(self.engine, "model", None)
        loaded = sorted({int(e) for e in getattr(model, "local_experts", [])})
        return {"rank": self.rank, "address": [host, port], "local_experts": self.local_experts,
                "loaded_experts": loaded, "device": str(device), "load_s": self.load_s, "pid": os.getpid()}

    # ---- health -------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Step count (advances every loop iteration, idle or not), whether the loop runs, its failure, the
        latest stats snapshot (queue and cache use) and the experts of each slot now (a rebalance moves them)."""
        w = self.worker
        if w is None:
            return {"rank": self.rank, "started": False, "steps": 0, "running": False, "failure": None, "stats": {}}
        failure = None if w.failure is None else f"{type(w.failure).__name__}: {w.failure}"
        return {"rank": self.rank, "started": True, "steps": int(w.steps), "running": bool(w.running),
                "failure": failure, "stats": dict(getattr(w, "_stats", {}) or {}),
                "local_experts": _slots(self.engine)}

    # ---- tests only ---------------------------------------------------------------------------------
    def inject_fault(self, kind: str, seconds: float = 0.0) -> bool:
        """Test-only: `hang` makes the next step sleep `seconds`; `crash` makes it raise; `exit` ends the
        process at once (a crashed rank process)."""
        if kind == "exit":
            os._exit(1)
        if self._faults is None:
            raise RuntimeError(f"rank {self.rank} is not started")
        if kind == "hang":
            self._faults.arm(sleep_s=seconds)
        elif kind == "crash":
            self._faults.arm(raise_msg=f"injected crash on rank {self.rank}")
        else:
            raise ValueError(f"fault kind must be hang, crash or exit; got {kind!r}")
        return True


# ---- the engine of one rank --------------------------------------------------------------------------
def engine_config(topo: Topology, device: str, n_local_experts: int | None = None) -> Any:
    """The EngineConfig for one rank from the topology's scheduler and kv_cache sections."""
    from engine.core.engine import EngineConfig

    kw: dict[str, Any] = {}
    budget = cache_budget_bytes(topo, device, n_local_experts)
    if budget is not None:
        kw["cache_budget_bytes"] = budget
    s = topo.scheduler
    return EngineConfig(dtype=topo.model.dtype, device=device, weights=topo.model.weights, max_num_seqs=s.max_num_seqs,
                        max_num_batched_tokens=s.max_num_batched_tokens, page_tokens=s.page_tokens,
                        max_model_len=s.max_model_len, disk_cache=topo.kv_cache.disk,
                        kv_cache_dtype=topo.kv_cache.dtype, **kw)


def cache_budget_bytes(topo: Topology, device: str, n_local_experts: int | None) -> int | None:
    """kv_cache.budget_bytes as given; or memory_fraction of the device's memory minus this rank's weights
    (engine.weights.resident, in the topology's weights mode) and a safety margin; None = the engine's default."""
    kv = topo.kv_cache
    if kv.budget_bytes is not None:
        return kv.budget_bytes
    if kv.memory_fraction is None or not device.startswith("cuda"):
        return None
    import torch

    from engine.weights.resident import rank_builds_mtp, uniform_rank_bytes

    cfg = topo.model_config()
    n_local = cfg.n_routed_experts if n_local_experts is None else n_local_experts
    weights = uniform_rank_bytes(cfg, topo.model.weights, getattr(torch, topo.model.dtype), n_local,
                                 with_mtp=rank_builds_mtp(topo.world_size)).total
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    budget = int(total * kv.memory_fraction) - weights - _SAFETY_BYTES
    if budget <= 0:
        raise RuntimeError(f"kv_cache.memory_fraction {kv.memory_fraction} of {total / 2**30:.1f} GiB leaves no "
                           f"room for the cache beside {weights / 2**30:.1f} GiB of weights on {device}")
    return budget


def build_rank_engine(topo: Topology, rank: int, device: str) -> tuple[Any, list[list[int]]]:
    """This rank's engine, and the logical expert of each of its slots per MoE layer as its model holds them.

    World 1: the whole model in an LLMEngine. World > 1: the EP engine (engine/core/ep/engine.py), which loads only
    the experts the placement gives this rank and steps collectively with its peers."""
    from comm.placement import Placement

    cfg = topo.model_config()
    if topo.world_size == 1:
        from engine.core.engine import LLMEngine

        engine = LLMEngine(topo.model.path, engine_config(topo, device))
    else:
        from engine.core.ep.engine import PlacementConfig, make_ep_engine

        pl = topo.parallel.placement
        placement = Placement.static(cfg.num_hidden_layers, cfg.n_routed_experts, topo.ep_size,
                                     redundant=pl.redundant_experts)
        engine = make_ep_engine(topo.model.path, engine_config(topo, device, placement.slots_per_rank),
                                rank=rank, world_size=topo.world_size, placement=placement,
                                backend=topo.parallel.ep_backend,
                                placement_config=PlacementConfig.from_spec(pl))
    return engine, _slots(engine)


def _slots(engine: Any) -> list[list[int]]:
    """The logical expert of each local slot, per MoE layer, as the engine's model holds them."""
    return [list(map(int, block.ffn.experts.local_experts)) for block in engine.model.layers]
