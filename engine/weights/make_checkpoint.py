"""Write a random DeepSeek-V4 model in the official checkpoint layout (tests, demos, benchmarks).

Every tensor of `build_manifest(cfg)` with its exact name, shape and dtype, sharded as
`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`, plus `config.json`, `tokenizer.json`
and `tokenizer_config.json`. Values come from one `torch.Generator(seed)`, drawn tensor by tensor in
manifest order, so the same seed gives byte-identical files and memory stays about one shard.

The values keep activations finite through every layer (in float32 and bfloat16); see `init_value`.
`quantize=False` writes the same model unquantized: every FP8/FP4 weight is stored in BF16 at its logical
shape, holding exactly the values its quantized form dequantizes to (so both load to identical tensors).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from engine.model.config import ModelConfig
from engine.weights.formats import dequantize_fp4, dequantize_fp8_block, quantize_fp4, quantize_fp8_block
from engine.weights.manifest import DTYPE_BYTES, TensorSpec, build_manifest
from engine.weights.tokenizer import build_tokenizer, save_tokenizer

DEFAULT_SHARD_BYTES = 4 << 30
INDEX_FILE = "model.safetensors.index.json"
_TORCH_DTYPE = {"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}


def init_value(spec: TensorSpec, cfg: ModelConfig, gen: torch.Generator) -> Tensor:
    """Random float32 (int64 for tid2eid) values at the tensor's logical shape.

    linears N(0,1)/sqrt(K) (output projections wo_b, w2 further / sqrt(2 * layers)); norms 1 + 0.1 N;
    embed N(0,1); head N(0,1)/sqrt(D); attn_sink N(0,1); ape 0.5 N; hc fn N(0,1)/sqrt(hc*D)/2,
    hc base 0.5 N, hc scale U(0.5, 1.5); gate.bias 0.1 N; tid2eid rows of top-k distinct expert ids.
    """
    name, shape = spec.name, spec.logical_shape or spec.shape
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1]
    randn = lambda: torch.randn(shape, generator=gen)  # noqa: E731
    if leaf == "tid2eid":
        ranks = torch.rand((cfg.vocab_size, cfg.n_routed_experts), generator=gen).argsort(dim=1, stable=True)
        return ranks[:, : cfg.num_experts_per_tok].contiguous()
    if leaf.startswith("hc_"):
        if leaf.endswith("_fn"):
            return randn() * (0.5 / math.sqrt(shape[-1]))
        if leaf.endswith("_base"):
            return randn() * 0.5
        return torch.rand(shape, generator=gen) + 0.5  # _scale
    if leaf == "attn_sink" or name == "embed.weight":
        return randn()
    if leaf == "ape":
        return randn() * 0.5
    if leaf == "bias":
        return randn() * 0.1
    if leaf.endswith("norm"):
        return 1.0 + 0.1 * randn()
    if len(shape) != 2:
        raise ValueError(f"no init rule for {name} {shape}")
    w = randn() / math.sqrt(shape[1])  # head: K = D as well
    if leaf in ("wo_b", "w2"):
        w /= math.sqrt(2 * cfg.n_layers_total)
    return w


def _stored(spec: TensorSpec, scale: TensorSpec | None, value: Tensor, quantize: bool) -> Iterator[tuple[str, Tensor]]:
    """The tensors written for one manifest weight: itself (+ its scale when quantized)."""
    if spec.kind in ("fp8", "fp4"):
        q, s = quantize_fp8_block(value) if spec.kind == "fp8" else quantize_fp4(value)
        if quantize:
            yield spec.name, q.contiguous()
            yield scale.name, s.contiguous()
        else:
            deq = dequantize_fp8_block if spec.kind == "fp8" else dequantize_fp4
            yield spec.name, deq(q, s, torch.bfloat16)
        return
    yield spec.name, value.to(_TORCH_DTYPE[spec.dtype])


def _stored_bytes(spec: TensorSpec, scale: TensorSpec | None, quantize: bool) -> int:
    if spec.kind in ("fp8", "fp4"):
        return spec.nbytes + scale.nbytes if quantize else spec.numel_logical * DTYPE_BYTES["BF16"]
    return spec.nbytes


def _plan_shards(sizes: list[int], shard_bytes: int) -> list[int]:
    """Shard number of each weight (a weight and its scale share one); at least 2 shards when possible."""
    target = min(shard_bytes, math.ceil(sum(sizes) / 2))
    out, shard, used = [], 0, 0
    for size in sizes:
        if used and used + size > target:
            shard, used = shard + 1, 0
        out.append(shard)
        used += size
    return out


def write_checkpoint(cfg: ModelConfig, out_dir: str | Path, seed: int, shard_bytes: int = DEFAULT_SHARD_BYTES,
                     quantize: bool = True) -> Path:
    """Write a random model for `cfg` into `out_dir` (created if needed); returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(cfg)
    specs = manifest.by_name()
    weights = [t for t in manifest.tensors if t.kind != "scale"]
    scales = [specs.get(t.name.removesuffix(".weight") + ".scale") if t.kind != "plain" else None for t in weights]
    shard_of = _plan_shards([_stored_bytes(w, s, quantize) for w, s in zip(weights, scales)], shard_bytes)
    n_shards = shard_of[-1] + 1
    files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    for stale in out.glob("model-*-of-*.safetensors"):
        if stale.name not in files:
            stale.unlink()

    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    shard: dict[str, Tensor] = {}
    for i, (spec, scale) in enumerate(zip(weights, scales)):
        for name, t in _stored(spec, scale, init_value(spec, cfg, gen), quantize):
            shard[name] = t
            weight_map[name] = files[shard_of[i]]
            total += t.numel() * t.element_size()
        if i + 1 == len(weights) or shard_of[i + 1] != shard_of[i]:
            save_file(shard, str(out / files[shard_of[i]]), metadata={"format": "pt"})
            shard = {}

    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    save_tokenizer(build_tokenizer(cfg.vocab_size), out)
    return out
