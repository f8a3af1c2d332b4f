"""engine/weights/checkpoint.py: validation (every problem, by tensor name, in one error) and streaming."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import engine.weights.checkpoint as checkpoint_mod
from engine.model.config import get_preset
from engine.weights.checkpoint import CheckpointError, open_checkpoint
from engine.weights.make_checkpoint import write_checkpoint

CFG = get_preset("tiny")
E = CFG.n_routed_experts


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    return write_checkpoint(CFG, tmp_path_factory.mktemp("q"), seed=0)


@pytest.fixture(scope="module")
def unquantized(tmp_path_factory) -> Path:
    return write_checkpoint(CFG, tmp_path_factory.mktemp("u"), seed=0, quantize=False)


@pytest.fixture(scope="module")
def raw(quantized) -> dict[str, torch.Tensor]:
    """The stored tensors of the quantized checkpoint, as stored."""
    out = {}
    for f in sorted(quantized.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def write_sharded(path: Path, tensors: dict[str, torch.Tensor], n_shards: int = 2) -> Path:
    """config.json + `n_shards` shards + index holding exactly `tensors`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CFG.to_dict()))
    names = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::n_shards]}
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def problems_of(path: Path, experts=None) -> list[str]:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path).validate(experts)
    err = info.value
    for p in err.problems:
        assert p in str(err)  # the message lists every problem
    return err.problems


def test_written_checkpoint_validates(quantized, unquantized):
    for path in (quantized, unquantized):
        ckpt = open_checkpoint(path)
        ckpt.validate()
        ckpt.validate(experts=[0, 3])
        assert ckpt.layout == "official" and ckpt.config == CFG


def test_single_file_and_unindexed_directory(tmp_path, raw):
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text(json.dumps(CFG.to_dict()))
    save_file(raw, str(single / "model.safetensors"))
    open_checkpoint(single).validate()
    unindexed = write_sharded(tmp_path / "unindexed", raw, n_shards=3)
    (unindexed / "model.safetensors.index.json").unlink()
    open_checkpoint(unindexed).validate()


def test_missing_tensors_are_all_named(tmp_path, raw):
    gone = ["layers.1.attn.wq_a.weight", "mtp.0.hc_head_base", "layers.2.ffn.experts.5.w2.scale"]  # wq_a keeps .scale
    bad = write_sharded(tmp_path / "c", {k: v for k, v in raw.items() if k not in gone})
    problems = problems_of(bad)
    assert len(problems) == 3
    for name in gone:
        assert any(p.startswith(name) and "missing" in p for p in problems), name


def test_wrong_shapes_are_all_named(tmp_path, raw):
    t = dict(raw)
    t["layers.0.attn_norm.weight"] = torch.ones(CFG.hidden_size + 1, dtype=torch.bfloat16)
    t["layers.3.attn.wkv.scale"] = raw["layers.3.attn.wkv.scale"][:, :0]
    t["layers.1.ffn.experts.2.w3.weight"] = raw["layers.1.ffn.experts.2.w3.weight"][:-1]
    problems = problems_of(write_sharded(tmp_path / "c", t))
    assert len(problems) == 3
    for name in ("layers.0.attn_norm.weight", "layers.3.attn.wkv.scale", "layers.1.ffn.experts.2.w3.weight"):
        assert any(p.startswith(name) and "shape" in p for p in problems), name


def test_wrong_dtypes_are_all_named(tmp_path, raw):
    t = dict(raw)
    t["layers.0.ffn.gate.tid2eid"] = raw["layers.0.ffn.gate.tid2eid"].float()
    t["layers.0.attn.wq_b.weight"] = raw["layers.0.attn.wq_b.weight"].view(torch.int8)  # fp8 stored as I8
    t["layers.2.ffn.experts.0.w1.scale"] = raw["layers.2.ffn.experts.0.w1.scale"].view(torch.uint8)
    t["embed.weight"] = raw["embed.weight"].to(torch.int32)
    problems = problems_of(write_sharded(tmp_path / "c", t))
    assert len(problems) == 4
    for name in ("layers.0.ffn.gate.tid2eid", "layers.0.attn.wq_b.weight", "layers.2.ffn.experts.0.w1.scale",
                 "embed.weight"):
        assert any(p.startswith(name) and "dtype" in p for p in problems), name


def test_extra_tensors_are_all_named(tmp_path, raw):
    t = dict(raw)
    t["layers.0.attn.bogus"] = torch.zeros(3)
    t[f"layers.1.ffn.experts.{E}.w1.weight"] = raw["layers.1.ffn.experts.0.w1.weight"]  # expert id out of range
    t["layers.0.attn_norm.scale"] = torch.zeros(1)  # a scale of a non-quantized tensor
    problems = problems_of(write_sharded(tmp_path / "c", t))
    assert len(problems) == 3
    for name in ("layers.0.attn.bogus", f"layers.1.ffn.experts.{E}.w1.weight", "layers.0.attn_norm.scale"):
        assert any(p.startswith(name) and "unexpected" in p for p in problems), name


def test_truncated_shard_names_its_tensors(tmp_path, quantized):
    ckpt_dir = Path(shutil.copytree(quantized, tmp_path / "c"))
    shard = sorted(ckpt_dir.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    data_left = len(data) - 1000 - 8 - header_len
    cut = [k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > data_left]
    assert cut
    ckpt = open_checkpoint(ckpt_dir)  # opening reads headers only: no error yet
    with pytest.raises(CheckpointError) as info:
        ckpt.validate()
    problems = info.value.problems
    assert f"shard {shard.name}: truncated: header declares {len(data)} bytes, file has {len(data) - 1000}" in problems
    for name in cut:
        assert f"{name}: data truncated (shard {shard.name})" in problems
    with pytest.raises(CheckpointError):  # nothing is streamed from a broken checkpoint
        ckpt.iter_weights(torch.float32)


def test_bad_index_invalid_json(tmp_path, quantized):
    ckpt_dir = Path(shutil.copytree(quantized, tmp_path / "c"))
    (ckpt_dir / "model.safetensors.index.json").write_text("{not json")
    problems = problems_of(ckpt_dir)
    assert len(problems) == 1 and "not valid JSON" in problems[0]


def test_bad_index_without_weight_map(tmp_path, quantized):
    ckpt_dir = Path(shutil.copytree(quantized, tmp_path / "c"))
    (ckpt_dir / "model.safetensors.index.json").write_text('{"metadata": {}}')
    problems = problems_of(ckpt_dir)
    assert len(problems) == 1 and "weight_map" in problems[0]


def test_bad_index_missing_shard_and_wrong_mapping(tmp_path, quantized):
    ckpt_dir = Path(shutil.copytree(quantized, tmp_path / "c"))
    index_path = ckpt_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    shards = sorted(set(wm.values()))
    moved = "layers.1.ffn.gate.weight"  # the index points to the wrong (existing) shard
    wrong = next(s for s in shards if s != wm[moved])
    wm[moved] = wrong
    ghost = "norm.weight"  # the index points to a shard file that does not exist
    wm[ghost] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    problems = problems_of(ckpt_dir)
    assert any("model-00099-of-00099.safetensors does not exist" in p for p in problems)
    assert any(p.startswith(f"{moved}: the index maps it to shard {wrong}") for p in problems)
    assert any(p.startswith(f"{ghost}: in shard") and "model-00099" in p for p in problems)


def test_many_problems_in_one_error(tmp_path, raw):
    t = {k: v for k, v in raw.items() if k != "head.weight"}
    t["layers.0.attn.attn_sink"] = torch.zeros(CFG.num_attention_heads + 1)
    t["extra.thing"] = torch.zeros(1)
    problems = problems_of(write_sharded(tmp_path / "c", t))
    assert len(problems) == 3


def test_unquantized_loads_identical_to_quantized(quantized, unquantized):
    for dtype in (torch.bfloat16, torch.float32):
        a = open_checkpoint(quantized).state_dict(dtype)
        b = open_checkpoint(unquantized).state_dict(dtype)
        assert list(a) == list(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_yielded_names_and_dtypes(quantized):
    sd = open_checkpoint(quantized).state_dict(torch.bfloat16)
    from engine.weights.manifest import build_manifest

    manifest = build_manifest(CFG)
    want = {t.name: t for t in manifest.tensors if t.kind != "scale"}
    assert set(sd) == set(want)  # no .scale companions
    for name, t in sd.items():
        spec = want[name]
        assert tuple(t.shape) == spec.logical_shape, name
        expect = {"F32": torch.float32, "I64": torch.int64}.get(spec.dtype, torch.bfloat16)
        assert t.dtype == expect, name


def test_scale_alias_weight_scale_inv(tmp_path, raw):
    t = {(k.removesuffix(".scale") + ".weight_scale_inv" if k.endswith(".scale") else k): v for k, v in raw.items()}
    ckpt = open_checkpoint(write_sharded(tmp_path / "c", t))
    ckpt.validate()
    assert torch.equal(ckpt.state_dict(torch.float32)["layers.0.attn.wq_a.weight"],
                       open_checkpoint(write_sharded(tmp_path / "d", raw)).state_dict(torch.float32)[
                           "layers.0.attn.wq_a.weight"])


def test_unquantized_weight_with_scale_is_a_problem(tmp_path, raw, unquantized):
    with safe_open(str(next(unquantized.glob("model-00001-*"))), "pt") as f:
        name = next(k for k in f.keys() if k.endswith("wq_a.weight"))
        t = dict(raw)
        t[name] = f.get_tensor(name)  # bf16 at the logical shape, but its .scale is still there
    problems = problems_of(write_sharded(tmp_path / "c", t))
    assert problems == [f"{name.removesuffix('.weight')}.scale: unexpected scale: its weight {name} "
                        f"is unquantized (BF16)"]


def test_expert_selection(tmp_path, raw, monkeypatch):
    keep = {1, 6}
    read: list[str] = []
    real_open = checkpoint_mod.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(checkpoint_mod, "safe_open", Spy)
    ckpt_dir = write_sharded(tmp_path / "c", raw)
    names = [n for n, _ in open_checkpoint(ckpt_dir).iter_weights(torch.float32, experts=keep)]
    routed = {int(n.split(".")[4]) for n in names if ".ffn.experts." in n}
    assert routed == keep
    assert not any(".ffn.experts." in k and int(k.split(".")[4]) not in keep for k in read)
    assert "layers.0.ffn.shared_experts.w1.weight" in names and "embed.weight" in names

    # A checkpoint holding only some experts is valid for those experts, and only for those.
    part = {k: v for k, v in raw.items() if ".ffn.experts." not in k or int(k.split(".")[4]) in keep}
    part_dir = write_sharded(tmp_path / "part", part)
    open_checkpoint(part_dir).validate(experts=keep)
    problems = problems_of(part_dir, experts={1, 2})
    assert problems and all(".experts.2." in p and "missing" in p for p in problems)
    assert any("out of range" in p for p in problems_of(part_dir, experts={1, E}))


def test_open_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_dict()))
    with pytest.raises(CheckpointError, match="safetensors"):
        open_checkpoint(tmp_path)


# ---- transformers-renamed layout ------------------------------------------------------------------
def write_hf(path: Path, official: dict[str, torch.Tensor], keep_mtp: bool) -> Path:
    from engine.weights.hf_names import official_to_hf_state_dict

    hf = {k: v.contiguous() for k, v in official_to_hf_state_dict(official, CFG).items()}
    if keep_mtp:
        hf.update({k: v for k, v in official.items() if k.startswith("mtp.")})
    return write_sharded(path, hf)


def test_hf_layout_round_trip(tmp_path, quantized):
    official = open_checkpoint(quantized).state_dict(torch.float32)
    for keep_mtp in (False, True):
        ckpt = open_checkpoint(write_hf(tmp_path / f"hf{keep_mtp}", official, keep_mtp))
        assert ckpt.layout == "hf"
        ckpt.validate()
        got = ckpt.state_dict(torch.float32)
        want = {k: v for k, v in official.items() if keep_mtp or not k.startswith("mtp.")}
        assert set(got) == set(want)
        for name, t in got.items():
            assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name
        sel = dict(ckpt.iter_weights(torch.bfloat16, experts=[2]))
        assert {n.split(".")[4] for n in sel if ".ffn.experts." in n} == {"2"}
        w2 = "layers.1.ffn.experts.2.w2.weight"
        assert torch.equal(sel[w2], official[w2].bfloat16())


def test_hf_layout_problems_use_official_names(tmp_path, quantized):
    official = open_checkpoint(quantized).state_dict(torch.float32)
    path = write_hf(tmp_path / "hf", official, keep_mtp=False)
    from safetensors.torch import load_file

    hf = {}
    for f in sorted(path.glob("*.safetensors")):
        hf.update(load_file(str(f)))
    del hf["model.layers.0.self_attn.q_a_proj.weight"]
    hf["model.layers.1.self_attn.sinks"] = torch.zeros(CFG.num_attention_heads + 1)
    hf["model.layers.0.mystery.weight"] = torch.zeros(2)
    problems = problems_of(write_sharded(tmp_path / "bad", hf))
    assert len(problems) == 3
    assert any(p.startswith("layers.0.attn.wq_a.weight: missing") for p in problems)
    assert any(p.startswith("layers.1.attn.attn_sink: shape") for p in problems)
    assert any(p.startswith("model.layers.0.mystery.weight: unexpected") for p in problems)
