"""comm.backends.registry: built-in names and capabilities without torch; a third-party backend plugs in by
registering a class and runs through Dispatcher; clear errors for unknown names, options and devices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from comm.backends.exchange import Exchange
from comm.dispatch import (
    Capabilities,
    DispatchBackend,
    Dispatcher,
    UnknownBackendError,
    backend_capabilities,
    backend_names,
    get_backend,
    register_backend,
    unregister_backend,
)
from comm.placement import Placement

E, D, K = 8, 16, 3
ROOT = Path(__file__).resolve().parents[1]


class LocalLoopBackend(DispatchBackend):
    """A toy third-party backend: the V4 reference's "every rank runs its own experts over all tokens, then
    all-reduce", for a group whose ranks all hold the same tokens. Option ``scale`` multiplies the result."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.calls = 0

    def run(self, ex: Exchange, placement, layer, x, topk_idx, topk_weights, expert_fn, shared_fn):
        self.calls += 1
        phys = placement.route(layer, topk_idx).reshape(-1)
        s = placement.slots_per_rank
        mine = torch.div(phys, s, rounding_mode="floor") == ex.ep_rank
        tok = torch.arange(x.shape[0]).repeat_interleave(topk_idx.shape[1])
        rows = expert_fn(x[tok], phys % s, topk_weights.reshape(-1) * mine)
        out = torch.zeros(x.shape[0], x.shape[1]).index_add_(0, tok, rows.float())
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(out, group=ex.group)
        ex.stats.assignments_sent += int(mine.sum())
        y = (self.scale * out).to(x.dtype)
        return y if shared_fn is None else y + shared_fn(x)


@pytest.fixture
def toy():
    name = "toy-loop"
    register_backend(name, Capabilities(devices=("cpu",), options=("scale",)))(LocalLoopBackend)
    yield name
    unregister_backend(name)


def _problem(redundant: int = 2):
    p = Placement.static(num_layers=1, num_experts=E, ep_size=1, redundant=redundant)
    weights = torch.randn(E, D, D, generator=torch.Generator().manual_seed(5)) / D**0.5
    local = torch.tensor(p.local_logical(0, 0))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(7)])
    w = torch.rand(7, K, generator=g)
    fn = lambda xr, s, wr: wr[:, None] * torch.einsum("nd,ndo->no", xr, weights[local[s]])  # noqa: E731
    return p, x, idx, w, fn


def test_builtin_backends_and_capabilities():
    assert {"sync", "tbo", "wave", "ll"} <= set(backend_names())
    assert backend_capabilities("sync") == Capabilities(overlap="none")
    assert backend_capabilities("tbo").overlap == "micro_batches"
    assert backend_capabilities("wave").overlap == "expert_waves" and backend_capabilities("wave").options == (
        "num_waves",)
    ll = backend_capabilities("ll")
    assert ll.fixed_capacity and ll.host_sync_free and set(ll.options) == {"max_tokens_per_rank", "capacity"}
    assert not any(backend_capabilities(n).fixed_capacity for n in ("sync", "tbo", "wave"))
    for name in ("sync", "tbo", "wave", "ll"):
        assert issubclass(get_backend(name), DispatchBackend)


def test_names_and_capabilities_need_no_torch():
    """Topology validation and the planner read the registry; neither may pull torch in."""
    code = ("import sys, comm.backends, cluster.topology, cluster.plan.perf; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(comm.backends.registry.backend_names())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "'ll', 'sync', 'tbo', 'wave'" in out.stdout


def test_third_party_backend_runs_through_dispatcher(toy):
    p, x, idx, w, fn = _problem()
    ref = Dispatcher(p, 0, 1, backend="sync")(0, x, idx, w, fn, lambda v: 0.5 * v)
    d = Dispatcher(p, 0, 1, backend=toy, scale=2.0, num_waves=3, capacity=5)  # other backends' options: ignored
    assert isinstance(d.impl, LocalLoopBackend) and d.impl.scale == 2.0 and toy in backend_names()
    y = d(0, x, idx, w, fn, lambda v: 0.5 * v)
    assert (y - (2 * (ref - 0.5 * x) + 0.5 * x)).abs().max().item() < 1e-5
    assert d.impl.calls == 1 and d.last_stats.calls == 1 and d.last_stats.assignments_sent == 7 * K
    # the staged form falls back to the count-exchange default for a backend without its own begin
    fl = d.begin(0, x, idx, w)
    fl.run_experts(fn)
    assert (d.finish(fl) - (ref - 0.5 * x)).abs().max().item() < 1e-5
    # its options are known to the Dispatcher while it is registered
    assert Dispatcher(p, 0, 1, backend="sync", scale=3.0).backend == "sync"


def test_registry_errors(toy):
    p, x, idx, w, fn = _problem()
    with pytest.raises(ValueError, match="'toy-loop' is already registered"):
        register_backend(toy)(LocalLoopBackend)
    with pytest.raises(UnknownBackendError, match=r"EP backend 'nope': must be one of \(.*'ll'.*'toy-loop'"):
        Dispatcher(p, 0, 1, backend="nope")
    with pytest.raises(ValueError, match=r"dispatch options \['scael'\]: no registered backend takes them"):
        Dispatcher(p, 0, 1, backend=toy, scael=2.0)
    with pytest.raises(TypeError, match="not a comm.backends.base.DispatchBackend subclass"):
        register_backend("not-a-backend")(dict)
    assert "not-a-backend" not in backend_names()
    register_backend("lazy-missing", target="tests.test_dispatch_registry:NoSuchClass")
    try:
        with pytest.raises(ImportError, match="has no 'NoSuchClass'"):
            get_backend("lazy-missing")
    finally:
        unregister_backend("lazy-missing")
    with pytest.raises(ValueError, match="overlap 'sometimes'"):
        Capabilities(overlap="sometimes")
    with pytest.raises(ValueError, match="devices"):
        Capabilities(devices=("tpu",))
    register_backend("cuda-only", Capabilities(devices=("cuda",)))(type("CudaOnly", (LocalLoopBackend,), {}))
    try:
        with pytest.raises(ValueError, match=r"'cuda-only' runs on \('cuda',\), got a tensor on cpu"):
            Dispatcher(p, 0, 1, backend="cuda-only")(0, x, idx, w, fn)
    finally:
        unregister_backend("cuda-only")
    unregister_backend(toy)
    with pytest.raises(UnknownBackendError):
        unregister_backend(toy)
    register_backend(toy, Capabilities(devices=("cpu",), options=("scale",)))(LocalLoopBackend)  # for the fixture
