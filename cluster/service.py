"""`megaserve up / status / down`: one serving process per topology, found again through its state files.

`up` runs in the foreground (or, with --detach, starts itself in the background and returns once ready):
it joins or starts Ray, launches the ranks (cluster.launcher), connects a Router to their workers, serves
HTTP from this (the driver) process, and restarts the EP group when a rank fails. It stops on SIGTERM or
SIGINT, or when the launcher gives up (max_restarts), and then stops everything it started.

State files, under the topology's `server.state_dir`, all mode 0600 (the launch secret that authenticates the
frontend to the ranks is in none of them, nor in any log: it lives in the driver's and the ranks' memory):
    up.json       {pid, phase: starting|ready, ray_address, embedded, session_dir, http, topology, processes}
                  written at start, updated when ready, removed on a clean stop.
                  processes: [pid, create time] of every descendant of the driver (an embedded Ray's
                  processes, the rank processes it runs), refreshed in status.json.
    status.json   the launcher's view (nodes, ranks, experts per layer, latest stats, recoveries),
                  rewritten every ping interval while up.
    up.log        output of a detached `up`, this attempt's only (the previous attempt's is up.log.1).
`down` reads up.json, sends the driver SIGTERM and waits; if the driver does not exit in time (or was
killed), it kills every recorded descendant still alive (same PID and start time), and for a joined Ray
kills our rank actors by name; then it removes the state files.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from cluster.topology import Topology, load_topology

log = logging.getLogger(__name__)

UP_FILE = "up.json"
STATUS_FILE = "status.json"
LOG_FILE = "up.log"


# ---- state files -------------------------------------------------------------------------------------
def _private_file(path: Path, flags: int) -> int:
    """Open `path` readable and writable by its owner only (mode 0600, also when it existed already)."""
    fd = os.open(path, flags | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a state file atomically, mode 0600 (it names PIDs and addresses; nobody else needs to read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.{threading.get_ident()}.tmp")
    with os.fdopen(_private_file(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
        f.write(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_state(state_dir: Path, name: str = UP_FILE) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process: it exists
        return True


def process_tree(root: int) -> list[list[float]]:
    """[pid, create time] of every live descendant of `root` (the create time tells a reused PID apart)."""
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out: list[list[float]] = []
    for c in children:
        try:
            if c.status() != psutil.STATUS_ZOMBIE:
                out.append([c.pid, c.create_time()])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _same_process(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and p.create_time() == create_time
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def leftover_processes(up_state: dict[str, Any], status: dict[str, Any]) -> list[int]:
    """The driver's recorded descendants (up.json, status.json) still alive as the same processes, sorted."""
    recorded = {(int(p), float(t)) for p, t in [*up_state.get("processes", []), *status.get("processes", [])]}
    return sorted(p for p, t in recorded if _same_process(p, t))


# ---- up ----------------------------------------------------------------------------------------------
def up(topo_path: str | Path, *, ready_timeout_s: float = 300.0, port: int | None = None) -> int:
    """Serve the topology in the foreground until SIGTERM/SIGINT or a fatal failure; the exit status."""
    topo = load_topology(topo_path)
    state_dir = topo.server.state_dir
    prev = read_state(state_dir)
    if prev is not None and pid_alive(int(prev.get("pid", 0))) and int(prev["pid"]) != os.getpid():
        print(f"megaserve up: already up (pid {prev['pid']}, state in {state_dir}); run `megaserve down "
              f"{topo_path}` first", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = preflight(topo, port)
    if problem:
        print(f"megaserve up: error: {problem}", file=sys.stderr)
        return 2
    state_dir.mkdir(parents=True, exist_ok=True)
    from cluster.launcher import connect_ray

    up_state: dict[str, Any] = {"pid": os.getpid(), "phase": "starting", "topology": str(Path(topo_path).resolve()),
                                "started_at": time.time()}
    _write_json(state_dir / UP_FILE, up_state)
    try:
        conn = connect_ray(topo)  # in the main thread: an embedded Ray installs signal handlers
    except Exception as e:
        (state_dir / UP_FILE).unlink(missing_ok=True)
        print(f"megaserve up: error: cannot start or join Ray: {e}", file=sys.stderr)
        return 2
    up_state.update(ray_address=conn.address, embedded=conn.embedded, session_dir=conn.session_dir,
                    processes=process_tree(os.getpid()))
    _write_json(state_dir / UP_FILE, up_state)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_serve(topo, Path(topo_path), conn, up_state, ready_timeout_s, port))


async def _serve(topo: Topology, topo_path: Path, conn: Any, up_state: dict[str, Any], ready_timeout_s: float,
                 port: int | None) -> int:
    from cluster.launcher import Launcher
    from cluster.router import Router
    from comm.auth import new_secret

    state_dir = topo.server.state_dir
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fatal: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    launcher = router = runner = None
    status_task: asyncio.Task | None = None
    try:

        def on_restart(addresses: list[tuple[str, int]]) -> None:  # monitor thread
            asyncio.run_coroutine_threadsafe(router.reset_ranks(addresses), loop).result(ready_timeout_s)
            _write_json(state_dir / STATUS_FILE, _status(launcher, up_state))

        def on_fatal(message: str) -> None:  # monitor thread
            fatal.append(message)
            loop.call_soon_threadsafe(stop.set)

        # One secret per launch, in memory only: the ranks get it through Ray, the router proves it on every
        # connection (comm/auth.py); it is in no state file or log.
        launcher = Launcher(topo, on_restart=on_restart, on_fatal=on_fatal, ready_timeout_s=ready_timeout_s,
                            secret=new_secret())
        start = asyncio.ensure_future(asyncio.to_thread(launcher.start))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            print("megaserve up: interrupted while starting", file=sys.stderr)
            stopper.cancel()
            return 1
        addresses = start.result()
        router = await Router(addresses, affinity_tokens=topo.scheduler.page_tokens, hold_on_loss=True,
                              connect_timeout_s=ready_timeout_s, secret=launcher.secret).start()
        runner, http = await _start_frontend(topo, router, port)
        launcher.start_monitor()
        up_state.update(phase="ready", http=http, ready_at=time.time())
        _write_json(state_dir / UP_FILE, up_state)
        status_task = asyncio.create_task(_status_writer(launcher, up_state, state_dir))
        print(f"megaserve up: {topo.world_size} ranks on {len(topo.nodes)} nodes ready; serving {http} "
              f"(pid {os.getpid()}; `megaserve down {topo_path}` stops it)", flush=True)
        await stop.wait()
        if fatal:
            print(f"megaserve up: {fatal[0]}", file=sys.stderr)
            return 1
        return 0
    except Exception as e:
        print(f"megaserve up: error: {e}", file=sys.stderr)
        log.debug("up failed", exc_info=True)
        return 2
    finally:
        if status_task is not None:
            status_task.cancel()
        if runner is not None:
            await runner.cleanup()
        if router is not None:
            await router.close()
        if launcher is not None:
            await asyncio.to_thread(launcher.shutdown)
        conn.shutdown()
        for name in (UP_FILE, STATUS_FILE):
            (state_dir / name).unlink(missing_ok=True)


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be served on (in use, or not an address of this machine); None when it can.
    Port 0 (any free port) always can."""
    if port == 0:
        return None
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: a TIME_WAIT port is free
        try:
            s.bind((host, port))
        except OSError as e:
            return f"{host}:{port} is in use" if e.errno == errno.EADDRINUSE else f"cannot bind {host}:{port}: " \
                f"{e.strerror}"
    return None


def preflight(topo: Topology, port: int | None = None) -> str | None:
    """What would make `up` fail after Ray and the ranks started (or silently differ from the file), found
    before: the checkpoint (the driver reads its tokenizer; the ranks read the same path), the API key
    variable, the HTTP port (`port` overrides server.port), and ranks whose weights do not fit their memory
    (cluster.fit). Every `kv_cache.dtype` is served (bfloat16, float32, fp8: engine.cache.kv_cache)."""
    from cluster.server.settings import ServerSettings

    path = topo.model.path
    if path is None:
        return f"{topo.source}: field 'model.path': required to serve (model.config alone only plans)"
    if not (path / "config.json").is_file():
        hint = " (`make demo` writes it)" if path.parts[-3:] == ("out", "demo", "tiny") else ""
        return f"{topo.source}: field 'model.path': {path} holds no checkpoint (no config.json){hint}"
    try:
        ServerSettings.from_topology(topo).api_key()
    except ValueError as e:
        return f"{topo.source}: field 'server.api_key_env': {e}"
    busy = port_in_use(topo.server.host, topo.server.port if port is None else port)
    if busy:
        where = "--port" if port is not None else f"{topo.source}: field 'server.port'"
        return f"{where}: {busy} (another server?); choose another port with --port, or --port 0 for any free one"
    from cluster.fit import weights_fit_problem

    return weights_fit_problem(topo)


async def _start_frontend(topo: Topology, router: Any, port: int | None) -> tuple[Any, str]:
    """The OpenAI-compatible HTTP app (cluster.server) over the router; (aiohttp runner, base URL)."""
    from cluster.server.app import build_app, serve
    from cluster.server.openai_api import OpenAIService
    from cluster.server.settings import ServerSettings

    overrides = {} if port is None else {"port": port}
    settings = ServerSettings.from_topology(topo, **overrides)
    service = OpenAIService.from_router(router, topo.model.path, settings, max_model_len=topo.scheduler.max_model_len)
    runner, bound = await serve(build_app(service, settings), settings.host, settings.port)
    return runner, f"http://{settings.host}:{bound}"


def _status(launcher: Any, up_state: dict[str, Any]) -> dict[str, Any]:
    return {**launcher.status(), "pid": up_state["pid"], "processes": process_tree(up_state["pid"]),
            "http": up_state.get("http"),
            "ray_address": up_state.get("ray_address"), "embedded": up_state.get("embedded"),
            "updated_at": time.time()}


async def _status_writer(launcher: Any, up_state: dict[str, Any], state_dir: Path) -> None:
    """Rewrite status.json every ping interval, off the event loop (the launcher's lock is held during a
    restart; HTTP must not wait for it)."""

    def write() -> None:
        _write_json(state_dir / STATUS_FILE, _status(launcher, up_state))

    while True:
        await asyncio.to_thread(write)
        await asyncio.sleep(launcher.topo.health.ping_interval_s)


def up_detached(topo_path: str | Path, *, ready_timeout_s: float = 300.0, port: int | None = None) -> int:
    """Start `megaserve up` in the background (own session, output to state_dir/up.log); return once it is
    ready (0) or has failed (its exit status, with the log's tail)."""
    topo = load_topology(topo_path)
    state_dir = topo.server.state_dir
    prev = read_state(state_dir)
    if prev is not None and pid_alive(int(prev.get("pid", 0))):
        print(f"megaserve up: already up (pid {prev['pid']}, {prev.get('http') or 'starting'}); run `megaserve down "
              f"{topo_path}` first", file=sys.stderr)
        return 1
    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cluster.cli", "up", str(topo_path), "--ready-timeout", str(ready_timeout_s)]
    if port is not None:
        cmd += ["--port", str(port)]
    log_path = state_dir / LOG_FILE
    if log_path.exists():  # each attempt's log starts afresh; the one before stays beside it
        os.replace(log_path, log_path.with_name(LOG_FILE + ".1"))
    with os.fdopen(_private_file(log_path, os.O_WRONLY | os.O_TRUNC), "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + ready_timeout_s + 60
    while time.monotonic() < deadline:
        rc = proc.poll()
        st = read_state(state_dir)
        if st is not None and st.get("pid") == proc.pid and st.get("phase") == "ready":
            print(f"megaserve up: ready at {st.get('http')} (pid {proc.pid}, log {state_dir / LOG_FILE})")
            return 0
        if rc is not None:
            tail = (state_dir / LOG_FILE).read_text(errors="replace").splitlines()[-20:]
            print("megaserve up: failed to start:\n" + "\n".join(tail), file=sys.stderr)
            return rc or 1
        time.sleep(0.2)
    print(f"megaserve up: not ready after {ready_timeout_s:g}s; see {state_dir / LOG_FILE}", file=sys.stderr)
    return 1


# ---- down --------------------------------------------------------------------------------------------
def down(topo_path: str | Path, *, timeout_s: float = 60.0) -> int:
    """Stop the `up` of this topology and everything it started; 0 when nothing of it is left running."""
    topo = load_topology(topo_path)
    state_dir = topo.server.state_dir
    st = read_state(state_dir)
    if st is None:
        print(f"megaserve down: nothing is up for {topo_path} (no {state_dir / UP_FILE})")
        return 0
    status = read_state(state_dir, STATUS_FILE) or {}
    pid = int(st["pid"])
    clean = False  # did the driver stop everything itself?
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        clean = not pid_alive(pid)
        if not clean:
            print(f"megaserve down: pid {pid} did not stop within {timeout_s:g}s; killing it", file=sys.stderr)
            _kill_all([pid])
    # What the driver should have stopped, if it could not: its recorded descendants (an embedded Ray's
    # processes and the ranks it ran), each only while it is still the same process.
    left = leftover_processes(st, status)
    _kill_all(left)
    if not clean and not st.get("embedded") and st.get("ray_address"):
        _kill_named_actors(topo, st["ray_address"])
    for name in (UP_FILE, STATUS_FILE):
        (state_dir / name).unlink(missing_ok=True)
    still = [p for p in [pid, *left] if pid_alive(p)]
    if still:
        print(f"megaserve down: processes still running: {still}", file=sys.stderr)
        return 1
    print(f"megaserve down: stopped pid {pid}" + (f" and {len(left)} leftover processes" if left else ""))
    return 0


def _kill_all(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM each, wait up to `grace_s` for all, then SIGKILL the rest (Ray's agents ignore SIGTERM)."""
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _wait_gone(pids, grace_s)
    for p in pids:
        if pid_alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _wait_gone(pids, grace_s)


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill_named_actors(topo: Topology, address: str) -> None:
    """For a joined (not embedded) Ray whose driver died: kill our rank actors by name, remove our groups."""
    import ray
    from ray.util.placement_group import get_placement_group, remove_placement_group

    from cluster.launcher import ACTOR_PREFIX, PG_PREFIX

    try:
        ray.init(address=address, namespace=topo.ray.namespace, logging_level=logging.WARNING)
    except Exception as e:
        print(f"megaserve down: cannot reach Ray at {address} to clean up: {e}", file=sys.stderr)
        return
    try:
        for name in ray.util.list_named_actors():
            if name.startswith(ACTOR_PREFIX):
                try:
                    ray.kill(ray.get_actor(name), no_restart=True)
                except ValueError:  # gone meanwhile
                    pass
        for node in topo.nodes:
            try:
                remove_placement_group(get_placement_group(f"{PG_PREFIX}-{node.name}"))
            except ValueError:  # no such group
                pass
    finally:
        ray.shutdown()


# ---- status ------------------------------------------------------------------------------------------
def status(topo_path: str | Path, *, as_json: bool = False) -> int:
    """Print the ranks, nodes, experts per rank, queue and cache use of the running `up`."""
    topo = load_topology(topo_path)
    state_dir = topo.server.state_dir
    st = read_state(state_dir)
    if st is None:
        print(f"megaserve status: not up ({topo_path}; state in {state_dir})")
        return 1
    s = read_state(state_dir, STATUS_FILE) or {}
    if not pid_alive(int(st.get("pid", 0))):
        left = leftover_processes(st, s)
        if not left:
            print(f"megaserve status: not up ({topo_path}): the driver (pid {st.get('pid')}) is gone and left "
                  f"nothing running; `megaserve down {topo_path}` clears its state in {state_dir}")
        else:
            print(f"megaserve status: not up ({topo_path}): the driver (pid {st.get('pid')}) is gone, but {len(left)} "
                  f"of its processes (Ray, ranks) are still running: pids {' '.join(map(str, left))}; "
                  f"`megaserve down {topo_path}` stops them")
        return 1
    if as_json:
        print(json.dumps({"up": st, "status": s}, indent=1, default=str))
        return 0
    age = time.time() - float(s.get("updated_at", time.time()))
    print(f"megaserve {st.get('phase')}: pid {st['pid']}, {st.get('http') or 'no HTTP yet'}, Ray "
          f"{st.get('ray_address')} ({'embedded' if st.get('embedded') else 'joined'}), generation "
          f"{s.get('generation', 0)}, {len(s.get('recoveries', []))} restarts; status {age:.1f}s old")
    for n in s.get("nodes", []):
        print(f"  node {n['name']}: {n['device']} x {n['ranks']} ranks, {n['find']}, Ray node {n['ray_node_id'][:12]}")
    print(f"  {'rank':>4} {'node':<8} {'pid':>7} {'address':<21} {'experts (layer 0)':<20} {'run':>4} {'wait':>5} "
          f"{'pages used/total':>16} {'balance':>7} {'rebal':>5} {'steps':>8}")
    for r in s.get("ranks", []):
        es = r.get("stats", {})
        used, free = es.get("pages_used"), es.get("pages_free")
        pages = f"{used}/{used + free}" if used is not None and free is not None else "-"
        experts = r["local_experts"][0] if r.get("local_experts") else []
        bal = es.get("balancedness")
        print(f"  {r['rank']:>4} {r['node']:<8} {r['pid']:>7} {r['address']:<21} {str(experts):<20} "
              f"{es.get('running', '-'):>4} {es.get('waiting', '-'):>5} {pages:>16} "
              f"{'-' if bal is None else f'{bal:.2f}':>7} {es.get('rebalances', '-'):>5} {r.get('steps', 0):>8}")
    for ev in s.get("recoveries", []):
        print(f"  restart -> generation {ev['generation']} in {ev['recovery_s']:.2f}s: {ev['reason']}")
    if s.get("fatal"):
        print(f"  FATAL: {s['fatal']}")
    return 0
