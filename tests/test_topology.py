"""The topology YAML: the examples load; every bad file fails with a message naming file, field and what is allowed."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from cluster.topology import RayNode, Topology, TopologyError, load_topology, match_nodes
from engine.model.config import TINY

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

GOOD = {
    "model": {"path": "ckpt", "dtype": "float32", "config": "tiny"},
    "nodes": [{"name": "a", "ranks": 2}, {"name": "b", "label": {"megaserve.node": "b"}, "ranks": 2}],
}


def _write(tmp_path: Path, doc: object, name: str = "topo.yaml") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def _bad(tmp_path: Path, doc: object, *needles: str) -> str:
    p = _write(tmp_path, doc)
    with pytest.raises(TopologyError) as e:
        load_topology(p)
    msg = str(e.value)
    assert str(p) in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def _with(path: str, value: object) -> dict:
    """GOOD with one field (dotted path, list indices as ints) set or deleted (value ...)."""
    doc = copy.deepcopy(GOOD)
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    cur = doc
    for k in keys[:-1]:
        if isinstance(k, str) and k not in cur:
            cur[k] = {}
        cur = cur[k]
    if value is ...:
        del cur[keys[-1]]
    else:
        cur[keys[-1]] = value
    return doc


# ---- good files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,world,slots", [("local", 4, 2), ("v4-pro-blackwell", 16, 25),
                                              ("v4-flash-blackwell", 8, 33)])
def test_examples_load(name: str, world: int, slots: int) -> None:
    t = load_topology(EXAMPLES / f"{name}.yaml")
    assert isinstance(t, Topology)
    assert t.world_size == world and t.ep_size == world
    assert t.slots_per_rank() == slots
    assert [r.rank for r in t.ranks()] == list(range(world))


def test_local_example_shape() -> None:
    t = load_topology(EXAMPLES / "local.yaml")
    assert [(n.name, n.ranks, n.device, dict(n.label)) for n in t.nodes] == [
        ("a", 2, "cpu", {"megaserve.node": "a"}), ("b", 2, "cpu", {"megaserve.node": "b"})]
    assert [(r.node, r.local_rank) for r in t.ranks()] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert t.model.path == (EXAMPLES.parent / "out" / "demo" / "tiny").resolve()
    assert t.server.state_dir == (EXAMPLES.parent / "out" / "megaserve" / "local").resolve()
    assert t.ray.address == "" and t.model_config().n_routed_experts == 8


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    t = load_topology(_write(tmp_path, GOOD))
    assert t.model.path == tmp_path / "ckpt"
    assert t.nodes[0].label == {"megaserve.node": "a"}  # default label: the node's name
    assert t.parallel.ep_backend == "sync" and t.parallel.placement.policy == "static"
    assert t.health.max_restarts == 3 and t.health.step_timeout_s == 30.0
    assert t.server.port == 8000 and t.server.state_dir.is_absolute()
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.nodes = ()  # type: ignore[misc]


def test_config_json_wins_over_preset(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(TINY.to_dict() | {"n_routed_experts": 12}))
    t = load_topology(_write(tmp_path, _with("nodes", [{"name": "a", "ranks": 3}])))
    assert t.model_config().n_routed_experts == 12 and t.slots_per_rank() == 4


# ---- bad files: one test per case ------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "nope.yaml")


def test_not_yaml(tmp_path: Path) -> None:
    _bad(tmp_path, "model: [unclosed\n", "not valid YAML")


def test_top_level_not_mapping(tmp_path: Path) -> None:
    _bad(tmp_path, "- a\n- b\n", "(top level)", "must be a mapping")


def test_unknown_top_level_field(tmp_path: Path) -> None:
    _bad(tmp_path, GOOD | {"nodez": []}, "'nodez'", "unknown field", "allowed fields here: model, nodes")


def test_unknown_nested_field(tmp_path: Path) -> None:
    _bad(tmp_path, _with("parallel.placement.redundant", 2), "'parallel.placement.redundant'", "unknown field",
         "redundant_experts")


def test_unknown_node_field(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.1.rank", 2), "'nodes[1].rank'", "unknown field", "ranks")


def test_missing_model(tmp_path: Path) -> None:
    _bad(tmp_path, _with("model", ...), "'model'", "missing")


def test_model_without_path_or_config(tmp_path: Path) -> None:
    _bad(tmp_path, _with("model", {"dtype": "float32"}), "'model'", "model.path", "model.config")


def test_model_path_without_config_json(tmp_path: Path) -> None:
    _bad(tmp_path, _with("model.config", ...), "'model'", "no config.json")


def test_unknown_preset(tmp_path: Path) -> None:
    _bad(tmp_path, _with("model.config", "v5"), "'model.config'", "v4-flash, v4-pro")


def test_bad_dtype(tmp_path: Path) -> None:
    _bad(tmp_path, _with("model.dtype", "float16"), "'model.dtype'", "float32, bfloat16", "'float16'")


def test_missing_nodes(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes", ...), "'nodes'", "missing")


def test_empty_nodes(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes", []), "'nodes'", "non-empty list")


def test_node_without_name(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.0.name", ...), "'nodes[0].name'", "missing")


def test_duplicate_node_name(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.1.name", "a"), "'nodes[1].name'", "duplicate")


def test_two_nodes_same_label(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.1.label", {"megaserve.node": "a"}), "'nodes[1]'", "same Ray node as nodes[0]")


def test_label_and_address_both_given(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.1.address", "10.0.0.1"), "'nodes[1]'", "label or address, not both")


def test_label_wrong_type(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.1.label", "b"), "'nodes[1].label'", "mapping")


def test_label_value_wrong_type(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.1.label", {"megaserve.node": 3}), "'nodes[1].label.megaserve.node'", "strings")


@pytest.mark.parametrize("label", [{"megaserve node": "b"}, {"megaserve.node": "b c"}, {"x/y/z": "b"},
                                   {"megaserve.node": "-b"}, {"megaserve.node": "b" * 64}])
def test_label_syntax(tmp_path: Path, label: dict) -> None:
    _bad(tmp_path, _with("nodes.1.label", label), "'nodes[1].label.", "not a Ray (Kubernetes-style) label")


def test_label_with_prefix(tmp_path: Path) -> None:
    t = load_topology(_write(tmp_path, _with("nodes.1.label", {"example.com/rack": "r-1_b.2"})))
    assert t.nodes[1].label == {"example.com/rack": "r-1_b.2"}


def test_missing_ranks(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.0.ranks", ...), "'nodes[0].ranks'", "missing")


def test_ranks_wrong_type(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.0.ranks", "2"), "'nodes[0].ranks'", "must be an integer", "str '2'")


def test_ranks_bool_is_not_int(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.0.ranks", True), "'nodes[0].ranks'", "must be an integer", "boolean")


def test_ranks_zero(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.0.ranks", 0), "'nodes[0].ranks'", ">= 1")


def test_unknown_device(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.0.device", "tpu"), "'nodes[0].device'", "cpu, cuda", "'tpu'")


def test_cuda_without_accelerator(tmp_path: Path) -> None:
    doc = _with("nodes", [{"name": "a", "device": "cuda", "ranks": 4}])
    _bad(tmp_path, doc, "'nodes[0].accelerator'", "required for device cuda", "b200")


def test_unknown_accelerator(tmp_path: Path) -> None:
    doc = _with("nodes", [{"name": "a", "device": "cuda", "ranks": 4, "accelerator": "a100"}])
    _bad(tmp_path, doc, "'nodes[0].accelerator'", "b200, gb200, gb300, h200, h100")


def test_accelerator_on_cpu(tmp_path: Path) -> None:
    _bad(tmp_path, _with("nodes.0.accelerator", "b200"), "'nodes[0].accelerator'", "only to device cuda")


def test_mixed_devices(tmp_path: Path) -> None:
    doc = _with("nodes", [{"name": "a", "ranks": 2}, {"name": "b", "ranks": 2, "device": "cuda",
                                                      "accelerator": "h100"}])
    _bad(tmp_path, doc, "'nodes'", "same device")


def test_unknown_backend(tmp_path: Path) -> None:
    _bad(tmp_path, _with("parallel.ep_backend", "deepep"), "'parallel.ep_backend'", "sync, tbo, wave", "'deepep'")


def test_backends_come_from_the_registry(tmp_path: Path) -> None:
    from comm.backends.registry import Capabilities, register_backend, unregister_backend

    t = load_topology(_write(tmp_path, _with("parallel.ep_backend", "ll")))
    assert t.parallel.ep_backend == "ll"
    register_backend("gpu-only", Capabilities(devices=("cuda",)), target="somewhere:Else")
    try:
        _bad(tmp_path, _with("parallel.ep_backend", "gpu-only"), "'parallel.ep_backend'",
             "gpu-only runs on cuda, the nodes are cpu")
    finally:
        unregister_backend("gpu-only")


def test_unknown_placement_policy(tmp_path: Path) -> None:
    _bad(tmp_path, _with("parallel.placement.policy", "random"), "'parallel.placement.policy'", "static, eplb")


def test_negative_redundant_experts(tmp_path: Path) -> None:
    _bad(tmp_path, _with("parallel.placement.redundant_experts", -1), "'parallel.placement.redundant_experts'",
         ">= 0")


def test_rebalance_with_static_policy(tmp_path: Path) -> None:
    _bad(tmp_path, _with("parallel.placement.rebalance_interval_steps", 100),
         "'parallel.placement.rebalance_interval_steps'", "policy static")


def test_ep_size_not_dividing_experts(tmp_path: Path) -> None:
    # tiny has 8 routed experts; 3 ranks do not divide them
    doc = _with("nodes", [{"name": "a", "ranks": 2}, {"name": "b", "ranks": 1}])
    _bad(tmp_path, doc, "'nodes'", "EP size (total ranks = 3)", "8 routed experts", "[1, 2, 4, 8]")


def test_redundant_experts_not_filling_slots(tmp_path: Path) -> None:
    doc = _with("nodes", [{"name": "a", "ranks": 2}, {"name": "b", "ranks": 1}])
    doc["parallel"] = {"placement": {"policy": "eplb", "redundant_experts": 2}}
    _bad(tmp_path, doc, "'parallel.placement.redundant_experts'", "multiple of the EP size 3", "e.g. 4 redundant")


def test_redundant_experts_make_odd_world_fit(tmp_path: Path) -> None:
    doc = _with("nodes", [{"name": "a", "ranks": 2}, {"name": "b", "ranks": 1}])
    doc["parallel"] = {"placement": {"policy": "eplb", "redundant_experts": 4}}
    t = load_topology(_write(tmp_path, doc))
    assert t.world_size == 3 and t.slots_per_rank() == 4


def test_more_ranks_than_slots(tmp_path: Path) -> None:
    doc = _with("nodes", [{"name": "a", "ranks": 16}])
    _bad(tmp_path, doc, "EP size (total ranks = 16)", "8 routed experts")


def test_page_tokens_not_multiple_of_128(tmp_path: Path) -> None:
    _bad(tmp_path, _with("scheduler.page_tokens", 100), "'scheduler.page_tokens'", "multiple of 128")


def test_scheduler_wrong_type(tmp_path: Path) -> None:
    _bad(tmp_path, _with("scheduler.max_num_seqs", 1.5), "'scheduler.max_num_seqs'", "integer", "float 1.5")


def test_max_model_len_too_long(tmp_path: Path) -> None:
    _bad(tmp_path, _with("scheduler.max_model_len", 10**9), "'scheduler.max_model_len'", "max_position_embeddings")


def test_kv_budget_and_fraction(tmp_path: Path) -> None:
    doc = _with("kv_cache", {"budget_bytes": 2**20, "memory_fraction": 0.5})
    _bad(tmp_path, doc, "'kv_cache'", "not both")


def test_kv_fraction_out_of_range(tmp_path: Path) -> None:
    _bad(tmp_path, _with("kv_cache.memory_fraction", 1.5), "'kv_cache.memory_fraction'", "<= 1.0")


def test_kv_dtype(tmp_path: Path) -> None:
    from cluster.rank_actor import engine_config

    _bad(tmp_path, _with("kv_cache.dtype", "int8"), "'kv_cache.dtype'", "bfloat16, float32, fp8")
    topo = load_topology(_write(tmp_path, _with("kv_cache.dtype", "fp8")))
    assert topo.kv_cache.dtype == "fp8"
    assert engine_config(topo, "cpu").kv_cache_dtype == "fp8"  # what each rank's engine gets
    assert engine_config(load_topology(_write(tmp_path, GOOD)), "cpu").kv_cache_dtype is None


def test_kv_disk(tmp_path: Path) -> None:
    from cluster.rank_actor import engine_config

    doc = _with("kv_cache.disk", {"path": "kv", "capacity_gb": 2, "swa": "periodic", "period_tokens": 1024})
    topo = load_topology(_write(tmp_path, doc))
    disk = topo.kv_cache.disk
    assert (disk.path, disk.capacity_gb, disk.swa, disk.period_tokens) == (str(tmp_path / "kv"), 2.0, "periodic", 1024)
    assert engine_config(topo, "cpu").disk_cache == disk  # what each rank's engine gets
    assert load_topology(_write(tmp_path, GOOD)).kv_cache.disk is None


def test_kv_disk_errors(tmp_path: Path) -> None:
    _bad(tmp_path, _with("kv_cache.disk", {"capacity_gb": 1}), "'kv_cache.disk.path'", "missing")
    _bad(tmp_path, _with("kv_cache.disk", {"path": "kv", "swa": "some"}), "'kv_cache.disk.swa'",
         "full, periodic, none")
    _bad(tmp_path, _with("kv_cache.disk", {"path": "kv", "size": 1}), "'kv_cache.disk.size'", "unknown field")
    _bad(tmp_path, _with("kv_cache.disk", {"path": "kv", "swa": "periodic", "period_tokens": 300}),
         "'kv_cache.disk.period_tokens'", "multiple of scheduler.page_tokens=256")


def test_port_out_of_range(tmp_path: Path) -> None:
    _bad(tmp_path, _with("server.port", 70000), "'server.port'", "<= 65535")


def test_port_string(tmp_path: Path) -> None:
    _bad(tmp_path, _with("server.port", "8000"), "'server.port'", "integer")


def test_bad_api_key_env(tmp_path: Path) -> None:
    _bad(tmp_path, _with("server.api_key_env", "MY-KEY"), "'server.api_key_env'", "environment variable name")


def test_server_not_mapping(tmp_path: Path) -> None:
    _bad(tmp_path, _with("server", [1]), "'server'", "must be a mapping", "a list")


def test_ray_address_wrong_type(tmp_path: Path) -> None:
    _bad(tmp_path, _with("ray.address", 6379), "'ray.address'", "must be a string", "HOST:PORT")


def test_health_timeout_not_positive(tmp_path: Path) -> None:
    _bad(tmp_path, _with("health.step_timeout_s", 0), "'health.step_timeout_s'", "> 0")


def test_health_max_restarts_negative(tmp_path: Path) -> None:
    _bad(tmp_path, _with("health.max_restarts", -1), "'health.max_restarts'", ">= 0")


# ---- against Ray's node table (launch time, before any actor starts) ---------------------------------
def _ray_nodes() -> list[RayNode]:
    return [RayNode("n1", "10.0.0.1", {"megaserve.node": "a", "ray.io/node-id": "n1"}, {"CPU": 2.0}),
            RayNode("n2", "10.0.0.2", {"megaserve.node": "b"}, {"CPU": 4.0, "GPU": 0.0})]


def test_match_nodes_by_label_and_address(tmp_path: Path) -> None:
    doc = _with("nodes", [{"name": "a", "ranks": 2}, {"name": "b", "address": "10.0.0.2", "ranks": 2}])
    m = match_nodes(load_topology(_write(tmp_path, doc)), _ray_nodes())
    assert m["a"].node_id == "n1" and m["b"].node_id == "n2"


def test_match_unknown_node(tmp_path: Path) -> None:
    doc = _with("nodes", [{"name": "a", "ranks": 2}, {"name": "c", "ranks": 2}])
    t = load_topology(_write(tmp_path, doc))
    with pytest.raises(TopologyError, match=r"'nodes\[1\]'.*node 'c' \(label megaserve.node=c\) matches no alive "
                       r"Ray node; Ray has: 10.0.0.1 labels \{'megaserve.node': 'a'\}"):
        match_nodes(t, _ray_nodes())


def test_match_too_many_ranks(tmp_path: Path) -> None:
    doc = _with("nodes", [{"name": "a", "ranks": 4}, {"name": "b", "ranks": 4}])
    t = load_topology(_write(tmp_path, doc))
    with pytest.raises(TopologyError, match=r"'nodes\[0\].ranks': topology asks for 4 ranks on node a; "
                                            r"Ray has 2 CPUs there"):
        match_nodes(t, _ray_nodes())


def test_match_gpus_counted_for_cuda(tmp_path: Path) -> None:
    doc = _with("nodes", [{"name": "b", "ranks": 4, "device": "cuda", "accelerator": "b200"}])
    t = load_topology(_write(tmp_path, doc))
    with pytest.raises(TopologyError, match="asks for 4 ranks on node b; Ray has 0 GPUs there"):
        match_nodes(t, _ray_nodes())


def test_match_ambiguous_label(tmp_path: Path) -> None:
    nodes = _ray_nodes() + [RayNode("n3", "10.0.0.3", {"megaserve.node": "a"}, {"CPU": 8.0})]
    t = load_topology(_write(tmp_path, GOOD))
    with pytest.raises(TopologyError, match="matches 2 Ray nodes"):
        match_nodes(t, nodes)
