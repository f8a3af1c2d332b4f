"""ModelConfig: the DeepSeek-V4 `config.json`, frozen and validated (v4-model.md §1).

Field names equal the checkpoint JSON keys. Unknown keys are kept in `extra` and ignored.
Presets: `v4-pro`, `v4-flash` (the published configs, exactly), `tiny` (tests, demo) and
`small` (benchmarks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The dtypes the engine computes (and keeps dequantized weights and the cache) in: the one list of names.
MODEL_DTYPES = ("float32", "bfloat16")
# How the engine holds the weights (engine.model.weight_format): checkpoint precision, or all in the model dtype.
WEIGHT_MODES = ("native", "dequantized")

VALID_RATIOS = (0, 4, 128)
QUANTIZED_EXPERT_DTYPES = ("fp4", "fp8")
# expert_dtype values naming unquantized routed experts (transformers accepts them) -> safetensors dtype
UNQUANTIZED_EXPERT_DTYPES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "fp32": "F32",
                             "float32": "F32"}

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters, applied only in compressed (CSA/HCA) layers (v4-model.md §2.1)."""

    type: str = "yarn"
    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1536
    o_groups: int = 16
    o_lora_rank: int = 1024
    n_routed_experts: int = 384
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 3072
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 1024
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    # One entry per main layer, then one per MTP layer (the reference indexes it by layer id).
    compress_ratios: tuple[int, ...] = (128, 128) + (4, 128) * 29 + (4, 0)
    quantization_config: Mapping[str, Any] | None = None
    expert_dtype: str = "fp4"
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    # Keys of config.json that we do not know: kept, never used.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"config key '{key}': {msg} (got {getattr(self, key)!r})")

        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
            "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
            "moe_intermediate_size", "sliding_window", "index_n_heads", "index_head_dim",
            "index_topk", "hc_mult", "hc_sinkhorn_iters",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(key, "must be a positive integer")
        for key in ("n_shared_experts", "num_hash_layers", "num_nextn_predict_layers", "qk_rope_head_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(key, "must be a non-negative integer")
        if self.num_key_value_heads != 1:
            raise bad("num_key_value_heads", "DeepSeek-V4 attention is MQA with a single shared KV head; must be 1")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise bad("qk_rope_head_dim", f"must be even and at most head_dim={self.head_dim}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise bad("index_head_dim", f"must be at least qk_rope_head_dim={self.qk_rope_head_dim}")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise bad("o_groups", "must divide num_attention_heads * head_dim")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"must be at most n_routed_experts={self.n_routed_experts}")
        if self.num_hash_layers > self.num_hidden_layers:
            raise bad("num_hash_layers", f"must be at most num_hidden_layers={self.num_hidden_layers}")
        if self.scoring_func != "sqrtsoftplus":
            raise bad("scoring_func", "only 'sqrtsoftplus' (DeepSeek-V4) is supported")
        if self.expert_dtype not in QUANTIZED_EXPERT_DTYPES and self.expert_dtype not in UNQUANTIZED_EXPERT_DTYPES:
            raise bad("expert_dtype", f"must be 'fp4' or 'fp8' (quantized routed experts) or an unquantized dtype "
                      f"{sorted(UNQUANTIZED_EXPERT_DTYPES)}")
        if self.hc_eps <= 0 or self.rms_norm_eps <= 0:
            raise bad("hc_eps" if self.hc_eps <= 0 else "rms_norm_eps", "must be positive")
        n_expected = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) != n_expected:
            raise bad("compress_ratios", f"must have num_hidden_layers + num_nextn_predict_layers = "
                      f"{n_expected} entries, got {len(self.compress_ratios)}")
        for i, ratio in enumerate(self.compress_ratios):
            if ratio not in VALID_RATIOS:
                raise bad("compress_ratios", f"entry {i} is {ratio!r}; each ratio must be one of {VALID_RATIOS}")
        if self.rope_scaling is not None and self.rope_scaling.type != "yarn":
            raise bad("rope_scaling", "only type 'yarn' is supported")

    # ---- derived values -------------------------------------------------------------
    @property
    def n_layers_total(self) -> int:
        """Main layers plus MTP layers; layer ids >= num_hidden_layers are MTP blocks."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def compress_ratio(self, layer_id: int) -> int:
        return self.compress_ratios[layer_id]

    def is_hash_layer(self, layer_id: int) -> bool:
        """Hash-routed MoE (tid2eid) in layers < num_hash_layers; never in MTP blocks."""
        return layer_id < self.num_hash_layers

    # ---- (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        model_type = raw.get("model_type", "deepseek_v4")
        if model_type != "deepseek_v4":
            raise ConfigError(f"config key 'model_type': must be 'deepseek_v4' (got {model_type!r})")
        for key, value in raw.items():
            if key in ("architectures", "model_type"):
                continue  # written back by to_dict
            if key in known:
                kwargs[key] = value
            else:
                extra[key] = value
        if "compress_ratios" in kwargs:
            ratios = kwargs["compress_ratios"]
            if not isinstance(ratios, (list, tuple)):
                raise ConfigError(f"config key 'compress_ratios': must be a list of integers (got {ratios!r})")
            n_main = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
            n_mtp = kwargs.get("num_nextn_predict_layers", cls.num_nextn_predict_layers)
            ratios = tuple(ratios)
            # transformers truncates the list to num_hidden_layers; the MTP block is SWA-only.
            if len(ratios) == n_main and n_mtp > 0:
                ratios = ratios + (0,) * n_mtp
            elif len(ratios) > n_main + n_mtp:  # transformers loads these too: it reads the first entries
                log.info("config compress_ratios: %d entries for %d main + %d MTP layers; the %d trailing ones "
                         "are ignored", len(ratios), n_main, n_mtp, len(ratios) - n_main - n_mtp)
                ratios = ratios[:n_main + n_mtp]
            kwargs["compress_ratios"] = ratios
        rs = kwargs.get("rope_scaling")
        if isinstance(rs, Mapping):
            rs = dict(rs)
            rs.setdefault("type", rs.pop("rope_type", "yarn"))
            allowed = {f.name for f in dataclasses.fields(RopeScaling)}
            try:
                kwargs["rope_scaling"] = RopeScaling(**{k: v for k, v in rs.items() if k in allowed})
            except TypeError as e:
                raise ConfigError(f"config key 'rope_scaling': {e}") from e
        elif rs is not None:
            raise ConfigError(f"config key 'rope_scaling': must be an object or null (got {rs!r})")
        if "quantization_config" in kwargs and kwargs["quantization_config"] is not None:
            kwargs["quantization_config"] = dict(kwargs["quantization_config"])
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:
            raise ConfigError(f"invalid config: {e}") from e

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no config.json") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must hold a JSON object")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The config.json form (HF keys), with the unknown keys put back."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
        }
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if isinstance(value, RopeScaling):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        out.update(self.extra)
        return out


_FP8_QUANT = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "scale_fmt": "ue8m0",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}

V4_PRO = ModelConfig(quantization_config=_FP8_QUANT)

V4_FLASH = ModelConfig(
    hidden_size=4096,
    num_hidden_layers=43,
    num_attention_heads=64,
    q_lora_rank=1024,
    o_groups=8,
    n_routed_experts=256,
    moe_intermediate_size=2048,
    routed_scaling_factor=1.5,
    index_topk=512,
    compress_ratios=(0, 0) + (4, 128) * 20 + (4, 0),
    quantization_config=_FP8_QUANT,
)

# Tests and the demo: every layer kind (SWA, CSA, HCA), hash and learned routing, MTP.
# Real window (128) and ratios (4, 128), so every boundary of the real model occurs.
TINY = ModelConfig(
    vocab_size=512,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    head_dim=64,
    qk_rope_head_dim=16,
    q_lora_rank=64,
    o_groups=2,
    o_lora_rank=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    num_hash_layers=2,
    routed_scaling_factor=1.5,
    index_n_heads=16,
    index_head_dim=32,
    index_topk=8,
    compress_ratios=(0, 4, 128, 4, 0),
    max_position_embeddings=65536,
    rope_scaling=RopeScaling(original_max_position_embeddings=4096),
    quantization_config=_FP8_QUANT,
)

# Benchmarks: expert matmuls, not Python, dominate a step.
SMALL = ModelConfig(
    vocab_size=4096,
    hidden_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    head_dim=128,
    qk_rope_head_dim=32,
    q_lora_rank=256,
    o_groups=2,
    o_lora_rank=256,
    n_routed_experts=32,
    num_experts_per_tok=6,
    moe_intermediate_size=512,
    num_hash_layers=1,
    routed_scaling_factor=2.5,
    index_n_heads=16,
    index_head_dim=64,
    index_topk=64,
    compress_ratios=(0, 4, 128, 4, 0),
    max_position_embeddings=65536,
    rope_scaling=RopeScaling(original_max_position_embeddings=8192),
    quantization_config=_FP8_QUANT,
)

PRESETS: dict[str, ModelConfig] = {
    "v4-pro": V4_PRO,
    "v4-flash": V4_FLASH,
    "tiny": TINY,
    "small": SMALL,
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
