"""engine.kernels.cpu: the C moe_mlp kernel equals the plain-torch expert MLP; build, cache and fallback."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import platform
import queue
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import engine.kernels.cpu as ck
from engine.kernels.cpu.build import DEFAULT_FLAGS, KernelBuildError, compile_shared
from engine.kernels.cpu.moe_mlp import MoeMlpKernel, openmp_runtimes, torch_uses_libgomp

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc on PATH: the C kernels cannot build")


def reference(x, offsets, route_w, w1, w3, w2, limit):
    """RoutedExperts._forward_loop's math per slot, with F.linear (on one thread: these many small sgemms
    are quick alone but crawl when another process holds the second core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y = torch.zeros_like(x)
        for s in range(w1.shape[0]):
            a, b = int(offsets[s]), int(offsets[s + 1])
            if a == b:
                continue
            g, u = F.linear(x[a:b], w1[s]), F.linear(x[a:b], w3[s])
            h = F.silu(g.clamp(max=limit)) * u.clamp(min=-limit, max=limit)
            y[a:b] = F.linear(h * route_w[a:b, None], w2[s])
        return y
    finally:
        torch.set_num_threads(threads)


def make_case(counts: list[int], d: int, inter: int, seed: int, scale: float = 1.0):
    """(x, offsets, route_w, w1, w3, w2) with counts[s] rows for slot s; x scaled by `scale` (a large scale
    drives gate/up past the clamp). The weights depend only on the shape and are cached (32 experts at
    768/512 are 150 MB); callers must not modify them."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    n = int(offsets[-1])
    x = torch.randn(n, d, generator=g) * scale
    route_w = torch.rand(n, generator=g) * 2.5
    return (x, offsets, route_w, *_weights(len(counts), d, inter))


@functools.lru_cache(maxsize=4)
def _weights(s: int, d: int, inter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + s)
    return (torch.randn(s, inter, d, generator=g) / d**0.5, torch.randn(s, inter, d, generator=g) / d**0.5,
            torch.randn(s, d, inter, generator=g) / inter**0.5)


def topk_counts(n_experts: int, batch: int, k: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(batch)])
    return torch.bincount(idx.flatten(), minlength=n_experts).tolist()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> MoeMlpKernel:
    """A fresh compile (default flags, -march=native, threads as chosen for this torch) into an empty cache dir."""
    return MoeMlpKernel(cache=tmp_path_factory.mktemp("kcache"))


@pytest.fixture(scope="module")
def pthread_kernel(tmp_path_factory) -> MoeMlpKernel:
    """The variant with its own pthread pool (used where torch does not run on libgomp)."""
    return MoeMlpKernel(cache=tmp_path_factory.mktemp("kcache-pthread"), openmp=False)


def assert_close(kernel: MoeMlpKernel, case, limit: float, threads: int | None = None) -> torch.Tensor:
    y = kernel.run(*case, limit, num_threads=threads)
    ref = reference(*case, limit)
    assert y.shape == ref.shape and y.dtype == torch.float32
    tol = 1e-5 * max(ref.abs().max().item(), 1e-30)
    assert (y - ref).abs().max().item() <= tol
    return ref


CASES = {
    "decode-32x6-of-32": (topk_counts(32, 32, 6, 1), 768, 512),
    "decode-8x6-of-32": (topk_counts(32, 8, 6, 2), 768, 512),
    "tiny-128x64": (topk_counts(8, 20, 2, 3), 128, 64),
    "odd-72x40-empty": ([0, 5, 13, 0, 1, 7, 0], 72, 40),
    "one-expert-all-rows": ([0, 0, 37, 0], 72, 40),
    "odd-dims-70x33": ([3, 0, 11, 6], 70, 33),
    "prefill-4096-rows": ([1500, 0, 700, 1, 900, 600, 395, 0], 128, 64),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("limit_active", [True, False])
def test_matches_reference(kernel, name, limit_active):
    counts, d, inter = CASES[name]
    case = make_case(counts, d, inter, seed=len(name), scale=8.0 if limit_active else 1.0)
    limit = 10.0 if limit_active else float("inf")
    x, _, _, w1, w3, _ = case
    gate, up = F.linear(x, w1[0]), F.linear(x, w3[0])
    if limit_active and x.shape[0]:
        assert (gate > limit).any() and (up.abs() > limit).any()  # the clamp really bites
    assert_close(kernel, case, limit)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("variant", ["kernel", "pthread_kernel"])
def test_thread_counts_agree(request, variant, threads):
    case = make_case(topk_counts(32, 16, 6, 4), 768, 512, seed=5, scale=4.0)
    assert_close(request.getfixturevalue(variant), case, 10.0, threads=threads)


def test_openmp_build_shares_torchs_runtime(kernel):
    """Where torch runs on libgomp, the kernel threads on that same library: one OpenMP runtime in the process."""
    if not torch_uses_libgomp():
        pytest.skip("this torch does not run on libgomp")
    assert kernel.openmp and "-fopenmp" in kernel.flags
    assert len(openmp_runtimes()) == 1


def test_zero_rows(kernel):
    case = make_case([0, 0, 0], 72, 40, seed=6)
    y = kernel.run(*case, 10.0)
    assert y.shape == (0, 72)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 -march levels")
@pytest.mark.parametrize("march,openmp", [("x86-64-v2", False), ("x86-64-v3", None)])
def test_portable_builds_agree(tmp_path, march, openmp):
    """Without AVX-512 (SSE4.2 / AVX2 vector widths and block sizes) the same source is correct."""
    flags = tuple(f"-march={march}" if f == "-march=native" else f for f in DEFAULT_FLAGS)
    k = MoeMlpKernel(flags=flags, cache=tmp_path, openmp=openmp)
    for counts, d, inter in (CASES["odd-72x40-empty"], CASES["odd-dims-70x33"], CASES["decode-8x6-of-32"]):
        assert_close(k, make_case(counts, d, inter, seed=7, scale=6.0), 10.0, threads=2)


def _bad(case, **change):
    names = ["x", "offsets", "route_w", "w1", "w3", "w2"]
    args = dict(zip(names, case))
    args.update(change)
    return args


@pytest.mark.parametrize("arg,make,match", [
    ("x", lambda c: c[0].double(), "x: dtype"),
    ("x", lambda c: c[0].t().contiguous().t(), "x: must be contiguous"),
    ("x", lambda c: c[0][:, :-1].contiguous(), "w1: expected"),
    ("offsets", lambda c: c[1].int(), "offsets: dtype"),
    ("offsets", lambda c: c[1][:-1], "offsets: expected shape"),
    ("offsets", lambda c: torch.tensor([0, 9, 4, 12, 18]), "offsets: must start at 0"),
    ("offsets", lambda c: torch.tensor([0, 4, 9, 12, 17]), "offsets: must start at 0"),
    ("offsets", lambda c: torch.tensor([1, 4, 9, 12, 18]), "offsets: must start at 0"),
    ("route_w", lambda c: c[2][:-1], "route_w: expected shape"),
    ("route_w", lambda c: c[2].half(), "route_w: dtype"),
    ("w1", lambda c: c[3].transpose(1, 2), "w1: must be contiguous"),
    ("w3", lambda c: c[4][:, :-1].contiguous(), "w3: shape"),
    ("w2", lambda c: c[5][:-1], "w2: expected"),
    ("w2", lambda c: c[5].tolist(), "w2: expected a torch.Tensor"),
])
def test_bad_input_names_the_argument(kernel, arg, make, match):
    case = make_case([4, 5, 3, 6], 72, 40, seed=8)
    with pytest.raises(ValueError, match=match):
        kernel.run(**_bad(case, **{arg: make(case)}), limit=10.0)


def test_bad_limit(kernel):
    case = make_case([4, 5], 72, 40, seed=9)
    for limit in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="limit"):
            kernel.run(*case, limit)


@pytest.fixture
def fresh_default(monkeypatch, tmp_path):
    """The module-level default kernel re-decided under a private cache dir, and forgotten afterwards."""
    monkeypatch.setenv("MEGASERVE_KERNEL_CACHE", str(tmp_path))
    ck._default_kernel.cache_clear()
    yield tmp_path
    ck._default_kernel.cache_clear()


def test_public_api_uses_the_cache_dir(fresh_default):
    assert ck.moe_mlp_available()
    assert len(list(fresh_default.glob("moe_mlp-*.so"))) == 1
    case = make_case([2, 0, 3], 72, 40, seed=10)
    y = ck.moe_mlp(*case, 10.0)
    assert torch.allclose(y, reference(*case, 10.0), atol=1e-5 * reference(*case, 10.0).abs().max().item())
    with pytest.raises(ValueError, match="route_w"):
        ck.moe_mlp(case[0], case[1], case[2][:1], *case[3:], 10.0)


def test_disabled_by_env(fresh_default, monkeypatch, caplog):
    monkeypatch.setenv("MEGASERVE_CPU_KERNELS", "0")
    with caplog.at_level(logging.WARNING, logger="engine.kernels.cpu"):
        assert not ck.moe_mlp_available()
        assert not ck.moe_mlp_available()
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "MEGASERVE_CPU_KERNELS=0" in caplog.records[0].message
    with pytest.raises(RuntimeError, match="unavailable"):
        ck.moe_mlp(*make_case([1], 72, 40, seed=11), 10.0)


def test_no_compiler_falls_back(fresh_default, monkeypatch, caplog):
    monkeypatch.setenv("CC", "megaserve-no-such-cc")
    with pytest.raises(KernelBuildError, match="no C compiler"):
        compile_shared("x", "int f(void) { return 1; }", cache=fresh_default)
    with caplog.at_level(logging.WARNING, logger="engine.kernels.cpu"):
        assert not ck.moe_mlp_available()
    assert len(caplog.records) == 1 and "no C compiler" in caplog.records[0].message


def test_compile_error_is_reported(tmp_path):
    with pytest.raises(KernelBuildError, match="failed"):
        compile_shared("broken", "int f(void) { return undeclared_name; }", cache=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial library, no leftover build dir


def test_unwritable_cache_is_a_build_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(KernelBuildError, match="cannot write kernel cache"):
        compile_shared("probe", "int megaserve_probe(void) { return 1; }", ("-shared", "-fPIC"), blocker / "sub")


def test_no_home_dir_falls_back(fresh_default, monkeypatch, caplog):
    """Without $HOME or a passwd entry Path.home() raises RuntimeError: the kernel is unavailable, no crash."""
    monkeypatch.delenv("MEGASERVE_KERNEL_CACHE")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with caplog.at_level(logging.WARNING, logger="engine.kernels.cpu"):
        assert not ck.moe_mlp_available()
    assert "MEGASERVE_KERNEL_CACHE" in caplog.records[-1].message


def test_cache_key_and_concurrent_first_use(tmp_path):
    src = "int megaserve_probe(int a) { return a + 1; }"
    flags = ("-O2", "-shared", "-fPIC")
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: compile_shared("probe", src, flags, tmp_path), range(4)))
    assert len(set(paths)) == 1 and paths[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # one library, no temporaries left
    mtime = paths[0].stat().st_mtime_ns
    assert compile_shared("probe", src, flags, tmp_path) == paths[0] and paths[0].stat().st_mtime_ns == mtime
    assert compile_shared("probe", src, ("-O1", "-shared", "-fPIC"), tmp_path) != paths[0]
    assert compile_shared("probe", src + "\n", flags, tmp_path) != paths[0]


def _child_run(flags, cache, case, q):
    """Only the kernel runs here: torch's own parallel ops (libgomp) hang in a child forked after using them."""
    k = MoeMlpKernel(flags=flags, cache=cache, openmp=False)
    q.put(k.run(*case, 10.0, num_threads=2).tolist())


def test_forked_child_gets_its_own_workers(pthread_kernel):
    """The pthread pool does not survive fork(); a child must start its own instead of waiting forever.
    (The OpenMP build shares torch's libgomp, which, like torch itself, must not be used after fork.)"""
    case = make_case([3, 4, 0, 5], 768, 512, seed=12)  # big enough for the kernel to use 2 threads
    ref = assert_close(pthread_kernel, case, 10.0, threads=2)  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_run, args=(pthread_kernel.flags, pthread_kernel.path.parent, case, q))
    p.start()
    try:
        y = torch.tensor(q.get(timeout=30))
    except queue.Empty:
        pytest.fail("forked child hung in the kernel")
    finally:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("wdtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 768), (3, 8, 128), (5, 64)])
def test_rmsnorm_kernel_matches_the_torch_reference(monkeypatch, wdtype, shape):
    """The C RMSNorm (picked for few float32 CPU rows) against the torch ops of engine.model.layers. Both round
    the factor alike, but accumulate the squares differently (double vs torch's float norm): the factor may differ
    by an ulp, and the two products each round once, so 3 ulp relative bound every value."""
    import engine.model.layers as layers

    if ck.norm_kernel() is None:
        pytest.skip("the CPU kernel did not build here")
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g) * 3
    if wdtype is None:
        got = layers.rms_normalize(x, 1e-6)
        monkeypatch.setattr(layers, "select_norm_path", lambda *a, **k: "torch")
        ref = layers.rms_normalize(x, 1e-6)
    else:
        norm = layers.RMSNorm(shape[-1], 1e-6)
        norm.weight.data = torch.randn(shape[-1], generator=g).to(wdtype)
        with torch.inference_mode():
            got = norm(x)
            monkeypatch.setattr(layers, "select_norm_path", lambda *a, **k: "torch")
            ref = norm(x)
    assert got.dtype == ref.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=3 * 2.0**-23, atol=0)


def test_rmsnorm_path_and_bad_input():
    from engine.kernels.select import NORM_KERNEL_MAX_ELEMENTS, select_norm_path

    k = ck.norm_kernel()
    if k is None:
        pytest.skip("the CPU kernel did not build here")
    x = torch.randn(2, 64)
    assert select_norm_path(x) == "kernel" and select_norm_path(x, grad=True) == "torch"
    assert select_norm_path(x.double()) == "torch"
    assert select_norm_path(torch.randn(NORM_KERNEL_MAX_ELEMENTS // 64 + 1, 64)) == "torch"
    with pytest.raises(ValueError, match="x must be"):
        k.rmsnorm(x.double(), None, 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        k.rmsnorm(x, torch.ones(63), 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        k.rmsnorm(x, torch.ones(64, dtype=torch.float16), 1e-6)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", [(1, 8, 128), (3, 128), (7, 3, 96), (2, 768)])
def test_rope_kernel_equals_the_torch_reference(monkeypatch, inverse, shape):
    """The C rotary embedding (picked for few float32 CPU rows) rounds as the torch mul + addcmul_ do: bit-equal."""
    import engine.model.rope as rope

    if ck.norm_kernel() is None:
        pytest.skip("the CPU kernel did not build here")
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * 5
    cos, sin = rope.rope_cos_sin(torch.rand(16, generator=g), torch.arange(shape[0]) * 37)
    got = rope.apply_rope(x, cos, sin, inverse)
    monkeypatch.setattr(rope, "select_norm_path", lambda *a, **k: "torch")
    assert torch.equal(got, rope.apply_rope(x, cos, sin, inverse))
    with pytest.raises(ValueError, match="sin must be"):
        ck.norm_kernel().rope(x, cos, sin[:, :8].contiguous(), inverse)
    with pytest.raises(ValueError, match="cos must be"):
        ck.norm_kernel().rope(x, torch.cat([cos, cos]), sin, inverse)
    with pytest.raises(ValueError, match="x must be"):
        ck.norm_kernel().rope(x.double(), cos, sin, inverse)


@pytest.mark.parametrize("layer_id", [0, 1])  # SWA only (one block), CSA (window + top-k entries: two blocks)
def test_decode_attention_core_kernel_matches_the_torch_reference(monkeypatch, layer_id):
    """Attention._core for one query per sequence: the C call against the torch ops, with masked keys, a sequence
    seeing no key of a block, and a sequence whose every key is hidden (its output is 0: only the sink)."""
    import engine.model.attention as attention
    from engine.kernels.select import select_attn_core_path
    from engine.model.config import get_preset

    if ck.attn_kernel() is None:
        pytest.skip("the CPU kernel did not build here")
    cfg = get_preset("small")
    attn = attention.Attention(cfg, layer_id, torch.float32)
    g = torch.Generator().manual_seed(layer_id)
    with torch.no_grad():
        attn.attn_sink.copy_(torch.randn(cfg.num_attention_heads, generator=g))
    b, h, d = 4, cfg.num_attention_heads, cfg.head_dim
    q = torch.randn(b, 1, h, d, generator=g) * 3
    window = torch.randn(b, 20, d, generator=g)
    seen = torch.rand(b, 1, 20, generator=g) > 0.3
    seen[3] = False
    blocks = [(window, seen)]
    if layer_id:
        chosen = torch.rand(b, 1, 9, generator=g) > 0.5
        chosen[1] = chosen[3] = False
        blocks.append((torch.randn(b, 9, d, generator=g), chosen))
    def exact(blocks):  # the formula in float64
        keys = torch.cat([k for k, _ in blocks], dim=1).double()
        vis = torch.cat([torch.ones(b, 1, k.shape[1], dtype=torch.bool) if v is None else v for k, v in blocks], -1)
        s = torch.einsum("bhd,bld->bhl", q[:, 0].double(), keys) * attn.scale
        s = torch.cat([s.masked_fill(~vis, float("-inf")), attn.attn_sink.double().view(1, h, 1).expand(b, h, 1)], -1)
        return torch.einsum("bhl,bld->bhd", s.softmax(-1)[..., :-1], keys)[:, None]

    with torch.no_grad():
        for case in (blocks, [(window, None)]):
            monkeypatch.setattr(attention, "select_attn_core_path", select_attn_core_path)
            got = attn._core(q, case)
            monkeypatch.setattr(attention, "select_attn_core_path", lambda *a, **k: "torch")
            ref, want = attn._core(q, case), exact(case)
            # the sums run in another order than torch's: as close to the float64 value as torch is (float32
            # rounding of 128-long dot products and of the weighted sums: a few 1e-6 at these magnitudes)
            err, ref_err = (got.double() - want).abs().max().item(), (ref.double() - want).abs().max().item()
            assert err <= 2 * ref_err + 1e-7, (err, ref_err)
        monkeypatch.setattr(attention, "select_attn_core_path", select_attn_core_path)
        assert torch.equal(attn._core(q, blocks)[3], torch.zeros(1, h, d))  # every key hidden: only the sink
    with pytest.raises(ValueError, match="sink must be"):
        ck.attn_kernel().decode(q.view(b, h, d), [(window, None)], torch.zeros(h + 1), 1.0)
    with pytest.raises(ValueError, match="visible"):
        ck.attn_kernel().decode(q.view(b, h, d), [(window, seen.view(b, -1).float())], torch.zeros(h), 1.0)
