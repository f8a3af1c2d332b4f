"""engine/weights/hf_names.py: official names <-> transformers `DeepseekV4ForCausalLM` names, checked against HF."""

import pytest
import torch
from transformers import DeepseekV4ForCausalLM

from engine.model.config import TINY, V4_FLASH, V4_PRO
from engine.weights.hf_names import hf_to_official, is_hf_layout, official_to_hf_name, official_to_hf_state_dict
from engine.weights.manifest import build_manifest
from tests.hf_ref import ALT, hf_config, random_official_state_dict


def _hf_state_dict(cfg, device="cpu"):
    with torch.device(device):
        model = DeepseekV4ForCausalLM._from_config(hf_config(cfg), dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize("cfg", [TINY, ALT, V4_FLASH, V4_PRO], ids=["tiny", "alt", "v4-flash", "v4-pro"])
def test_names_and_shapes_match_transformers(cfg):
    # Full-size configs on the meta device: names and shapes only, no memory.
    sd = {s.name: torch.empty(s.logical_shape, device="meta") for s in build_manifest(cfg).tensors if s.kind != "scale"}
    got = official_to_hf_state_dict(sd, cfg)
    want = _hf_state_dict(cfg, "meta")
    assert sorted(got) == sorted(want)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}


def test_round_trip_and_expert_merge_order():
    sd = random_official_state_dict(TINY, seed=3)
    hsd = official_to_hf_state_dict(sd, TINY)
    inter = TINY.moe_intermediate_size
    gu = hsd["model.layers.2.mlp.experts.gate_up_proj"]
    assert torch.equal(gu[5, :inter], sd["layers.2.ffn.experts.5.w1.weight"])  # w1 rows first
    assert torch.equal(gu[5, inter:], sd["layers.2.ffn.experts.5.w3.weight"])
    assert torch.equal(hsd["model.layers.2.mlp.experts.down_proj"][7], sd["layers.2.ffn.experts.7.w2.weight"])
    assert torch.equal(hsd["lm_head.weight"], sd["head.weight"])
    assert hsd["model.layers.0.mlp.gate.tid2eid"].dtype == torch.int64

    back = {}
    for name, t in hsd.items():
        for oname, ot in hf_to_official(name, t, TINY):
            assert oname not in back
            back[oname] = ot
    main = {k: v for k, v in sd.items() if not k.startswith("mtp.")}
    assert sorted(back) == sorted(main)
    assert all(torch.equal(back[k], main[k]) for k in main)


def test_single_names():
    assert official_to_hf_name("layers.3.attn.indexer.compressor.norm.weight") == (
        "model.layers.3.self_attn.compressor.indexer.kv_norm.weight"
    )
    assert official_to_hf_name("layers.1.ffn.gate.bias") == "model.layers.1.mlp.gate.e_score_correction_bias"
    assert official_to_hf_name("hc_head_scale") == "model.hc_head.hc_scale"
    assert hf_to_official("model.rotary_emb.compress_inv_freq", torch.zeros(2), TINY) == []
    with pytest.raises(KeyError):
        official_to_hf_name("layers.0.attn.bogus.weight")
    with pytest.raises(KeyError):
        hf_to_official("model.layers.0.bogus", torch.zeros(1), TINY)


def test_layout_detection():
    official = [s.name for s in build_manifest(TINY).tensors]
    assert not is_hf_layout(official)
    assert is_hf_layout(_hf_state_dict(TINY, "meta"))
    assert is_hf_layout(["lm_head.weight"])


def test_rejects_scales_and_missing_experts():
    sd = random_official_state_dict(TINY, seed=0)
    with pytest.raises(ValueError, match="dequantized"):
        official_to_hf_state_dict({**sd, "layers.0.attn.wq_a.scale": torch.ones(1, 1)}, TINY)
    del sd["layers.1.ffn.experts.4.w3.weight"]
    with pytest.raises(ValueError, match=r"missing experts \[4\]"):
        official_to_hf_state_dict(sd, TINY)
    bad = torch.zeros(TINY.n_routed_experts, 3, TINY.hidden_size)
    with pytest.raises(ValueError, match="shape"):
        hf_to_official("model.layers.0.mlp.experts.gate_up_proj", bad, TINY)
