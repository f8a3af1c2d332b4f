"""Launch a topology's ranks on Ray, watch them, and restart the EP group when one fails.

    conn = connect_ray(topo)                 # ray.address, or an embedded local cluster (one Ray node per
                                             # topology node, labelled like the topology says)
    launcher = Launcher(topo, on_restart=...)
    addresses = launcher.start()             # placement groups, actors, process group, weights, step loops
    launcher.start_monitor()                 # health pings; restart the whole group on failure
    ...
    launcher.shutdown(); conn.shutdown()

Placement: one placement group per topology node (STRICT_PACK, one bundle per rank), pinned to the Ray node
the topology names: by label (`bundle_label_selector`, Ray >= 2.49) or by address (the `node:<ip>` resource
every Ray node carries). Before anything is created, the topology is matched against Ray's alive nodes
(`topology.match_nodes`), so a node that does not exist or is too small fails at once with a clear message.

Health: every `ping_interval_s` each rank actor's `health()` is called; a rank is failed when the call raises
(dead actor or process), does not answer within `ping_timeout_s`, reports a failed step loop, or its step
counter has not advanced for `step_timeout_s` (a hung step or collective). A failure restarts the whole EP
group (collectives cannot survive a lost member): kill every actor, start the next generation in the same
placement groups with a new process group, then `on_restart(addresses)` (the frontend's Router.reset_ranks resubmits
in-flight requests). Failures less than `stable_s` apart count as consecutive; consecutive restarts back off
(0, 1, 2, 4 ... 30 s); more than `max_restarts` consecutive failures stop the monitor and call `on_fatal`.

Warm standby (default): once a generation serves, the next generation's actors are created beside it (half a
bundle each), so a restart finds processes that have already started and imported torch; it only forms the
process group and loads weights.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.topology import NodeSpec, RayNode, Topology, TopologyError, match_nodes

log = logging.getLogger(__name__)

ACTOR_PREFIX = "megaserve-rank"
PG_PREFIX = "megaserve-node"
OBJECT_STORE_BYTES = 128 * 2**20  # per embedded Ray node: ranks pass no tensors through Ray
MAX_BACKOFF_S = 30.0


class LaunchError(RuntimeError):
    """The ranks could not be started (resources never appeared, a rank failed to load, ...)."""


# ---- Ray: embedded or external -----------------------------------------------------------------------
@dataclass
class RayConnection:
    """The driver's Ray: an embedded `ray.cluster_utils.Cluster` we own, or an existing cluster we joined."""

    address: str
    namespace: str
    cluster: Any = None  # ray.cluster_utils.Cluster when embedded
    session_dir: str = ""

    @property
    def embedded(self) -> bool:
        return self.cluster is not None

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


def embedded_node_args(node: NodeSpec, head: bool) -> dict[str, Any]:
    """Ray node arguments for one topology node of an embedded cluster: its labels and exactly its ranks'
    CPUs (GPUs on cuda nodes)."""
    args: dict[str, Any] = {"num_cpus": node.ranks if node.device == "cpu" else 1,
                            "num_gpus": node.ranks if node.device == "cuda" else 0,
                            "labels": dict(node.label or {}), "object_store_memory": OBJECT_STORE_BYTES}
    if head:
        args["include_dashboard"] = False
    return args


def connect_ray(topo: Topology, address: str | None = None, log_to_driver: bool = True) -> RayConnection:
    """Join Ray at `address` (default: the topology's ray.address), or, when that is empty, start an
    embedded cluster on this machine with one Ray node per topology node."""
    import ray

    address = topo.ray.address if address is None else address
    ns = topo.ray.namespace
    if address:
        ray.init(address=address, namespace=ns, log_to_driver=log_to_driver, logging_level=logging.WARNING)
        return RayConnection(address=address, namespace=ns, session_dir=_session_dir())
    addressed = [n.name for n in topo.nodes if n.address is not None]
    if addressed:
        raise TopologyError(f"{topo.source}: field 'ray.address': empty (embedded Ray on this machine), but nodes "
                            f"{addressed} are found by address; give them labels, or set ray.address")
    if len(topo.nodes) > 1 and any(n.device == "cuda" for n in topo.nodes):
        raise TopologyError(f"{topo.source}: field 'ray.address': empty (embedded Ray on this machine) with "
                            f"{len(topo.nodes)} cuda nodes; simulated nodes on one machine would share its GPUs. "
                            f"Use one cuda node, cpu nodes, or a real Ray cluster (ray start ...; ray.address)")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=embedded_node_args(topo.nodes[0], head=True))
    try:
        for node in topo.nodes[1:]:
            cluster.add_node(**embedded_node_args(node, head=False))
        ray.init(address=cluster.address, namespace=ns, log_to_driver=log_to_driver,
                 logging_level=logging.WARNING)
    except BaseException:
        cluster.shutdown()
        raise
    return RayConnection(address=cluster.address, namespace=ns, cluster=cluster, session_dir=_session_dir())


def _session_dir() -> str:
    import ray

    try:
        return str(ray._private.worker.global_worker.node.get_session_dir_path())
    except Exception:  # not available on every kind of connection
        return ""


def ray_nodes() -> list[RayNode]:
    """Ray's alive nodes, as the topology matcher sees them."""
    import ray

    return [RayNode(node_id=n["NodeID"], address=n["NodeManagerAddress"], labels=dict(n.get("Labels") or {}),
                    resources=dict(n.get("Resources") or {}))
            for n in ray.nodes() if n.get("Alive")]


# ---- one rank as the launcher sees it ----------------------------------------------------------------
@dataclass
class RankHandle:
    rank: int
    node: str
    actor: Any
    actor_name: str
    node_id: str = ""
    ip: str = ""
    pid: int = 0
    address: tuple[str, int] = ("", 0)
    local_experts: list[list[int]] = field(default_factory=list)  # logical expert per local slot, per layer
    loaded_experts: list[int] = field(default_factory=list)  # the routed experts whose weights it loaded
    last_steps: int = -1
    last_progress: float = 0.0
    health: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecoveryEvent:
    reason: str
    detected_at: float  # time.time()
    recovery_s: float  # detection -> new group serving (and the frontend reset)
    generation: int


class Launcher:
    def __init__(self, topo: Topology, *, on_restart: Callable[[list[tuple[str, int]]], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None, ready_timeout_s: float = 180.0,
                 stable_s: float = 60.0, warm_standby: bool = True, secret: bytes | None = None) -> None:
        """`secret`: the launch secret handed to every rank through Ray (None: a fresh one, read `.secret`);
        a restarted generation gets the same one, so the frontend reconnects with what it holds."""
        from comm.auth import check_secret, new_secret

        self.topo = topo
        self.secret = new_secret() if secret is None else check_secret(secret)
        self.on_restart = on_restart
        self.on_fatal = on_fatal
        self.ready_timeout_s = ready_timeout_s
        self.stable_s = stable_s
        self.ranks: list[RankHandle] = []
        self.generation = 0
        self.node_ids: dict[str, str] = {}
        self.recoveries: list[RecoveryEvent] = []
        self.fatal: str | None = None
        self._pgs: dict[str, Any] = {}
        self.warm_standby = warm_standby
        self._standby: list[RankHandle] = []  # next generation's actors, started but idle (imports done)
        self._standby_gen = -1
        self._consecutive = 0
        self._last_recovery = 0.0
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lock = threading.RLock()

    # ---- start --------------------------------------------------------------------------------------
    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [r.address for r in self.ranks]

    def start(self) -> list[tuple[str, int]]:
        """Check the topology against Ray, reserve every node's ranks, start the ranks; their worker addresses."""
        matched = match_nodes(self.topo, ray_nodes())
        self.node_ids = {name: rn.node_id for name, rn in matched.items()}
        try:
            self._create_placement_groups(matched)
            self._start_group()
        except BaseException:
            self._remove_placement_groups()  # a pending group would grab the resources when they free up
            raise
        return self.addresses

    def _remove_placement_groups(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self._pgs.values():
            try:
                remove_placement_group(pg)
            except Exception:  # already gone with the cluster
                pass
        self._pgs.clear()

    def _create_placement_groups(self, matched: dict[str, RayNode]) -> None:
        import ray
        from ray.util.placement_group import get_placement_group, placement_group

        for node in self.topo.nodes:
            name = f"{PG_PREFIX}-{node.name}"
            try:
                get_placement_group(name)
            except ValueError:
                pass  # free: the usual case
            else:
                raise LaunchError(f"{self.topo.source}: Ray namespace {self.topo.ray.namespace!r} already has a "
                                  f"placement group {name!r}: another `megaserve up` with this namespace holds node "
                                  f"{node.name}; stop it (`megaserve down`) or set ray.namespace")
        for node in self.topo.nodes:
            bundle: dict[str, float] = {node.resource: 1.0}
            kw: dict[str, Any] = {}
            if node.address is not None:
                bundle[f"node:{node.address}"] = 0.001
            else:
                kw["bundle_label_selector"] = [dict(node.label or {})] * node.ranks
            self._pgs[node.name] = placement_group([dict(bundle) for _ in range(node.ranks)], strategy="STRICT_PACK",
                                                   name=f"{PG_PREFIX}-{node.name}", **kw)
        deadline = time.monotonic() + self.ready_timeout_s
        for node in self.topo.nodes:
            pg = self._pgs[node.name]
            try:
                ray.get(pg.ready(), timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                rn = matched[node.name]
                avail = _available(rn.node_id)
                resource = node.resource
                raise LaunchError(
                    f"{self.topo.source}: node {node.name} ({node.describe()}): {node.ranks} ranks could not be "
                    f"placed within {self.ready_timeout_s:g}s; Ray has {rn.resources.get(resource, 0):g} "
                    f"{resource}s there, {avail.get(resource, 0):g} free (other work holds the rest); see "
                    f"`ray status`") from None

    def _new_actors(self, gen: int) -> list[RankHandle]:
        """One actor per rank in its node's placement group bundle. Each takes half a bundle (CPU or GPU), so
        the serving actor and the warm standby of the next generation share it; Ray gives both the bundle's
        GPU. Creation returns at once; the processes start in the background."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cluster.rank_actor import RankActor

        remote = ray.remote(RankActor)
        handles: list[RankHandle] = []
        bundle_of: dict[str, int] = {}
        for spec in self.topo.ranks():
            node = self.topo.node(spec.node)
            i = bundle_of.get(node.name, 0)
            bundle_of[node.name] = i + 1
            name = f"{ACTOR_PREFIX}{spec.rank}-g{gen}"
            res = {"num_gpus": 0.5, "num_cpus": 0} if node.device == "cuda" else {"num_cpus": 0.5}
            actor = remote.options(
                name=name, max_restarts=0, max_concurrency=1, **res,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pgs[node.name],
                                                                     placement_group_bundle_index=i),
            ).remote(self.topo, spec.rank, gen)
            handles.append(RankHandle(spec.rank, node.name, actor, name))
        return handles

    def _start_group(self) -> None:
        """Generation n's actors (the warm standby when there is one, else new ones) form a new process
        group, load their weights and start their step loops; then the next generation's standby starts."""
        gen = self.generation
        if self._standby and self._standby_gen == gen:
            handles, self._standby = self._standby, []
        else:
            self._kill_actors(self._standby)
            self._standby = []
            handles = self._new_actors(gen)
        self.ranks = handles
        try:
            eps = self._get([h.actor.endpoint.remote() for h in handles], "find its node")
            for h, ep in zip(handles, eps):
                h.node_id, h.ip, h.pid = ep["node_id"], ep["ip"], int(ep["pid"])
            master = eps[0]
            started = self._get([h.actor.start.remote(master["ip"], master["port"], self.ready_timeout_s,
                                                      self.secret)
                                 for h in handles], "load its weights and start")
        except BaseException:
            self._kill_actors(handles)
            raise
        now = time.monotonic()
        for h, st in zip(handles, started):
            h.address = (str(st["address"][0]), int(st["address"][1]))
            h.local_experts = [list(x) for x in st["local_experts"]]
            h.loaded_experts = list(st["loaded_experts"])
            h.last_steps, h.last_progress = -1, now
        if self.warm_standby:
            self._standby, self._standby_gen = self._new_actors(gen + 1), gen + 1
        log.info("generation %d: %d ranks serving at %s", gen, len(handles), self.addresses)

    def _get(self, refs: list[Any], what: str) -> list[Any]:
        import ray

        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.ready_timeout_s)
        if pending:
            late = [h.rank for h, r in zip(self.ranks, refs) if r in pending]
            raise LaunchError(f"{self.topo.source}: ranks {late} did not {what} within {self.ready_timeout_s:g}s")
        out = []
        for h, r in zip(self.ranks, refs):
            try:
                out.append(ray.get(r))
            except ray.exceptions.RayError as e:
                raise LaunchError(f"{self.topo.source}: rank {h.rank} on node {h.node} failed to {what}: {e}") from e
        return out

    def wait_standby(self, timeout_s: float) -> bool:
        """Wait until the warm standby's processes have started (answer a call); False if there is none
        or it is not up within `timeout_s`."""
        import ray

        with self._lock:
            standby = list(self._standby)
        if not standby:
            return False
        _, pending = ray.wait([h.actor.health.remote() for h in standby], num_returns=len(standby),
                              timeout=timeout_s)
        return not pending

    # ---- health -------------------------------------------------------------------------------------
    def check(self) -> str | None:
        """Ping every rank once; why the group is unhealthy, or None. When several ranks fail at once (a dead
        rank makes its peers' collectives fail or stall), the most direct cause is named first: a dead rank,
        then a step loop that stopped with an error, then a rank that does not answer, then stalled steps."""
        import ray

        h = self.topo.health
        with self._lock:
            ranks = list(self.ranks)
        refs = [r.actor.health.remote() for r in ranks]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=h.ping_timeout_s)
        ready_set = set(ready)
        now = time.monotonic()
        problems: list[tuple[int, str]] = []
        hung: list[RankHandle] = []
        for r, ref in zip(ranks, refs):
            where = f"rank {r.rank} (node {r.node})"
            if ref not in ready_set:
                problems.append((2, f"{where} did not answer a ping within {h.ping_timeout_s:g}s"))
                continue
            try:
                st = ray.get(ref)
            except ray.exceptions.RayError as e:
                problems.append((0, f"{where} is dead: {type(e).__name__}"))
                continue
            r.health = st
            r.local_experts = st.get("local_experts") or r.local_experts
            if st["failure"] or not st["running"]:
                problems.append((1, f"{where} step loop stopped: {st['failure'] or 'not running'}"))
            elif st["steps"] != r.last_steps:
                r.last_steps, r.last_progress = st["steps"], now
            elif now - r.last_progress > h.step_timeout_s:
                hung.append(r)
        if hung:  # in an EP group one stuck step stalls every peer's collective: name them together
            stalled = max(now - r.last_progress for r in hung)
            problems.append((3, f"ranks {[r.rank for r in hung]} made no step for {stalled:.1f}s "
                                f"(step_timeout_s {h.step_timeout_s:g})"))
        if not problems:
            return None
        problems.sort(key=lambda p: p[0])
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return problems[0][1] + more

    def start_monitor(self) -> None:
        self._monitor = threading.Thread(target=self._monitor_loop, name="megaserve-health", daemon=True)
        self._monitor.start()

    def _monitor_loop(self) -> None:
        interval = self.topo.health.ping_interval_s
        while not self._stop.wait(interval):
            try:
                reason = self.check()
            except Exception as e:  # Ray itself failed; report it rather than spin
                reason = f"health check failed: {type(e).__name__}: {e}"
            if reason is None:
                continue
            if self._stop.is_set():
                return
            if not self.recover(reason):
                return

    def recover(self, reason: str) -> bool:
        """Restart the whole EP group (with back-off); False once max_restarts consecutive failures are spent."""
        detected = time.time()
        t0 = time.monotonic()
        while not self._stop.is_set():
            if self._last_recovery and t0 - self._last_recovery > self.stable_s:
                self._consecutive = 0
            self._consecutive += 1
            limit = self.topo.health.max_restarts
            if self._consecutive > limit:
                self.fatal = (f"giving up after {limit} consecutive restarts (max_restarts {limit}); "
                              f"last failure: {reason}")
                log.error("%s", self.fatal)
                if self.on_fatal is not None:
                    self.on_fatal(self.fatal)
                return False
            delay = 0.0 if self._consecutive == 1 else min(MAX_BACKOFF_S, 2.0 ** (self._consecutive - 2))
            log.warning("EP group failed (%s); restart %d/%d in %.0fs", reason, self._consecutive, limit, delay)
            if self._stop.wait(delay):
                return False
            with self._lock:
                self._kill_actors(self.ranks)
                self.generation += 1
                try:
                    self._start_group()
                except Exception as e:
                    reason = f"restart failed: {e}"
                    self._last_recovery = time.monotonic()
                    continue
            if self.on_restart is not None:
                self.on_restart(self.addresses)
            self._last_recovery = time.monotonic()
            ev = RecoveryEvent(reason, detected, self._last_recovery - t0, self.generation)
            self.recoveries.append(ev)
            log.warning("EP group restarted (generation %d) in %.2fs after: %s", ev.generation, ev.recovery_s,
                        reason)
            return True
        return False

    # ---- status and shutdown ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Ranks (node, Ray node, pid, worker address, experts per layer, latest stats), nodes, recoveries."""
        with self._lock:
            ranks = [{"rank": r.rank, "node": r.node, "ray_node_id": r.node_id, "ip": r.ip, "pid": r.pid,
                      "address": f"{r.address[0]}:{r.address[1]}", "local_experts": r.local_experts,
                      "loaded_experts": r.loaded_experts,
                      "steps": r.health.get("steps", 0), "stats": r.health.get("stats", {})} for r in self.ranks]
        return {
            "world_size": self.topo.world_size, "generation": self.generation, "fatal": self.fatal,
            "standby_ranks": len(self._standby),
            "nodes": [{"name": n.name, "find": n.describe(), "device": n.device, "ranks": n.ranks,
                       "ray_node_id": self.node_ids.get(n.name, "")} for n in self.topo.nodes],
            "ranks": ranks,
            "recoveries": [{"reason": e.reason, "at": e.detected_at, "recovery_s": e.recovery_s,
                            "generation": e.generation} for e in self.recoveries],
        }

    def inject_fault(self, rank: int, kind: str, seconds: float = 0.0) -> None:
        """Test-only: make `rank` hang, crash or exit (RankActor.inject_fault)."""
        import ray

        ray.get(self.ranks[rank].actor.inject_fault.remote(kind, seconds), timeout=10)

    def shutdown(self) -> None:
        """Stop the monitor, kill every rank (and the standby), remove the placement groups."""
        import ray

        self._stop.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=self.topo.health.ping_timeout_s + 10)
        with self._lock:
            if ray.is_initialized():
                # Kill, not stop one by one: a rank stopping first would fail its peers' collectives.
                self._kill_actors(self.ranks + self._standby)
                self._standby = []
                self._remove_placement_groups()
            self._pgs.clear()
            self.ranks = []

    def _kill_actors(self, handles: list[RankHandle]) -> None:
        import ray

        for h in handles:
            try:
                ray.kill(h.actor, no_restart=True)
            except Exception:  # already dead
                pass
        # Wait until Ray reports them dead, so their bundles are free for the next generation.
        deadline = time.monotonic() + 30
        for h in handles:
            while time.monotonic() < deadline:
                try:
                    ray.get(h.actor.health.remote(), timeout=1)
                except ray.exceptions.GetTimeoutError:
                    continue
                except ray.exceptions.RayError:
                    break
                time.sleep(0.05)


def _available(node_id: str) -> dict[str, float]:
    """Free resources on one Ray node (best effort; empty when the state API cannot say)."""
    try:
        from ray._private.state import available_resources_per_node

        return dict(available_resources_per_node().get(node_id, {}))
    except Exception:
        return {}
