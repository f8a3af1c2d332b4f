"""The launcher on a simulated two-node Ray cluster on this machine (ray.cluster_utils.Cluster, one Ray node
per topology node): placement of ranks and experts, generation equal to the single-process engine, recovery
from a killed and from a hung rank with unchanged greedy outputs, the limit on restarts, and `megaserve up`
then `down` leaving no process behind.

One embedded cluster and one launched rank group serve every test of the module (tiny model, few tokens).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster.topology import TopologyError, load_topology
from scheduler.sampling import SamplingParams

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MAX_TOKENS = 24
PROMPTS = [[(7 * i + 3 * j) % 500 + 2 for j in range(5 + (i % 7) * 3)] for i in range(16)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _topology(tmp: Path, ckpt: Path, **over: object) -> Path:
    doc = {
        "model": {"path": str(ckpt), "dtype": "float32"},
        "nodes": [{"name": "a", "label": {"megaserve.node": "a"}, "ranks": 2},
                  {"name": "b", "label": {"megaserve.node": "b"}, "ranks": 2}],
        "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 256, "page_tokens": 128},
        "kv_cache": {"budget_bytes": 16 * 2**20},
        "server": {"port": 0, "state_dir": str(tmp / "state")},
        "health": {"ping_interval_s": 0.5, "ping_timeout_s": 5.0, "step_timeout_s": 4.0, "max_restarts": 3},
    }
    doc.update(over)
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# ---- up / status / down (its own embedded Ray; runs before the shared cluster starts) -----------------
def _descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _up_detached(cli: list[str], topo_path: Path, state_dir: Path) -> dict:
    """`megaserve up --detach`; returns up.json once the driver is ready and has written status.json."""
    from cluster.service import pid_alive, read_state

    r = subprocess.run(cli + ["up", str(topo_path), "--detach", "--port", "0", "--ready-timeout", "240"],
                       cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr + (state_dir / "up.log").read_text()
    up = read_state(state_dir)
    assert up is not None and up["phase"] == "ready" and pid_alive(up["pid"])
    deadline = time.monotonic() + 30
    while read_state(state_dir, "status.json") is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return up

def test_up_status_down_leaves_no_process(tiny_ckpt: Path, tmp_path: Path) -> None:
    from cluster.service import pid_alive, read_state

    topo_path = _topology(tmp_path, tiny_ckpt)
    state_dir = tmp_path / "state"
    cli = [sys.executable, "-m", "cluster.cli"]
    up = _up_detached(cli, topo_path, state_dir)
    status = read_state(state_dir, "status.json")
    rank_pids = {r["pid"] for r in status["ranks"]}
    tree = _descendants(up["pid"]) | {up["pid"]} | rank_pids | {p for p, _ in status["processes"]}
    assert len(rank_pids) == 4 and rank_pids <= tree

    body = json.dumps({"model": tiny_ckpt.name, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(up["http"] + "/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    assert answer["usage"]["completion_tokens"] == 4 and answer["choices"][0]["finish_reason"] == "length"

    s = subprocess.run(cli + ["status", str(topo_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert s.returncode == 0, s.stderr
    assert "node a: cpu x 2 ranks" in s.stdout and "node b: cpu x 2 ranks" in s.stdout
    assert len([ln for ln in s.stdout.splitlines() if ln.strip().startswith(("0 ", "1 ", "2 ", "3 "))]) == 4

    d = subprocess.run(cli + ["down", str(topo_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert d.returncode == 0, d.stdout + d.stderr
    alive = sorted(p for p in tree if pid_alive(p))
    assert alive == [], f"left running after down: {alive}"
    assert read_state(state_dir) is None and not (state_dir / "status.json").exists()
    s = subprocess.run(cli + ["status", str(topo_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert s.returncode == 1 and "not up" in s.stdout


def test_down_after_the_driver_was_killed(tiny_ckpt: Path, tmp_path: Path) -> None:
    """kill -9 of `up` leaves Ray and the ranks running; `down` finds them in the state files."""
    from cluster.service import pid_alive

    topo_path = _topology(tmp_path, tiny_ckpt)
    state_dir = tmp_path / "state"
    cli = [sys.executable, "-m", "cluster.cli"]
    up = _up_detached(cli, topo_path, state_dir)
    tree = _descendants(up["pid"])
    os.kill(up["pid"], 9)
    time.sleep(0.5)
    assert any(pid_alive(p) for p in tree), "nothing outlived the driver: this test would prove nothing"
    # status does not just say "not up": it names what is still running and how to stop it
    s = subprocess.run(cli + ["status", str(topo_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert s.returncode == 1
    assert f"the driver (pid {up['pid']}) is gone, but " in s.stdout, s.stdout
    assert "of its processes (Ray, ranks) are still running" in s.stdout
    assert f"`megaserve down {topo_path}` stops them" in s.stdout
    d = subprocess.run(cli + ["down", str(topo_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert d.returncode == 0, d.stdout + d.stderr
    alive = sorted(p for p in tree if pid_alive(p))
    assert alive == [], f"left running after down: {alive}"
    s = subprocess.run(cli + ["status", str(topo_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert s.returncode == 1 and s.stdout.startswith("megaserve status: not up (") and "gone" not in s.stdout


# ---- the shared cluster ---------------------------------------------------------------------------------
class _Hook:
    """on_restart for the launcher's monitor thread: reset the current test's Router on its event loop."""

    def __init__(self) -> None:
        self.router = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.calls = 0

    def __call__(self, addresses: list[tuple[str, int]]) -> None:
        self.calls += 1
        if self.router is not None and self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.router.reset_ranks(addresses), self.loop).result(120)


@pytest.fixture(scope="module")
def env(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    from cluster.launcher import Launcher, connect_ray

    tmp = tmp_path_factory.mktemp("launcher")
    topo = load_topology(_topology(tmp, tiny_ckpt))
    conn = connect_ray(topo, log_to_driver=False)
    hook = _Hook()
    launcher = Launcher(topo, on_restart=hook, ready_timeout_s=240)
    try:
        launcher.start()
        launcher.start_monitor()
        yield topo, conn, launcher, hook
    finally:
        launcher.shutdown()
        conn.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path) -> list[list[int]]:
    """Greedy outputs of the single-process engine."""
    from engine.core.llm import LLM

    llm = LLM(tiny_ckpt, dtype="float32", page_tokens=128, max_num_seqs=16)
    return [list(o.token_ids) for o in llm.generate(PROMPTS, GREEDY)]


async def _generate(launcher, hook: _Hook, fault=None) -> tuple[list[list[int]], dict]:
    """All PROMPTS through a Router on the launched ranks; `fault(launcher)` runs (in a thread) once every
    request has produced a token. Returns the outputs and what happened."""
    from cluster.router import Router

    router = await Router(launcher.addresses, hold_on_loss=True, connect_timeout_s=60,
                          secret=launcher.secret).start()
    hook.router, hook.loop = router, asyncio.get_running_loop()
    produced = [0] * len(PROMPTS)
    first = asyncio.Event()

    async def one(i: int) -> list[int]:
        toks: list[int] = []
        async for out in router.submit(PROMPTS[i], GREEDY, req_id=f"q{i}-{time.monotonic_ns()}"):
            toks.extend(out.new_token_ids)
            produced[i] = len(toks)
            if all(produced):
                first.set()
        return toks

    info: dict = {}
    try:
        tasks = [asyncio.create_task(one(i)) for i in range(len(PROMPTS))]
        if fault is not None:
            await asyncio.wait_for(first.wait(), 60)
            info["unfinished_at_fault"] = sum(1 for p in produced if p < MAX_TOKENS)
            info["t_fault"] = time.monotonic()
            info["t_fault_wall"] = time.time()
            await asyncio.to_thread(fault, launcher)
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 180)
        info["t_done"] = time.monotonic()
        info["router_generation"] = router.generation
        return outs, info
    finally:
        hook.router = hook.loop = None
        await router.close()


def test_ranks_land_on_named_nodes(env) -> None:
    import ray

    topo, _, launcher, _ = env
    labels = {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes() if n["Alive"]}
    assert [r.node for r in launcher.ranks] == ["a", "a", "b", "b"]
    for r in launcher.ranks:
        assert r.node_id == launcher.node_ids[r.node]
        assert labels[r.node_id]["megaserve.node"] == r.node
    assert len({r.pid for r in launcher.ranks}) == 4
    assert launcher.node_ids["a"] != launcher.node_ids["b"]


def test_experts_per_rank_match_placement(env) -> None:
    from comm.placement import Placement

    topo, _, launcher, _ = env
    cfg = topo.model_config()
    placement = Placement.static(cfg.num_hidden_layers, cfg.n_routed_experts, topo.ep_size)
    for r in launcher.ranks:
        assert r.local_experts == [placement.local_logical(layer, r.rank) for layer in range(cfg.num_hidden_layers)]
        assert r.loaded_experts == sorted(placement.local_experts(r.rank)), f"rank {r.rank} loaded other experts"
    assert sorted(e for r in launcher.ranks for e in r.loaded_experts) == list(range(cfg.n_routed_experts))


def test_generation_equals_single_process_engine(env, reference) -> None:
    _, _, launcher, hook = env
    outs, _ = asyncio.run(_generate(launcher, hook))
    assert outs == reference


def test_killed_rank_recovers_with_identical_outputs(env, reference) -> None:
    import ray

    _, _, launcher, hook = env
    before = len(launcher.recoveries)
    victim = launcher.ranks[1]
    assert launcher.wait_standby(120), "the warm standby never started"
    outs, info = asyncio.run(_generate(launcher, hook, fault=lambda L: ray.kill(victim.actor, no_restart=True)))
    assert info["unfinished_at_fault"] > 0, "the fault came after every request had finished"
    assert len(launcher.recoveries) == before + 1 and info["router_generation"] == 1
    ev = launcher.recoveries[-1]
    assert "rank 1" in ev.reason and "dead" in ev.reason
    print(f"\nkilled rank 1 with {info['unfinished_at_fault']}/16 requests unfinished: restart took "
          f"{ev.recovery_s:.2f}s; all 16 done {info['t_done'] - info['t_fault']:.2f}s after the kill")
    assert outs == reference
    assert all(r.pid != victim.pid for r in launcher.ranks)


def test_hung_rank_detected_by_step_timeout(env, reference) -> None:
    topo, _, launcher, hook = env
    before = len(launcher.recoveries)
    assert launcher.wait_standby(120), "the warm standby never started"
    outs, info = asyncio.run(_generate(launcher, hook, fault=lambda L: L.inject_fault(2, "hang", 120.0)))
    assert info["unfinished_at_fault"] > 0
    assert len(launcher.recoveries) == before + 1
    ev = launcher.recoveries[-1]
    assert "made no step" in ev.reason and "2" in ev.reason.split("]")[0]  # rank 2 among the stalled ranks
    detect_s = ev.detected_at - info["t_fault_wall"]
    print(f"\nhung rank 2 detected {detect_s:.2f}s after the hang (step_timeout_s {topo.health.step_timeout_s:g}); "
          f"restart took {ev.recovery_s:.2f}s")
    assert detect_s < topo.health.step_timeout_s + 2 * topo.health.ping_interval_s + topo.health.ping_timeout_s
    assert outs == reference


def test_crashed_step_loop_is_restarted(env) -> None:
    _, _, launcher, _ = env
    before, gen = len(launcher.recoveries), launcher.generation
    launcher.inject_fault(3, "crash")  # the next step raises: the rank's step loop ends, its process lives
    deadline = time.monotonic() + 60
    while len(launcher.recoveries) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(launcher.recoveries) == before + 1 and launcher.generation == gen + 1
    assert "step loop stopped" in launcher.recoveries[-1].reason
    assert "injected crash on rank 3" in launcher.recoveries[-1].reason
    assert launcher.check() is None


def test_too_many_ranks_fail_before_anything_starts(env, tmp_path: Path, tiny_ckpt: Path) -> None:
    from ray.util import placement_group_table

    from cluster.launcher import Launcher

    _, conn, _, _ = env
    groups = len(placement_group_table())
    nodes = [{"name": "a", "ranks": 2}, {"name": "b", "ranks": 6}]
    topo = load_topology(_topology(tmp_path, tiny_ckpt, nodes=nodes, ray={"address": conn.address}))
    with pytest.raises(TopologyError, match="topology asks for 6 ranks on node b; Ray has 2 CPUs there"):
        Launcher(topo).start()
    assert len(placement_group_table()) == groups


def test_unknown_node_fails_before_anything_starts(env, tmp_path: Path, tiny_ckpt: Path) -> None:
    from ray.util import placement_group_table

    from cluster.launcher import Launcher

    _, conn, _, _ = env
    groups = len(placement_group_table())
    nodes = [{"name": "a", "ranks": 2}, {"name": "c", "ranks": 2}]
    topo = load_topology(_topology(tmp_path, tiny_ckpt, nodes=nodes, ray={"address": conn.address}))
    with pytest.raises(TopologyError, match=r"node 'c' \(label megaserve.node=c\) matches no alive Ray node"):
        Launcher(topo).start()
    assert len(placement_group_table()) == groups


def test_resources_held_elsewhere_time_out_with_a_clear_message(env, tmp_path: Path, tiny_ckpt: Path) -> None:
    from ray.util import placement_group_table

    from cluster.launcher import Launcher, LaunchError

    _, conn, _, _ = env  # the launched group holds every CPU of both nodes
    pending = lambda: sum(1 for g in placement_group_table().values() if g["state"] == "PENDING")  # noqa: E731
    before = pending()
    nodes = [{"name": "x", "label": {"megaserve.node": "a"}, "ranks": 2},
             {"name": "y", "label": {"megaserve.node": "b"}, "ranks": 2}]
    topo = load_topology(_topology(tmp_path, tiny_ckpt, nodes=nodes, ray={"address": conn.address}))
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"node x .*2 ranks could not be placed within 2s; Ray has 2 CPUs there, "
                                          r"0 free"):
        Launcher(topo, ready_timeout_s=2).start()
    assert time.monotonic() - t0 < 30
    assert pending() == before  # the groups it asked for were removed, not left waiting


def test_second_up_in_the_same_namespace_is_refused(env, tmp_path: Path, tiny_ckpt: Path) -> None:
    from cluster.launcher import Launcher, LaunchError

    _, conn, _, _ = env
    topo = load_topology(_topology(tmp_path, tiny_ckpt, ray={"address": conn.address}))
    with pytest.raises(LaunchError, match="already has a placement group 'megaserve-node-a'"):
        Launcher(topo, ready_timeout_s=2).start()


# ---- before anything starts (no Ray) -------------------------------------------------------------------
def test_up_refuses_a_missing_checkpoint_or_api_key(tmp_path: Path, tiny_ckpt: Path, capsys, monkeypatch) -> None:
    from cluster import service

    model = {"path": str(tmp_path / "nowhere"), "dtype": "float32", "config": "tiny"}  # plans, cannot serve
    assert service.up(_topology(tmp_path, tiny_ckpt, model=model)) == 2
    assert "field 'model.path'" in capsys.readouterr().err and not (tmp_path / "state" / "up.json").exists()
    monkeypatch.delenv("D_TEST_UNSET_KEY", raising=False)
    server = {"state_dir": "st", "api_key_env": "D_TEST_UNSET_KEY"}
    assert service.up(_topology(tmp_path, tiny_ckpt, server=server)) == 2
    assert "field 'server.api_key_env'" in capsys.readouterr().err
    # every cache dtype is served, FP8 included (issue 15): preflight passes them
    for kv in ("fp8", "bfloat16"):
        assert service.preflight(load_topology(_topology(tmp_path, tiny_ckpt, kv_cache={"dtype": kv})), port=0) is None


def test_a_busy_port_fails_before_ray_and_a_detached_log_starts_afresh(tmp_path: Path, tiny_ckpt: Path,
                                                                       capsys) -> None:
    """The HTTP port is checked before Ray or any rank starts; `up --detach` shows only this attempt's log."""
    import socket

    from cluster import service

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        topo_path = _topology(tmp_path, tiny_ckpt, server={"port": port, "state_dir": str(tmp_path / "state")})
        t0 = time.monotonic()
        assert service.up(topo_path) == 2
        err = capsys.readouterr().err
        assert f"field 'server.port': 127.0.0.1:{port} is in use (another server?)" in err
        assert "--port 0 for any free one" in err and time.monotonic() - t0 < 10
        assert service.up(topo_path, port=port) == 2
        assert f"--port: 127.0.0.1:{port} is in use" in capsys.readouterr().err

        log = tmp_path / "state" / "up.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("a stale line from an earlier run\n")
        cli = [sys.executable, "-m", "cluster.cli"]
        r = subprocess.run(cli + ["up", str(topo_path), "--detach"], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 2
    assert "stale" not in r.stderr and f"127.0.0.1:{port} is in use" in r.stderr
    assert r.stderr.strip().splitlines() == ["megaserve up: failed to start:",
                                             r.stderr.strip().splitlines()[1]]  # the reason, and nothing else
    assert "stale" in (tmp_path / "state" / "up.log.1").read_text() and "stale" not in log.read_text()


def test_embedded_ray_refuses_several_cuda_nodes(tmp_path: Path, tiny_ckpt: Path) -> None:
    from cluster.launcher import connect_ray

    nodes = [{"name": n, "device": "cuda", "accelerator": "b200", "ranks": 4} for n in ("a", "b")]
    topo = load_topology(_topology(tmp_path, tiny_ckpt, nodes=nodes))
    with pytest.raises(TopologyError, match="field 'ray.address'.*2 cuda nodes.*share its GPUs"):
        connect_ray(topo)


def _rank_engine(rank: int, world_size: int, topo_path: str) -> dict:
    from cluster.rank_actor import build_rank_engine

    topo = load_topology(topo_path)
    engine, slots = build_rank_engine(topo, rank, "cpu")
    st = engine.stats()
    return {"slots": slots, "backend": st["ep_backend"], "policy": st["placement_policy"],
            "ep": (st["ep_rank"], st["ep_size"]),
            "config": (engine.config.max_num_seqs, engine.config.max_num_batched_tokens, engine.config.page_tokens,
                       engine.config.cache_budget_bytes, engine.config.dtype)}


def test_rank_engine_follows_the_topology(tmp_path: Path, tiny_ckpt: Path) -> None:
    """The EP engine each rank builds: backend, placement policy and redundant slots from the topology."""
    from comm.launch import run_ranks
    from comm.placement import Placement

    nodes = [{"name": "a", "ranks": 1}, {"name": "b", "ranks": 1}]
    parallel = {"ep_backend": "tbo", "placement": {"policy": "eplb", "redundant_experts": 2,
                                                   "rebalance_interval_steps": 64}}
    topo = load_topology(_topology(tmp_path, tiny_ckpt, nodes=nodes, parallel=parallel))
    got = run_ranks(_rank_engine, 2, str(topo.source), timeout_s=120)
    cfg = topo.model_config()
    placement = Placement.static(cfg.num_hidden_layers, cfg.n_routed_experts, 2, redundant=2)
    for rank, g in enumerate(got):
        assert (g["backend"], g["policy"], tuple(g["ep"])) == ("tbo", "eplb", (rank, 2))
        assert g["slots"] == [placement.local_logical(layer, rank) for layer in range(cfg.num_hidden_layers)]
        assert all(len(row) == 5 for row in g["slots"])  # (8 experts + 2 redundant) / 2 ranks
        assert tuple(g["config"]) == (16, 256, 128, 16 * 2**20, "float32")


# ---- restart policy (no Ray: the group start is replaced) ----------------------------------------------
def test_repeated_failures_back_off_then_report(tmp_path: Path, tiny_ckpt: Path) -> None:
    from cluster.launcher import Launcher, LaunchError

    health = {"ping_interval_s": 0.5, "ping_timeout_s": 1.0, "step_timeout_s": 2.0, "max_restarts": 2}
    topo = load_topology(_topology(tmp_path, tiny_ckpt, health=health))
    fatal: list[str] = []
    launcher = Launcher(topo, on_fatal=fatal.append)
    starts: list[float] = []

    def failing_start() -> None:
        starts.append(time.monotonic())
        raise LaunchError("rank 3 failed to load its weights and start: out of memory")

    launcher._kill_actors = lambda handles: None  # type: ignore[method-assign]
    launcher._start_group = failing_start  # type: ignore[method-assign]
    t0 = time.monotonic()
    assert launcher.recover("rank 1 (node a) is dead: ActorDiedError") is False
    assert len(starts) == 2  # max_restarts attempts, then it reports instead of looping
    assert starts[1] - starts[0] >= 0.9  # the second attempt backs off
    assert time.monotonic() - t0 < 10
    assert fatal and "giving up after 2 consecutive restarts" in fatal[0] and "out of memory" in fatal[0]
    assert launcher.fatal == fatal[0]


def test_failures_far_apart_do_not_accumulate(tmp_path: Path, tiny_ckpt: Path) -> None:
    from cluster.launcher import Launcher

    health = {"max_restarts": 1}
    topo = load_topology(_topology(tmp_path, tiny_ckpt, health=health))
    launcher = Launcher(topo, stable_s=0.2)
    launcher._kill_actors = lambda handles: None  # type: ignore[method-assign]
    launcher._start_group = lambda: None  # type: ignore[method-assign]
    assert launcher.recover("first") is True
    time.sleep(0.3)
    assert launcher.recover("second, after a stable period") is True
    assert launcher.recover("third, at once") is False and "max_restarts 1" in (launcher.fatal or "")


def test_status_snapshot_is_json(env) -> None:
    _, _, launcher, _ = env
    s = json.loads(json.dumps(launcher.status()))
    assert s["world_size"] == 4 and [r["node"] for r in s["ranks"]] == ["a", "a", "b", "b"]
    assert all(r["steps"] > 0 and "waiting" in r["stats"] and "pages_used" in r["stats"] for r in s["ranks"])
