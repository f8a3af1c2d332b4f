"""engine/weights/make_checkpoint.py and engine/weights/tokenizer.py: the random official-layout checkpoint writer."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.model.config import get_preset
from engine.weights.make_checkpoint import write_checkpoint
from engine.weights.manifest import build_manifest
from engine.weights.safetensors_header import read_header
from engine.weights.tokenizer import BOS_TOKEN, EOS_TOKEN, build_tokenizer, load_tokenizer

CFG = get_preset("tiny")


def hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(CFG, tmp_path_factory.mktemp("a"), seed=0)


@pytest.fixture(scope="module")
def tensors(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def test_deterministic_by_seed(ckpt, tmp_path):
    same = write_checkpoint(CFG, tmp_path / "same", seed=0)
    other = write_checkpoint(CFG, tmp_path / "other", seed=1)
    h0, h1, h2 = hashes(ckpt), hashes(same), hashes(other)
    assert h0 == h1
    shards = [n for n in h0 if n.endswith(".safetensors")]
    assert all(h0[n] != h2[n] for n in shards)
    assert h0["config.json"] == h2["config.json"] and h0["tokenizer.json"] == h2["tokenizer.json"]


def test_layout_files_and_index(ckpt):
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2
    assert all(n.startswith("model-") and n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    total = 0
    for shard in shards:
        header = read_header(ckpt / shard)
        assert not header.problems
        assert all(index["weight_map"][k] == shard for k in header.tensors)
        total += sum(e.end - e.begin for e in header.tensors.values())
    assert index["metadata"]["total_size"] == total == build_manifest(CFG).bytes
    assert json.loads((ckpt / "config.json").read_text()) == CFG.to_dict()


def test_every_manifest_tensor_with_exact_dtype_and_shape(ckpt):
    found = {}
    for f in ckpt.glob("*.safetensors"):
        found.update({k: (e.dtype, e.shape) for k, e in read_header(f).tensors.items()})
    want = {t.name: (t.dtype, t.shape) for t in build_manifest(CFG).tensors}
    assert found == want


def test_random_values_are_meaningful(tensors):
    e, k = CFG.n_routed_experts, CFG.num_experts_per_tok
    for layer in range(CFG.num_hash_layers):
        t = tensors[f"layers.{layer}.ffn.gate.tid2eid"]
        assert t.dtype == torch.int64 and t.shape == (CFG.vocab_size, k)
        assert ((t >= 0) & (t < e)).all()
        assert all(len(set(row)) == k for row in t.tolist())  # distinct ids per row
        assert len({tuple(row) for row in t.tolist()}) > 40  # not a fixed pattern (8 * 7 ordered pairs exist)
        assert t[:, 0].unique().numel() == e  # every expert is used
    for name, t in tensors.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("attn_sink", "ape", "bias") or "hc_" in leaf:
            assert t.dtype == torch.float32, name
            assert (t != 0).all() and t.unique().numel() > min(t.numel() - 1, 1), name
        if leaf.endswith("_scale") and "hc_" in leaf:
            assert ((t >= 0.5) & (t <= 1.5)).all(), name
        if name.endswith("norm.weight"):
            assert t.dtype == torch.bfloat16 and (t.float() - 1).abs().max() < 1, name
    assert tensors["layers.0.ffn.experts.0.w1.weight"].view(torch.uint8).unique().numel() > 8  # FP4 codes vary


def test_unquantized_variant(ckpt, tmp_path):
    u = write_checkpoint(CFG, tmp_path / "u", seed=0, quantize=False)
    found = {}
    for f in u.glob("*.safetensors"):
        found.update({k: (e.dtype, e.shape) for k, e in read_header(f).tensors.items()})
    for spec in build_manifest(CFG).tensors:
        if spec.kind == "scale":
            assert spec.name not in found
        elif spec.kind in ("fp8", "fp4"):
            assert found[spec.name] == ("BF16", spec.logical_shape)
        else:
            assert found[spec.name] == (spec.dtype, spec.shape)


def test_small_shards(tmp_path):
    out = write_checkpoint(CFG, tmp_path / "s", seed=3, shard_bytes=200_000)
    shards = list(out.glob("model-*.safetensors"))
    assert len(shards) > 5
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        if name.endswith(".scale"):  # a weight and its scale share a shard
            assert index["weight_map"][name.removesuffix(".scale") + ".weight"] == shard


def test_tokenizer(ckpt):
    tok = load_tokenizer(ckpt)
    assert tok.get_vocab_size() == CFG.vocab_size
    assert tok.token_to_id(BOS_TOKEN) == CFG.bos_token_id == 0
    assert tok.token_to_id(EOS_TOKEN) == CFG.eos_token_id == 1
    text = "The quick brown fox jumps over the lazy dog, naïvely paying 3.50 € at 10:30!"
    ids = tok.encode(text).ids
    assert all(0 <= i < CFG.vocab_size for i in ids) and len(ids) < len(text.encode())
    assert tok.decode(ids) == text
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert config["bos_token"] == BOS_TOKEN and config["eos_token"] == EOS_TOKEN


def test_tokenizer_vocab_sizes():
    assert build_tokenizer(4096).get_vocab_size() == 4096
    assert build_tokenizer(300).get_vocab_size() == 300
