"""The topology YAML: which model, which nodes and how many ranks each, how experts are placed, and the
limits of the scheduler, cache, server, Ray connection and health checks (frozen dataclasses).

`load_topology(path)` reads and validates a file; every error is a `TopologyError` that names the file,
the field (dotted path, e.g. `nodes[1].ranks`) and what is allowed. Unknown fields and wrong types are
errors. What can be checked before anything starts is checked here: the EP size (world size) against the
model's experts, node names, labels and addresses. What needs the Ray cluster (does a node exist, does it
have room for its ranks) is checked by `match_nodes` against Ray's node table, before any actor starts.

Paths in the file (`model.path`, `server.state_dir`, `kv_cache.disk.path`) are relative to the YAML's folder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from comm.backends.registry import backend_capabilities, backend_names
from comm.placement_policy import PLACEMENT_POLICIES
from engine.cache.accounting import KV_CACHE_DTYPES
from engine.cache.disk_config import SWA_MODES, DiskCacheConfig
from engine.model.config import MODEL_DTYPES, PRESETS, WEIGHT_MODES, ConfigError, ModelConfig, get_preset

DEVICES = ("cpu", "cuda")
ACCELERATORS = ("b200", "gb200", "gb300", "h200", "h100")
DEFAULT_LABEL_KEY = "megaserve.node"


_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return bool(_LABEL_NAME.fullmatch(name)) and (not prefix or (len(prefix) <= 253
                                                                  and bool(_DNS_SUBDOMAIN.fullmatch(prefix))))


class TopologyError(ValueError):
    """The topology file is invalid or does not fit the cluster; the message names the file and field."""


# ---- the dataclasses ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    path: Path | None  # absolute (resolved against the YAML's folder); None when only `config` is given
    dtype: str = "bfloat16"
    config: str | None = None  # a preset name, used when `path` has no config.json
    weights: str = "native"  # native: checkpoint precision in memory; dequantized: every weight in `dtype`

    def model_config(self) -> ModelConfig:
        """config.json of `path` when it exists, else the preset `config`."""
        if self.path is not None and (self.path / "config.json").is_file():
            return ModelConfig.from_json(self.path)
        if self.config is not None:
            return get_preset(self.config)
        raise ConfigError(f"{self.path}: no config.json, and model.config names no preset")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    label: Mapping[str, str] | None  # Ray node labels the node must carry; None when `address` is given
    address: str | None  # the Ray node's IP address
    device: str = "cpu"
    ranks: int = 1
    accelerator: str | None = None  # hardware profile (planner); required for cuda

    @property
    def resource(self) -> str:
        """The Ray resource each rank takes: GPU on cuda nodes, CPU on cpu nodes."""
        return "GPU" if self.device == "cuda" else "CPU"

    def describe(self) -> str:
        """How this node is found in Ray, for messages."""
        if self.address is not None:
            return f"address {self.address}"
        return "label " + ", ".join(f"{k}={v}" for k, v in (self.label or {}).items())


@dataclass(frozen=True)
class PlacementSpec:
    policy: str = "static"
    redundant_experts: int = 0
    rebalance_interval_steps: int = 0  # 0 = never rebalance
    load_window_steps: int = 128


@dataclass(frozen=True)
class ParallelSpec:
    ep_backend: str = "sync"
    placement: PlacementSpec = field(default_factory=PlacementSpec)


@dataclass(frozen=True)
class SchedulerSpec:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    page_tokens: int = 256
    max_model_len: int | None = None


@dataclass(frozen=True)
class KVCacheSpec:
    budget_bytes: int | None = None
    memory_fraction: float | None = None
    dtype: str | None = None  # None = the model dtype
    disk: DiskCacheConfig | None = None  # a disk tier under the prefix cache (path absolute after loading)


@dataclass(frozen=True)
class ServerSpec:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port
    api_key_env: str | None = None  # name of the environment variable holding the API key
    state_dir: Path = Path(".megaserve")  # absolute after loading; default ~/.megaserve/<yaml stem>
    max_body_bytes: int = 8 * 2**20
    max_batch_file_bytes: int = 100 * 2**20
    batch_concurrency: int = 8
    max_choices_per_request: int = 256  # prompts x n of one request (more: 413)
    max_requests_in_flight: int = 1024  # POST /v1/* requests served at once (more: 429 + Retry-After)
    max_file_storage_bytes: int = 10 * 2**30  # all stored batch files together (uploads beyond: 413)


@dataclass(frozen=True)
class RaySpec:
    address: str = ""  # "" = start an embedded local Ray
    namespace: str = "megaserve"


@dataclass(frozen=True)
class HealthSpec:
    ping_interval_s: float = 1.0
    ping_timeout_s: float = 5.0
    step_timeout_s: float = 30.0
    max_restarts: int = 3


@dataclass(frozen=True)
class RankSpec:
    rank: int  # global rank = EP rank
    node: str  # node name
    local_rank: int  # index among the node's ranks (the GPU index on cuda nodes)


@dataclass(frozen=True)
class Topology:
    source: Path  # the YAML file
    model: ModelSpec
    nodes: tuple[NodeSpec, ...]
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    kv_cache: KVCacheSpec = field(default_factory=KVCacheSpec)
    server: ServerSpec = field(default_factory=ServerSpec)
    ray: RaySpec = field(default_factory=RaySpec)
    health: HealthSpec = field(default_factory=HealthSpec)

    @property
    def world_size(self) -> int:
        return sum(n.ranks for n in self.nodes)

    @property
    def ep_size(self) -> int:
        return self.world_size

    def ranks(self) -> tuple[RankSpec, ...]:
        """Global ranks in node order: node 0's ranks first, then node 1's, ..."""
        out: list[RankSpec] = []
        for node in self.nodes:
            for local in range(node.ranks):
                out.append(RankSpec(len(out), node.name, local))
        return tuple(out)

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"{self.source}: no node named {name!r}; nodes are {[n.name for n in self.nodes]}")

    def model_config(self) -> ModelConfig:
        return self.model.model_config()

    def slots_per_rank(self) -> int:
        """Physical expert slots per rank: (n_routed_experts + redundant_experts) / ep_size."""
        return (self.model_config().n_routed_experts + self.parallel.placement.redundant_experts) // self.ep_size


# ---- reading -----------------------------------------------------------------------------------------
class _Reader:
    """Typed access to one mapping of the YAML, with errors naming file and field."""

    def __init__(self, file: Path, where: str, raw: Any) -> None:
        self.file = file
        self.where = where
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise self.error(where or "(top level)", f"must be a mapping, got {_kind(raw)}")
        self.raw = raw

    def error(self, field_name: str, msg: str) -> TopologyError:
        return TopologyError(f"{self.file}: field '{field_name}': {msg}")

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def check_keys(self, allowed: Sequence[str]) -> None:
        for key in self.raw:
            if key not in allowed:
                raise self.error(self.path(str(key)), f"unknown field; allowed fields here: {', '.join(allowed)}")

    def has(self, key: str) -> bool:
        return key in self.raw and self.raw[key] is not None

    def sub(self, key: str) -> _Reader:
        return _Reader(self.file, self.path(key), self.raw.get(key))

    def str_(self, key: str, default: Any, choices: Sequence[str] | None = None) -> Any:
        """A string (one of `choices` when given); null is allowed only when the default is null."""
        v = self.raw.get(key, default)
        if v is None and default is None:
            return None
        if not isinstance(v, str):
            raise self.error(self.path(key), f"must be a string{_choices(choices)}, got {_kind(v)}")
        if choices is not None and v not in choices:
            raise self.error(self.path(key), f"must be one of {', '.join(choices)}; got {v!r}")
        return v

    def int_(self, key: str, default: Any, minimum: int | None = None, maximum: int | None = None,
             optional: bool = False) -> Any:
        v = self.raw.get(key, default)
        if v is None and optional:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.error(self.path(key), f"must be an integer{' or null' if optional else ''}, got {_kind(v)}")
        if minimum is not None and v < minimum:
            raise self.error(self.path(key), f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise self.error(self.path(key), f"must be <= {maximum}, got {v}")
        return v

    def float_(self, key: str, default: Any, positive: bool = True, optional: bool = False,
               maximum: float | None = None) -> Any:
        v = self.raw.get(key, default)
        if v is None and optional:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise self.error(self.path(key), f"must be a number{' or null' if optional else ''}, got {_kind(v)}")
        if positive and v <= 0:
            raise self.error(self.path(key), f"must be > 0, got {v}")
        if maximum is not None and v > maximum:
            raise self.error(self.path(key), f"must be <= {maximum}, got {v}")
        return float(v)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {v}"
    if isinstance(v, (int, float, str)):
        return f"{type(v).__name__} {v!r}"
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return type(v).__name__


def _choices(choices: Sequence[str] | None) -> str:
    return f" (one of {', '.join(choices)})" if choices else ""


_TOP = ("model", "nodes", "parallel", "scheduler", "kv_cache", "server", "ray", "health")


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology YAML file."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        raise TopologyError(f"{file}: cannot read the topology: {e.strerror or e}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TopologyError(f"{file}: not valid YAML: {e}") from e
    return parse_topology(raw, file)


def parse_topology(raw: Any, file: str | Path) -> Topology:
    """Validate an already-parsed YAML document; `file` names it in errors and anchors relative paths."""
    file = Path(file)
    base = file.resolve().parent
    top = _Reader(file, "", raw)
    top.check_keys(_TOP)
    if "model" not in top.raw:
        raise top.error("model", "missing; give model.path (a checkpoint folder) and/or model.config (a preset)")
    if "nodes" not in top.raw:
        raise top.error("nodes", "missing; give a list of nodes, e.g. [{name: a, ranks: 2}]")
    model = _model(top.sub("model"), base)
    nodes = _nodes(top)
    parallel = _parallel(top.sub("parallel"), nodes[0].device)
    topo = Topology(
        source=file, model=model, nodes=nodes, parallel=parallel,
        scheduler=_scheduler(top.sub("scheduler")), kv_cache=_kv_cache(top.sub("kv_cache"), base),
        server=_server(top.sub("server"), base, file), ray=_ray(top.sub("ray")), health=_health(top.sub("health")),
    )
    disk = topo.kv_cache.disk
    if disk is not None and disk.swa == "periodic" and disk.period_tokens % topo.scheduler.page_tokens:
        raise TopologyError(f"{file}: field 'kv_cache.disk.period_tokens': must be a multiple of "
                            f"scheduler.page_tokens={topo.scheduler.page_tokens}, got {disk.period_tokens}")
    _check_model_fit(topo)
    return topo


def _model(r: _Reader, base: Path) -> ModelSpec:
    r.check_keys(("path", "dtype", "config", "weights"))
    path = r.str_("path", None)
    config = r.str_("config", None, choices=sorted(PRESETS))
    if path is None and config is None:
        raise r.error("model", "give model.path (a checkpoint folder) and/or model.config (a preset name: "
                      f"{', '.join(sorted(PRESETS))})")
    if path is not None and not path:
        raise r.error("model.path", "must be a non-empty path")
    dtype = r.str_("dtype", "bfloat16", choices=MODEL_DTYPES)
    weights = r.str_("weights", "native", choices=WEIGHT_MODES)
    return ModelSpec(path=(base / path).resolve() if path is not None else None, dtype=dtype, config=config,
                     weights=weights)


def _nodes(top: _Reader) -> tuple[NodeSpec, ...]:
    raw = top.raw["nodes"]
    if not isinstance(raw, list) or not raw:
        raise top.error("nodes", f"must be a non-empty list of nodes, got {_kind(raw)}")
    out: list[NodeSpec] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(raw):
        r = _Reader(top.file, f"nodes[{i}]", item)
        r.check_keys(("name", "label", "address", "device", "ranks", "accelerator"))
        if "name" not in r.raw:
            raise r.error(r.path("name"), "missing; every node needs a unique name")
        name = r.str_("name", None)
        if not name:
            raise r.error(r.path("name"), "must be a non-empty string")
        if name in seen:
            raise r.error(r.path("name"), f"duplicate node name {name!r} (also {seen[name]})")
        seen[name] = r.where
        if r.has("label") and r.has("address"):
            raise r.error(r.where, "give label or address, not both")
        label: dict[str, str] | None = None
        address = None
        if r.has("address"):
            address = r.str_("address", None)
            if not address:
                raise r.error(r.path("address"), "must be a non-empty IP address")
        else:
            lab = r.raw.get("label")
            if lab is None:
                label = {DEFAULT_LABEL_KEY: name}
            else:
                if not isinstance(lab, Mapping) or not lab:
                    raise r.error(r.path("label"), f"must be a non-empty mapping of label key to value, "
                                  f"got {_kind(lab)}")
                for k, v in lab.items():
                    if not isinstance(k, str) or not isinstance(v, str) or not k or not v:
                        raise r.error(r.path(f"label.{k}"), f"label keys and values must be non-empty strings, "
                                      f"got {_kind(k)}: {_kind(v)}")
                    if not _label_key_ok(k) or not _LABEL_NAME.fullmatch(v):
                        raise r.error(r.path(f"label.{k}"), f"{k}: {v} is not a Ray (Kubernetes-style) label: key "
                                      "[prefix/]name and value of at most 63 letters, digits, '-', '_', '.', "
                                      "beginning and ending with a letter or digit")
                label = dict(lab)
        device = r.str_("device", "cpu", choices=DEVICES)
        if "ranks" not in r.raw:
            raise r.error(r.path("ranks"), "missing; the number of ranks (processes, one per GPU on cuda) here")
        ranks = r.int_("ranks", None, minimum=1)
        accelerator = r.str_("accelerator", None, choices=ACCELERATORS)
        if device == "cuda" and accelerator is None:
            raise r.error(r.path("accelerator"), f"required for device cuda: one of {', '.join(ACCELERATORS)}")
        if device == "cpu" and accelerator is not None:
            raise r.error(r.path("accelerator"), "applies only to device cuda; remove it or set it to null")
        out.append(NodeSpec(name=name, label=label, address=address, device=device, ranks=ranks,
                            accelerator=accelerator))
    where_of: dict[Any, str] = {}
    for i, n in enumerate(out):
        key = ("address", n.address) if n.address is not None else ("label", tuple(sorted(n.label.items())))
        if key in where_of:
            raise top.error(f"nodes[{i}]", f"finds the same Ray node as {where_of[key]} ({n.describe()}); "
                            "each node must name a different Ray node")
        where_of[key] = f"nodes[{i}]"
    if len({n.device for n in out}) > 1:
        raise top.error("nodes", "all nodes must have the same device (cpu or cuda); one EP group spans them all")
    return tuple(out)


def _parallel(r: _Reader, device: str) -> ParallelSpec:
    """`ep_backend`: a name registered in comm.backends.registry (a plugin's backend: import it first) that runs
    on the nodes' device."""
    r.check_keys(("ep_backend", "placement"))
    backend = r.str_("ep_backend", "sync", choices=backend_names())
    devices = backend_capabilities(backend).devices
    if device not in devices:
        raise r.error(r.path("ep_backend"), f"{backend} runs on {', '.join(devices)}, the nodes are {device}")
    p = r.sub("placement")
    p.check_keys(("policy", "redundant_experts", "rebalance_interval_steps", "load_window_steps"))
    policy = p.str_("policy", "static", choices=PLACEMENT_POLICIES)
    placement = PlacementSpec(
        policy=policy,
        redundant_experts=p.int_("redundant_experts", 0, minimum=0),
        rebalance_interval_steps=p.int_("rebalance_interval_steps", 0, minimum=0),
        load_window_steps=p.int_("load_window_steps", 128, minimum=1),
    )
    if policy == "static" and placement.rebalance_interval_steps:
        raise p.error(p.path("rebalance_interval_steps"), "must be 0 with policy static (only eplb rebalances)")
    return ParallelSpec(ep_backend=backend, placement=placement)


def _scheduler(r: _Reader) -> SchedulerSpec:
    r.check_keys(("max_num_seqs", "max_num_batched_tokens", "page_tokens", "max_model_len"))
    s = SchedulerSpec(
        max_num_seqs=r.int_("max_num_seqs", 64, minimum=1),
        max_num_batched_tokens=r.int_("max_num_batched_tokens", 1024, minimum=1),
        page_tokens=r.int_("page_tokens", 256, minimum=1),
        max_model_len=r.int_("max_model_len", None, minimum=1, optional=True),
    )
    if s.page_tokens % 128:
        raise r.error(r.path("page_tokens"), f"must be a multiple of 128 (the largest compress ratio), got "
                      f"{s.page_tokens}")
    return s


def _kv_cache(r: _Reader, base: Path) -> KVCacheSpec:
    r.check_keys(("budget_bytes", "memory_fraction", "dtype", "disk"))
    kv = KVCacheSpec(
        budget_bytes=r.int_("budget_bytes", None, minimum=1, optional=True),
        memory_fraction=r.float_("memory_fraction", None, optional=True, maximum=1.0),
        dtype=r.str_("dtype", None, choices=tuple(KV_CACHE_DTYPES)),
        disk=_kv_disk(r.sub("disk"), base) if r.has("disk") else None,
    )
    if kv.budget_bytes is not None and kv.memory_fraction is not None:
        raise r.error(r.where, "give budget_bytes or memory_fraction, not both")
    return kv


def _kv_disk(r: _Reader, base: Path) -> DiskCacheConfig:
    r.check_keys(("path", "capacity_gb", "swa", "period_tokens"))
    path = r.str_("path", "")
    if not path:
        raise r.error(r.path("path"), "missing; give the folder the disk tier writes its page files to")
    disk = DiskCacheConfig(path=str((base / path).resolve()), capacity_gb=r.float_("capacity_gb", 16.0),
                           swa=r.str_("swa", "full", choices=SWA_MODES), period_tokens=r.int_("period_tokens", 4096,
                                                                                              minimum=1))
    return disk


def _server(r: _Reader, base: Path, file: Path) -> ServerSpec:
    r.check_keys(("host", "port", "api_key_env", "state_dir", "max_body_bytes", "max_batch_file_bytes",
                  "batch_concurrency", "max_choices_per_request", "max_requests_in_flight", "max_file_storage_bytes"))
    host = r.str_("host", "127.0.0.1")
    if not host:
        raise r.error(r.path("host"), "must be a non-empty host name or IP address")
    env = r.str_("api_key_env", None)
    if env is not None and not env.replace("_", "a").isalnum():
        raise r.error(r.path("api_key_env"), f"must be an environment variable name (letters, digits, _), got {env!r}")
    state = r.str_("state_dir", None)
    if state is not None and not state:
        raise r.error(r.path("state_dir"), "must be a non-empty path")
    state_dir = (base / state).resolve() if state else (Path.home() / ".megaserve" / file.stem).resolve()
    return ServerSpec(
        host=host,
        port=r.int_("port", 8000, minimum=0, maximum=65535),
        api_key_env=env,
        state_dir=state_dir,
        max_body_bytes=r.int_("max_body_bytes", 8 * 2**20, minimum=1),
        max_batch_file_bytes=r.int_("max_batch_file_bytes", 100 * 2**20, minimum=1),
        batch_concurrency=r.int_("batch_concurrency", 8, minimum=1),
        max_choices_per_request=r.int_("max_choices_per_request", 256, minimum=1),
        max_requests_in_flight=r.int_("max_requests_in_flight", 1024, minimum=1),
        max_file_storage_bytes=r.int_("max_file_storage_bytes", 10 * 2**30, minimum=1),
    )


def _ray(r: _Reader) -> RaySpec:
    r.check_keys(("address", "namespace"))
    ns = r.str_("namespace", "megaserve")
    if not ns:
        raise r.error(r.path("namespace"), "must be a non-empty string")
    address = r.raw.get("address", "")
    if address is None:
        address = ""
    if not isinstance(address, str):
        raise r.error(r.path("address"), f"must be a string ('' = embedded local Ray, 'auto', or HOST:PORT), "
                      f"got {_kind(address)}")
    return RaySpec(address=address, namespace=ns)


def _health(r: _Reader) -> HealthSpec:
    r.check_keys(("ping_interval_s", "ping_timeout_s", "step_timeout_s", "max_restarts"))
    return HealthSpec(
        ping_interval_s=r.float_("ping_interval_s", 1.0),
        ping_timeout_s=r.float_("ping_timeout_s", 5.0),
        step_timeout_s=r.float_("step_timeout_s", 30.0),
        max_restarts=r.int_("max_restarts", 3, minimum=0),
    )


def _check_model_fit(topo: Topology) -> None:
    """EP size against the model's experts; max_model_len against the model (when its config is known)."""
    f = topo.source
    try:
        cfg = topo.model_config()
    except ConfigError as e:
        raise TopologyError(f"{f}: field 'model': {e}") from e
    world = topo.world_size
    e = cfg.n_routed_experts
    red = topo.parallel.placement.redundant_experts
    if red == 0 and e % world:
        divisors = [d for d in range(1, e + 1) if e % d == 0]
        raise TopologyError(
            f"{f}: field 'nodes': the EP size (total ranks = {world}) must divide the model's {e} routed experts "
            f"when parallel.placement.redundant_experts is 0; use a total rank count in {divisors}, or add "
            f"redundant experts so that {e} + redundant_experts is a multiple of {world}")
    if (e + red) % world:
        need = -(e + red) % world
        raise TopologyError(
            f"{f}: field 'parallel.placement.redundant_experts': {e} routed experts + {red} redundant = {e + red} "
            f"physical slots must be a multiple of the EP size {world}; e.g. {red + need} redundant experts")
    mml = topo.scheduler.max_model_len
    if mml is not None and mml > cfg.max_position_embeddings:
        raise TopologyError(f"{f}: field 'scheduler.max_model_len': must be <= the model's max_position_embeddings "
                            f"{cfg.max_position_embeddings}, got {mml}")


# ---- matching against the Ray cluster ----------------------------------------------------------------
@dataclass(frozen=True)
class RayNode:
    """What the launcher needs of one alive Ray node (from `ray.nodes()`)."""

    node_id: str
    address: str
    labels: Mapping[str, str]
    resources: Mapping[str, float]  # total resources


def match_nodes(topo: Topology, ray_nodes: Sequence[RayNode]) -> dict[str, RayNode]:
    """Map each topology node to the one alive Ray node it names, and check each has room for its ranks
    (one CPU per cpu rank; one GPU per cuda rank). Raises TopologyError naming the node and what Ray has."""
    out: dict[str, RayNode] = {}
    summary = "; ".join(f"{n.address} labels {dict(_user_labels(n.labels))}" for n in ray_nodes) or "none"
    for i, node in enumerate(topo.nodes):
        if node.address is not None:
            found = [n for n in ray_nodes if n.address == node.address]
        else:
            found = [n for n in ray_nodes if all(n.labels.get(k) == v for k, v in (node.label or {}).items())]
        if not found:
            raise TopologyError(f"{topo.source}: field 'nodes[{i}]': node {node.name!r} ({node.describe()}) matches "
                                f"no alive Ray node; Ray has: {summary}")
        if len(found) > 1:
            raise TopologyError(f"{topo.source}: field 'nodes[{i}]': node {node.name!r} ({node.describe()}) matches "
                                f"{len(found)} Ray nodes ({', '.join(n.address for n in found)}); it must match one")
        rn = found[0]
        taken = [k for k, v in out.items() if v.node_id == rn.node_id]
        if taken:
            raise TopologyError(f"{topo.source}: field 'nodes[{i}]': node {node.name!r} finds the same Ray node as "
                                f"node {taken[0]!r} ({rn.address})")
        have = rn.resources.get(node.resource, 0.0)
        if have < node.ranks:
            raise TopologyError(f"{topo.source}: field 'nodes[{i}].ranks': topology asks for {node.ranks} ranks on "
                                f"node {node.name}; Ray has {have:g} {node.resource}s there ({rn.address})")
        out[node.name] = rn
    return out


def _user_labels(labels: Mapping[str, str]) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in labels.items() if not k.startswith("ray.io/"))
