"""load_model: official and transformers layouts, per-rank expert subsets, broken checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine.model.config import TINY
from engine.weights.checkpoint import CheckpointError, open_checkpoint
from engine.weights.hf_names import official_to_hf_state_dict
from engine.weights.loader import load_model


def _logits(model, ids):
    with torch.inference_mode():
        return model.compute_logits(model(ids, [model.new_state()], [len(ids)]))


def test_transformers_layout_loads_to_the_same_model(tiny_ckpt, tmp_path):
    """The HF-layout export holds the dequantized float32 tensors: it loads to the same model, bit for bit, as the
    official checkpoint loaded dequantized (native weights compute in other kernels, to fp32 rounding)."""
    sd = open_checkpoint(tiny_ckpt).state_dict(dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in official_to_hf_state_dict(sd, TINY).items()},
              str(tmp_path / "model.safetensors"))
    shutil.copy(tiny_ckpt / "config.json", tmp_path / "config.json")
    assert open_checkpoint(tmp_path).layout == "hf"
    hf_layout = load_model(tmp_path)
    ids = torch.arange(2, 200)
    official = load_model(tiny_ckpt, weights="dequantized")
    assert torch.equal(_logits(hf_layout, ids), _logits(official, ids))
    with pytest.raises(ValueError, match="no MTP block"):
        hf_layout.mtp_forward(torch.zeros(1, 4, TINY.hidden_size), ids[:1], [hf_layout.new_state()], [1])


def test_a_rank_loads_only_its_experts(tiny_ckpt, tiny_model):
    part = load_model(tiny_ckpt, experts=[5, 0, 3])
    assert part.local_experts == [0, 3, 5]
    for layer in (0, 3):
        full, mine = tiny_model.layers[layer].ffn.experts, part.layers[layer].ffn.experts
        assert mine.w1.shape[0] == 3
        for local, e in enumerate([0, 3, 5]):
            assert torch.equal(mine.w1[local], full.w1[e]) and torch.equal(mine.w2[local], full.w2[e])
    # everything that is not a routed expert is the same
    assert torch.equal(part.layers[2].attn.compressor.ape, tiny_model.layers[2].attn.compressor.ape)


def test_broken_checkpoint_fails_before_loading(tiny_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["layers.1.attn.wq_a.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load_model(broken)
    assert "layers.1.attn.wq_a.weight" in str(err.value)
