"""Weights in checkpoint precision (issue 14): the quantized CPU kernels against the dequantized reference, a
natively loaded `small` checkpoint (bytes equal to the manifest's, logits equal to the dequantized model's), the
one accounting against meta-device models and `megaserve plan`, `megaserve up` refusing a layout that does not
fit, and the expert/linear path table."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import yaml

import engine.kernels.select as select
from cluster.plan.planner import from_topology, make_plan
from cluster.topology import load_topology
from engine.kernels.cpu import quant_kernels
from engine.kernels.cpu.build import DEFAULT_FLAGS
from engine.kernels.cpu.moe_mlp import MoeMlpKernel
from engine.kernels.cpu.quant import QuantKernels
from engine.model.config import get_preset
from engine.weights.checkpoint import open_checkpoint
from engine.weights.formats import dequantize_fp4, dequantize_fp8_block, quantize_fp4, quantize_fp8_block
from engine.weights.loader import load_model
from engine.weights.make_checkpoint import write_checkpoint
from engine.weights.resident import model_resident_bytes, rank_resident_bytes, uniform_rank_bytes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def qk() -> QuantKernels:
    k = quant_kernels()
    if k is None:
        pytest.skip("the CPU kernel did not build here")
    return k


def _fp8_stack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = [quantize_fp8_block(m) for m in w]
    q, s = torch.stack([p for p, _ in parts]), torch.stack([c for _, c in parts])
    return q, s, torch.stack([dequantize_fp8_block(p, c, torch.float32) for p, c in parts])


def _expert_case(fmt: str, e: int = 5, inter: int = 256, d: int = 384, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (e, inter, d), "w3": (e, inter, d), "w2": (e, d, inter)}
    out = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        if fmt == "fp4":
            q, s = quantize_fp4(w)
            out[name] = (q, s, dequantize_fp4(q, s, torch.float32))
        elif fmt == "fp8":
            out[name] = _fp8_stack(w)
        else:
            out[name] = (w.bfloat16(), None, w.bfloat16().float())
    return out


def _reference_mlp(x, offsets, route_w, dense, limit):
    y = torch.zeros(x.shape[0], dense["w2"].shape[1])
    for s in range(offsets.numel() - 1):
        a, b = int(offsets[s]), int(offsets[s + 1])
        if b > a:
            g, u = x[a:b] @ dense["w1"][s].T, x[a:b] @ dense["w3"][s].T
            h = torch.nn.functional.silu(g.clamp(max=limit)) * u.clamp(-limit, limit) * route_w[a:b, None]
            y[a:b] = h @ dense["w2"][s].T
    return y


@pytest.mark.parametrize("fmt", ["fp4", "fp8", "bf16"])
@pytest.mark.parametrize("rows", [[1, 0, 2, 1, 3], [13, 0, 30, 1, 7]], ids=["decode", "larger"])
def test_quantized_expert_kernel_equals_dequantized(qk, fmt, rows):
    case = _expert_case(fmt)
    g = torch.Generator().manual_seed(1)
    n = sum(rows)
    x = torch.randn(n, 384, generator=g)
    offsets = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()])
    route_w = torch.rand(n, generator=g)
    dense = {k: v[2] for k, v in case.items()}
    ref = _reference_mlp(x, offsets, route_w, dense, 1.5)
    got = qk.moe_mlp(x, offsets, route_w, *case["w1"][:2], *case["w3"][:2], *case["w2"][:2], fmt, 1.5)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_quantized_linear_and_dequant(qk, fmt, m):
    g = torch.Generator().manual_seed(m)
    w = torch.randn(300, 256, generator=g)
    if fmt == "fp8":
        q, s = quantize_fp8_block(w)
        dense = dequantize_fp8_block(q, s, torch.float32)
    else:
        q, s, dense = w.bfloat16(), None, w.bfloat16().float()
    x = torch.randn(m, 256, generator=g)
    assert (qk.linear(x, q, s, fmt) - x @ dense.T).abs().max().item() <= 1e-5 * (x @ dense.T).abs().max().item()
    assert torch.equal(qk.dequant(q, s, fmt), dense)
    assert torch.equal(select.linear_quantized(x, q, s, fmt, torch.float32), select.linear_quantized(
        x, q, s, fmt, torch.float32))
    if fmt == "fp8":  # float32 block scales (V3-style checkpoints) decode the same
        assert torch.equal(qk.dequant(q, s.view(torch.uint8).float().sub(127).exp2(), fmt), dense)


def test_fp4_dequant_equals_reference(qk):
    q, s = quantize_fp4(torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * 3)
    assert torch.equal(qk.dequant(q, s, "fp4"), dequantize_fp4(q, s, torch.float32))


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_portable_quantized_builds_agree(tmp_path, march):
    if not any(f.startswith("-march") for f in DEFAULT_FLAGS):
        pytest.skip("no -march flag to vary")
    flags = tuple(f"-march={march}" if f == "-march=native" else f for f in DEFAULT_FLAGS)
    try:
        k = QuantKernels(MoeMlpKernel(flags=flags, cache=tmp_path, openmp=False))
    except Exception as e:  # another architecture: these flags do not apply
        pytest.skip(f"cannot build for {march}: {e}")
    for fmt in ("fp4", "fp8", "bf16"):
        case = _expert_case(fmt, seed=3)
        x = torch.randn(6, 384, generator=torch.Generator().manual_seed(4))
        offsets, route_w = torch.tensor([0, 1, 1, 4, 5, 6]), torch.rand(6)
        ref = _reference_mlp(x, offsets, route_w, {n: v[2] for n, v in case.items()}, 10.0)
        got = k.moe_mlp(x, offsets, route_w, *case["w1"][:2], *case["w3"][:2], *case["w2"][:2], fmt, 10.0)
        assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), fmt


def test_bad_quantized_input_names_the_argument(qk):
    case = _expert_case("fp4")
    x, off, rw = torch.randn(2, 384), torch.tensor([0, 2, 2, 2, 2, 2]), torch.rand(2)
    with pytest.raises(ValueError, match="w3: fp4 scale must have shape"):
        qk.moe_mlp(x, off, rw, *case["w1"][:2], case["w3"][0], case["w1"][1][:, :4], *case["w2"][:2], "fp4", 1.0)
    with pytest.raises(ValueError, match="w: dtype torch.float32 is not a fp8 weight"):
        qk.linear(x, torch.zeros(8, 384), None, "fp8")


# ---- a natively loaded quantized `small` checkpoint ---------------------------------------------------------
@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(get_preset("small"), tmp_path_factory.mktemp("small-q"), seed=3)


@pytest.fixture(scope="module")
def small_pair(small_ckpt):
    return load_model(small_ckpt), load_model(small_ckpt, weights="dequantized")


def test_native_bytes_equal_the_manifest(small_ckpt, small_pair):
    native, deq = small_pair
    manifest = open_checkpoint(small_ckpt).manifest
    held = sum(t.numel() * t.element_size() for t in [*native.parameters(), *native.buffers()])
    assert abs(held - manifest.bytes) <= 0.01 * manifest.bytes
    assert model_resident_bytes(native) == manifest.bytes  # the weights themselves: to the byte
    cfg = native.cfg
    for model, mode in ((native, "native"), (deq, "dequantized")):
        assert model_resident_bytes(model) == uniform_rank_bytes(cfg, mode, torch.float32,
                                                                 cfg.n_routed_experts).total
    assert model_resident_bytes(deq) > 5 * model_resident_bytes(native)
    experts = native.layers[1].ffn.experts
    assert experts.fmt == "fp4" and experts.w1.dtype == torch.int8 and native.layers[1].attn.wq_a.fmt == "fp8"


def _logits(model, ids, decode_ids):
    st = model.new_state()
    out = [model.compute_logits(model(ids, [st], [len(ids)]))]
    for t in decode_ids:
        out.append(model.compute_logits(model(torch.tensor([t]), [st], [1])))
    return torch.cat(out)


def test_native_logits_equal_dequantized(small_pair):
    native, deq = small_pair
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, native.cfg.vocab_size, (70,), generator=g)
    with torch.inference_mode():
        a, b = _logits(native, ids, [5, 9, 11]), _logits(deq, ids, [5, 9, 11])
    assert (a - b).abs().max().item() <= 1e-4


def test_native_experts_reference_and_paths_agree(small_pair):
    """The torch paths (no C kernel: per-slot dequantize + mm, the reference loop) equal the kernel's."""
    experts = small_pair[0].layers[2].ffn.experts
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, experts.w2.shape[1], generator=g)
    idx = torch.stack([torch.randperm(experts.n_experts, generator=g)[:6] for _ in range(40)])
    w = torch.rand(40, 6, generator=g)
    local = experts.g2l[idx].flatten()
    counts = torch.bincount(local, minlength=len(experts.local_experts))
    with torch.inference_mode():
        ref = experts._forward_loop(x, w, local, counts)
        got = experts(x, w, idx)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        order = torch.argsort(local, stable=True)
        sorted_y = experts.run_sorted(x[order // 6], offsets, w.flatten()[order])
        direct = torch.zeros_like(ref).index_add_(0, order // 6, sorted_y)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert (direct - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


# ---- one accounting: plan, meta-device models, up --------------------------------------------------------
def test_plan_per_rank_bytes_equal_a_meta_load():
    """`megaserve plan --json` per-rank weight bytes == a V4-Pro model built on the meta device as an EP rank of
    the topology builds it: (E + redundant) / world = 25 expert slots in every main MoE layer of a static
    placement over the main layers, hence no MTP block (engine/core/ep/engine.py)."""
    from engine.model.model import Transformer
    from engine.model.weight_format import WeightFormats

    topo = load_topology(ROOT / "examples" / "v4-pro-blackwell.yaml")
    cfg = topo.model_config()
    plan = make_plan(from_topology(topo), isl=1024, osl=256, concurrency=64)
    per_rank = json.loads(json.dumps(plan.to_dict()))["ranks"]
    redundant = topo.parallel.placement.redundant_experts
    slots = (cfg.n_routed_experts + redundant) // topo.world_size
    # An EP rank's Transformer gets a placement over the main layers and then builds no MTP block (model.py);
    # building it with ep= needs a process group, so the same layout is built with local_experts here.
    with torch.device("meta"):
        model = Transformer(cfg, torch.bfloat16, local_experts=range(3, 3 + slots), with_mtp=False,
                            weights=WeightFormats.native_for("fp4"))
    assert len(model.mtp) == 0 and len(model.layers[5].ffn.experts.local_experts) == slots == 25
    assert all(row["weight_bytes"] == model_resident_bytes(model) for row in per_rank)
    assert per_rank[0]["weights_mode"] == "native"


def test_meta_load_of_a_checkpoint_equals_the_accounting(small_ckpt):
    cfg = get_preset("small")
    experts = [1, 4, 9, 30]
    for mode in ("native", "dequantized"):
        for dtype in (torch.float32, torch.bfloat16):
            model = load_model(small_ckpt, dtype=dtype, device="meta", experts=experts, weights=mode)
            assert next(model.parameters()).device.type == "meta"
            slots = [len(experts)] * cfg.n_layers_total
            assert model_resident_bytes(model) == rank_resident_bytes(cfg, mode, dtype, slots, with_mtp=True).total


def test_up_refuses_a_layout_that_does_not_fit(tmp_path, capsys, monkeypatch):
    from cluster import service

    ckpt = tmp_path / "v4-pro"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(get_preset("v4-pro").to_dict()))
    doc = {"model": {"path": str(ckpt), "dtype": "bfloat16"},
           "nodes": [{"name": "g", "device": "cuda", "accelerator": "b200", "ranks": 2}],
           "server": {"state_dir": str(tmp_path / "state")}}
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(doc))
    started = []
    monkeypatch.setattr("cluster.launcher.connect_ray", lambda *a, **k: started.append(1))
    assert service.up(path) == 2
    err = capsys.readouterr().err
    # an EP rank of 2: half the experts in each main MoE layer, no MTP block (resident.rank_builds_mtp)
    need = uniform_rank_bytes(get_preset("v4-pro"), "native", torch.bfloat16, 192, with_mtp=False).total
    assert f"rank 0 (node g) does not fit: its weights (native) need {need:,} bytes" in err
    assert "180,000,000,000 bytes available (HBM of a b200)" in err and not started


# ---- the path table --------------------------------------------------------------------------------------
def test_path_table(monkeypatch):
    f32 = torch.float32
    assert select.select_expert_path("cpu", "fp4", f32, 3, 30, 32, cpu_kernel=True, grad=True) == "reference"
    assert select.select_expert_path("cpu", "fp4", f32, 3, 30, 32, cpu_kernel=True) == "kernel"
    assert select.select_expert_path("cpu", "dense", f32, 3, 30, 32, cpu_kernel=False) == "padded"
    assert select.select_expert_path("cpu", "fp4", f32, 3, 30, 32, cpu_kernel=False) == "sorted"
    assert select.select_linear_path("cpu", "fp8", torch.bfloat16, 3, 256) == "torch"
    fake = types.SimpleNamespace(moe_grouped_gemm=lambda *a, **k: None, fp8_block_linear=lambda *a, **k: None,
                                 available=lambda device: device == "cuda")
    monkeypatch.setattr(select, "triton_kernels", lambda: fake)
    assert select.select_expert_path("cuda", "fp4", torch.bfloat16, 3, 30, 32, cpu_kernel=False) == "triton"
    assert select.select_linear_path("cuda", "fp8", torch.bfloat16, 3, 256) == "triton"
    # FP8 experts have no Triton grouped GEMM: per-slot dequantize + mm
    assert select.select_expert_path("cuda", "fp8", torch.bfloat16, 3, 30, 32, cpu_kernel=False) == "sorted"
    assert select.select_expert_path("cpu", "fp4", f32, 3, 30, 32, cpu_kernel=True) == "kernel"  # CPU: no Triton


# ---- config compatibility (what transformers' DeepseekV4Config loads) ---------------------------------------
def test_longer_compress_ratios_are_cut_with_one_line(caplog):
    from engine.model.config import TINY, ModelConfig

    raw = TINY.to_dict()
    raw["compress_ratios"] = list(TINY.compress_ratios) + [4, 128, 0]
    with caplog.at_level("INFO", logger="engine.model.config"):
        cfg = ModelConfig.from_dict(raw)
    assert cfg.compress_ratios == TINY.compress_ratios
    assert [r.message for r in caplog.records if "compress_ratios" in r.message] == [
        "config compress_ratios: 8 entries for 4 main + 1 MTP layers; the 3 trailing ones are ignored"]
    raw["compress_ratios"] = list(TINY.compress_ratios)[:3]
    with pytest.raises(ValueError, match="compress_ratios"):
        ModelConfig.from_dict(raw)


def test_unquantized_expert_dtype_loads_when_the_tensors_agree(tmp_path):
    import dataclasses

    from engine.model.config import TINY, ConfigError
    from engine.weights.checkpoint import CheckpointError

    cfg = dataclasses.replace(TINY, expert_dtype="bf16")
    plain = write_checkpoint(cfg, tmp_path / "bf16-experts", seed=1, quantize=False)
    model = load_model(plain)
    assert model.layers[0].ffn.experts.fmt == "dense"
    spec = open_checkpoint(plain).manifest.by_name()["layers.1.ffn.experts.3.w2.weight"]
    assert (spec.dtype, spec.shape) == ("BF16", (TINY.hidden_size, TINY.moe_intermediate_size))
    packed = write_checkpoint(TINY, tmp_path / "fp4-experts", seed=1)
    raw = json.loads((packed / "config.json").read_text())
    (packed / "config.json").write_text(json.dumps({**raw, "expert_dtype": "bf16"}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.ffn\.experts\.0\.w1\.weight"):
        load_model(packed)
    with pytest.raises(ConfigError, match="expert_dtype"):
        dataclasses.replace(TINY, expert_dtype="int3")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_dequant_split_over_threads_is_exact(qk, threads):
    """The dequantizer splits rows over OpenMP threads from 65536 values on: every split decodes the same."""
    g = torch.Generator().manual_seed(threads)
    w = torch.randn(301, 512, generator=g)
    q4, s4 = quantize_fp4(w)
    q8, s8 = quantize_fp8_block(w)
    assert torch.equal(qk.dequant(q4, s4, "fp4", num_threads=threads), dequantize_fp4(q4, s4, torch.float32))
    assert torch.equal(qk.dequant(q8, s8, "fp8", num_threads=threads), dequantize_fp8_block(q8, s8, torch.float32))
    assert torch.equal(qk.dequant(w.bfloat16(), None, "bf16", num_threads=threads), w.bfloat16().float())
