"""The manifest reproduces the published checkpoints (v4-model.md §1 "Size facts", §4.4)."""

from __future__ import annotations

from engine.model.config import get_preset
from engine.weights.manifest import build_manifest


def test_v4_pro_manifest_matches_published_checkpoint():
    m = build_manifest(get_preset("v4-pro"))
    assert len(m.tensors) == 145_116
    assert m.bytes == 864_704_792_696
    assert round(m.params_total / 1e9, 1) == 1598.8
    assert round(m.params_main / 1e9, 1) == 1573.0
    assert round(m.params_active / 1e9, 1) == 49.8
    assert round(m.params_active_mtp / 1e9, 2) == 50.65


def test_v4_flash_manifest():
    m = build_manifest(get_preset("v4-flash"))
    assert round(m.params_main / 1e9, 1) == 284.3
    assert round(m.params_total / 1e9, 1) == 290.9
    assert round(m.params_active / 1e9, 1) == 13.8


def test_v4_pro_shapes_and_dtypes_of_section_4_4():
    t = build_manifest(get_preset("v4-pro")).by_name()
    expect = {
        "layers.0.hc_attn_fn": ((24, 28672), "F32"),
        "layers.0.attn.wq_a.weight": ((1536, 7168), "F8_E4M3"),
        "layers.0.attn.wq_a.scale": ((12, 56), "F8_E8M0"),
        "layers.0.attn.wq_b.scale": ((512, 12), "F8_E8M0"),
        "layers.0.attn.wo_a.weight": ((16384, 4096), "F8_E4M3"),
        "layers.0.attn.wo_b.scale": ((56, 128), "F8_E8M0"),
        "layers.0.attn.compressor.wkv.weight": ((512, 7168), "BF16"),  # HCA
        "layers.0.attn.compressor.ape": ((128, 512), "F32"),
        "layers.2.attn.compressor.ape": ((4, 1024), "F32"),  # CSA
        "layers.2.attn.indexer.wq_b.weight": ((8192, 1536), "F8_E4M3"),
        "layers.2.attn.indexer.compressor.ape": ((4, 256), "F32"),
        "layers.2.attn.indexer.weights_proj.weight": ((64, 7168), "BF16"),
        "layers.0.ffn.gate.tid2eid": ((129280, 6), "I64"),
        "layers.3.ffn.gate.bias": ((384,), "F32"),
        "layers.5.ffn.experts.17.w1.weight": ((3072, 3584), "I8"),
        "layers.5.ffn.experts.17.w1.scale": ((3072, 224), "F8_E8M0"),
        "layers.5.ffn.experts.17.w2.scale": ((7168, 96), "F8_E8M0"),
        "layers.5.ffn.shared_experts.w2.scale": ((56, 24), "F8_E8M0"),
        "mtp.0.e_proj.scale": ((56, 56), "F8_E8M0"),
        "mtp.0.ffn.gate.bias": ((384,), "F32"),
        "hc_head_fn": ((4, 28672), "F32"),
        "head.weight": ((129280, 7168), "BF16"),
    }
    for name, (shape, dtype) in expect.items():
        assert (t[name].shape, t[name].dtype) == (shape, dtype), name
    assert "layers.0.attn.indexer.wq_b.weight" not in t  # HCA layers have no indexer
    assert "mtp.0.attn.compressor.ape" not in t  # the MTP block is SWA-only
    assert "layers.3.ffn.gate.tid2eid" not in t
