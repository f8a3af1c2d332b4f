"""ModelConfig: the published configs exactly, unknown keys kept, invalid values named."""

from __future__ import annotations

import json

import pytest

from engine.model.config import PRESETS, ConfigError, ModelConfig, get_preset


def test_v4_pro_preset_is_the_published_config():
    c = get_preset("v4-pro")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim) == \
        (129280, 7168, 61, 128, 512)
    assert (c.q_lora_rank, c.o_groups, c.o_lora_rank, c.n_routed_experts, c.moe_intermediate_size) == \
        (1536, 16, 1024, 384, 3072)
    assert (c.routed_scaling_factor, c.index_topk, c.num_hash_layers, c.sliding_window) == (2.5, 1024, 3, 128)
    assert c.compress_ratios == (128, 128) + (4, 128) * 29 + (4, 0)
    assert len(c.compress_ratios) == 62
    assert sum(r == 4 for r in c.compress_ratios[:61]) == 30 and sum(r == 128 for r in c.compress_ratios) == 31
    assert (c.rope_scaling.factor, c.rope_scaling.original_max_position_embeddings) == (16, 65536)
    assert (c.rope_scaling.beta_fast, c.rope_scaling.beta_slow) == (32, 1)
    assert (c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps) == (4, 20, 1e-6)
    assert c.quantization_config["weight_block_size"] == [128, 128]


def test_v4_flash_preset_is_the_published_config():
    c = get_preset("v4-flash")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.q_lora_rank, c.o_groups) == \
        (4096, 43, 64, 1024, 8)
    assert (c.n_routed_experts, c.moe_intermediate_size, c.routed_scaling_factor, c.index_topk) == \
        (256, 2048, 1.5, 512)
    assert c.compress_ratios == (0, 0) + (4, 128) * 20 + (4, 0)
    assert [sum(r == k for r in c.compress_ratios[:43]) for k in (0, 4, 128)] == [2, 21, 20]


def test_round_trip_through_json_keeps_unknown_keys(tmp_path):
    raw = get_preset("v4-flash").to_dict()
    raw["some_future_key"] = {"a": 1}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = ModelConfig.from_json(tmp_path)
    assert c == get_preset("v4-flash")
    assert c.extra == {"some_future_key": {"a": 1}}
    assert c.to_dict()["some_future_key"] == {"a": 1}


def test_truncated_compress_ratios_get_the_mtp_entry():
    raw = get_preset("tiny").to_dict()
    raw["compress_ratios"] = raw["compress_ratios"][:4]  # transformers' truncated form
    assert ModelConfig.from_dict(raw).compress_ratios == (0, 4, 128, 4, 0)


@pytest.mark.parametrize("key,value,words", [
    ("compress_ratios", [0, 4, 128], "compress_ratios"),
    ("compress_ratios", [0, 4, 8, 4, 0], "entry 2"),
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("hidden_size", -1, "hidden_size"),
    ("hidden_size", "128", "hidden_size"),
    ("num_key_value_heads", 8, "num_key_value_heads"),
    ("qk_rope_head_dim", 15, "qk_rope_head_dim"),
    ("scoring_func", "softmax", "scoring_func"),
    ("rope_scaling", {"type": "linear", "factor": 2}, "rope_scaling"),
    ("rope_scaling", 3, "rope_scaling"),
    ("num_hash_layers", 9, "num_hash_layers"),
    ("model_type", "deepseek_v3", "model_type"),
])
def test_invalid_values_name_the_key(key, value, words):
    raw = get_preset("tiny").to_dict()
    raw[key] = value
    with pytest.raises(ConfigError, match=words):
        ModelConfig.from_dict(raw)


def test_unknown_preset_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("v5")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)


def test_presets_are_valid_and_frozen():
    for c in PRESETS.values():
        with pytest.raises(AttributeError):
            c.hidden_size = 1  # type: ignore[misc]
