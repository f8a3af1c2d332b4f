"""Open, validate and stream a DeepSeek-V4 checkpoint (official layout, or the transformers-renamed one).

    ckpt = open_checkpoint(model_dir)           # reads config.json and the safetensors headers only
    ckpt.validate(experts={0, 5})               # one CheckpointError listing every problem, by tensor name
    for name, t in ckpt.iter_weights(torch.bfloat16, "cuda", experts={0, 5}):
        ...                                     # official names, dequantized, one tensor at a time

`experts` may also map MoE layer id (main layers, then MTP blocks) -> experts of that layer, as an expert-
parallel rank needs under a per-layer placement: only those (layer, expert) tensors are read.

Files: `model.safetensors.index.json` + the shards it names, or a single `model.safetensors`, or (no index)
every `*.safetensors` in the directory. Data is read lazily through `safetensors.safe_open` (memory-mapped).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Mapping
from contextlib import ExitStack
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from engine.model.config import ConfigError, ModelConfig
from engine.model.weight_format import DENSE, WeightFormats
from engine.weights.checkpoint_check import LoadItem, check_tensors, routed_expert_id, scale_name
from engine.weights.formats import dequantize_fp4, dequantize_fp8_block
from engine.weights.manifest import Manifest, build_manifest
from engine.weights.safetensors_header import ST_DTYPES, TORCH_TO_ST, ShardHeader, TensorEntry, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """Everything wrong with a checkpoint; `problems` has one line per problem, each naming its tensor."""

    def __init__(self, problems: list[str], where: str | Path = "checkpoint") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{where}: {len(self.problems)} problem(s):\n{lines}")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read `config.json` and every shard header under the directory `path`; no tensor data is read.

    Raises CheckpointError only when there is nothing to check (no config, no safetensors); every other
    problem (bad index, truncated shard, ...) is reported by `Checkpoint.validate`.
    """
    root = Path(path)
    if root.is_file():
        root = root.parent
    try:
        cfg = ModelConfig.from_json(root / "config.json")
    except ConfigError as e:
        raise CheckpointError([str(e)], root) from e
    problems: list[str] = []
    shards = _read_shards(root, problems)
    if not shards and not problems:
        raise CheckpointError([f"no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors files"], root)
    return Checkpoint(root, cfg, shards, problems)


def _read_shards(root: Path, problems: list[str]) -> list[ShardHeader]:
    """The shard headers to use; index problems go into `problems`."""
    index = root / INDEX_FILE
    if index.exists():
        weight_map = _read_index(index, problems)
        if weight_map is not None:
            return _indexed_shards(root, weight_map, problems)
    elif (root / SINGLE_FILE).exists():
        return [read_header(root / SINGLE_FILE)]
    # No usable index: fall back to every shard in the directory, so tensor problems are still listed.
    return [read_header(p) for p in sorted(root.glob("*.safetensors"))]


def _read_index(index: Path, problems: list[str]) -> dict[str, str] | None:
    try:
        raw = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"index {index.name}: not valid JSON: {e}")
        return None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        problems.append(f"index {index.name}: no 'weight_map' object of tensor name -> shard file")
        return None
    return weight_map


def _indexed_shards(root: Path, weight_map: dict[str, str], problems: list[str]) -> list[ShardHeader]:
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    shards = []
    for shard, names in by_shard.items():
        if not (root / shard).is_file():
            problems.append(f"index {INDEX_FILE}: shard {shard} does not exist ({len(names)} tensors mapped to it)")
            continue
        header = read_header(root / shard)
        shards.append(header)
        if not header.tensors:
            continue  # unreadable: read_header said why
        for name in names:
            if name not in header.tensors:
                problems.append(f"{name}: the index maps it to shard {shard}, which does not contain it")
        for name in header.tensors:
            if weight_map.get(name) != shard:
                problems.append(f"{name}: in shard {shard} but the index maps it to {weight_map.get(name)}")
    return shards


class Checkpoint:
    """A checkpoint directory: its config, shard headers, and (for the HF layout) the name mapping."""

    def __init__(self, root: Path, config: ModelConfig, shards: list[ShardHeader], problems: list[str]) -> None:
        self.path = root
        self.config = config
        self.shards = shards
        self._open_problems = list(problems)
        self.entries: dict[str, TensorEntry] = {}  # stored name -> where its data is
        for shard in shards:
            self._open_problems += shard.problems
            for name, entry in shard.tensors.items():
                if name in self.entries:
                    self._open_problems.append(f"{name}: stored twice, in {self.entries[name].file.name} and "
                                               f"{entry.file.name}")
                    continue
                self.entries[name] = entry
        self.layout = "hf" if _is_hf_layout(self.entries) else "official"
        # official name -> (dtype, shape) as found, and for the HF layout official name -> stored HF name
        self._found: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._source: dict[str, str] = {}
        if self.layout == "official":
            self._found = {n: (e.dtype, e.shape) for n, e in self.entries.items()}
        else:
            self._map_hf_names()

    @property
    def has_mtp(self) -> bool:
        """Whether the checkpoint holds the MTP block(s) (a transformers-saved one does not)."""
        return any(name.startswith("mtp.") for name in self._found)

    @cached_property
    def manifest(self) -> Manifest:
        return build_manifest(self.config)

    def validate(self, experts: Collection[int] | Mapping[int, Collection[int]] | None = None) -> None:
        """Raise one CheckpointError listing every problem; `experts`: the routed experts that must be present."""
        self._plan(experts)

    def iter_weights(self, dtype: torch.dtype, device: str | torch.device = "cpu",
                     experts: Collection[int] | Mapping[int, Collection[int]] | None = None,
                     native: bool = False) -> Iterator[tuple[str, Tensor]]:
        """Validate, then stream `(official_name, tensor)` one tensor at a time.

        Order: manifest order (official layout); file order, `mtp.*` first (HF layout).

        FP8/FP4 weights are dequantized to `dtype` (their scales are not yielded); manifest-F32 tensors
        (`attn_sink`, `ape`, `hc_*`, `gate.bias`) come as float32 and `tid2eid` as int64, whatever `dtype`.
        `native=True`: every tensor as stored (FP8/FP4 weights followed by their scale, named `X.scale`; the
        model's parameters set the dtype of the rest). Routed experts not in `experts` (None: all) are skipped
        without reading their data.
        """
        items = self._plan(experts)  # raises here, before the first tensor
        if self.layout == "hf":
            return self._stream_hf(items, dtype, torch.device(device), native)
        return self._stream(items, dtype, torch.device(device), native)

    def native_formats(self) -> WeightFormats:
        """How a `weights: native` model holds this checkpoint: its FP8 linears and routed experts as stored,
        BF16 tensors in bfloat16; an unquantized checkpoint is held dense (DENSE). CheckpointError when one
        class of weights is stored partly quantized, partly not."""
        items = self._plan(None)
        found = {"linears": set(), "experts": set()}
        scales = {"linears": set(), "experts": set()}
        for it in items:
            if it.spec.kind == "plain":
                continue
            cls = "linears" if routed_expert_id(it.spec.name) is None else "experts"
            found[cls].add(it.stored)
            if it.scale_key is not None:
                scales[cls].add(self._found[self._scale_official(it)][0])
        problems = [f"{cls}: stored partly quantized ({sorted(kinds - {'plain'})}), partly not; load it with "
                    f"weights: dequantized" for cls, kinds in found.items() if "plain" in kinds and len(kinds) > 1]
        problems += [f"{cls}: scales of several dtypes {sorted(d)}" for cls, d in scales.items() if len(d) > 1]
        if problems:
            raise CheckpointError(problems, self.path)
        lin = "fp8" if "fp8" in found["linears"] else "dense"
        exp = next(iter(found["experts"] - {"plain"}), "dense")
        if lin == "dense" and exp == "dense":
            return DENSE
        return WeightFormats(linears=lin, experts=exp, bf16=True,
                             linear_scale=next(iter(scales["linears"]), "F8_E8M0"),
                             expert_scale=next(iter(scales["experts"]), "F8_E8M0"))

    def _scale_official(self, it: LoadItem) -> str:
        return it.scale_key if it.scale_key in self._found else scale_name(it.spec.name)

    def state_dict(self, dtype: torch.dtype, device: str | torch.device = "cpu",
                   experts: Collection[int] | None = None) -> dict[str, Tensor]:
        """All of `iter_weights` in one dict (small models, tests)."""
        return dict(self.iter_weights(dtype, device, experts))

    # ---- internals -------------------------------------------------------------------------------
    def _plan(self, experts: Collection[int] | Mapping[int, Collection[int]] | None) -> list[LoadItem]:
        problems = list(self._open_problems)
        per_layer = None
        if isinstance(experts, Mapping):
            per_layer = {int(k): {int(e) for e in v} for k, v in experts.items()}
            experts = set().union(*per_layer.values())
        if experts is not None:
            bad = sorted(e for e in experts if not 0 <= e < self.config.n_routed_experts)
            if bad:
                problems.append(f"experts {bad}: out of range [0, {self.config.n_routed_experts})")
            experts = set(experts)
        # transformers has no MTP: a checkpoint it saved has no `mtp.*` (one converted from official may).
        optional = ("mtp.",) if self.layout == "hf" else ()
        items, found_problems = check_tensors(self.manifest, self._found, experts, optional)
        problems += found_problems
        if problems:
            raise CheckpointError(problems, self.path)
        if per_layer is not None:
            return [it for it in items if _wanted_per_layer(it.spec.name, per_layer, self.config.num_hidden_layers)]
        return [it for it in items if _wanted(it.spec.name, experts)]

    def _stream(self, items: list[LoadItem], dtype: torch.dtype, device: torch.device,
                native: bool = False) -> Iterator[tuple[str, Tensor]]:
        with ExitStack() as stack:
            files: dict[Path, Any] = {}

            def read(key: str) -> Tensor:
                path = self.entries[key].file
                if path not in files:
                    files[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                return files[path].get_tensor(key).to(device)

            for it in items:
                w = read(it.key)
                if native:
                    yield it.spec.name, w
                    if it.scale_key is not None:
                        yield scale_name(it.spec.name), read(it.scale_key)
                    continue
                if it.stored == "fp8":
                    w = dequantize_fp8_block(w, read(it.scale_key), dtype)
                elif it.stored == "fp4":
                    w = dequantize_fp4(w, read(it.scale_key), dtype)
                yield it.spec.name, w.to(_out_dtype(it.spec.dtype, dtype))

    def _stream_hf(self, items: list[LoadItem], dtype: torch.dtype, device: torch.device,
                   native: bool = False) -> Iterator[tuple[str, Tensor]]:
        from engine.weights.hf_names import hf_to_official

        yield from self._stream([it for it in items if it.spec.name not in self._source], dtype, device, native)
        wanted = {it.spec.name: it.spec.dtype for it in items if it.spec.name in self._source}
        sources = {self._source[name] for name in wanted}
        with ExitStack() as stack:
            files: dict[Path, Any] = {}
            for key, entry in self.entries.items():
                if key not in sources:
                    continue
                if entry.file not in files:
                    files[entry.file] = stack.enter_context(safe_open(str(entry.file), framework="pt", device="cpu"))
                t = files[entry.file].get_tensor(key).to(device)
                for name, out in hf_to_official(key, t, self.config):
                    if name in wanted:
                        yield name, out.to(_out_dtype(wanted[name], dtype))

    def _map_hf_names(self) -> None:
        """Run the HF -> official mapping on meta tensors: official names, dtypes and shapes, no data."""
        from engine.weights.hf_names import hf_to_official

        for key, entry in self.entries.items():
            if key.startswith("mtp."):  # no transformers name: kept under its official name
                self._found[key] = (entry.dtype, entry.shape)
                continue
            meta = torch.empty(entry.shape, dtype=ST_DTYPES.get(entry.dtype, torch.uint8), device="meta")
            try:
                mapped = hf_to_official(key, meta, self.config)
            except (KeyError, ValueError) as e:
                self._open_problems.append(f"{key}: unexpected tensor (no official name: {e})")
                continue
            for name, t in mapped:
                if name in self._found:
                    self._open_problems.append(f"{name}: produced twice (from {self._source[name]} and {key})")
                    continue
                self._found[name] = (TORCH_TO_ST.get(t.dtype, str(t.dtype)), tuple(t.shape))
                self._source[name] = key


_MOE_LAYER = re.compile(r"^(layers|mtp)\.(\d+)\.")


def _wanted_per_layer(name: str, per_layer: Mapping[int, set[int]], num_hidden_layers: int) -> bool:
    eid = routed_expert_id(name)
    if eid is None:
        return True
    m = _MOE_LAYER.match(name)
    layer = int(m.group(2)) + (num_hidden_layers if m.group(1) == "mtp" else 0)
    return eid in per_layer.get(layer, ())


def _wanted(name: str, experts: Collection[int] | None) -> bool:
    if experts is None:
        return True
    eid = routed_expert_id(name)
    return eid is None or eid in experts


def _out_dtype(manifest_dtype: str, dtype: torch.dtype) -> torch.dtype:
    if manifest_dtype == "F32":
        return torch.float32
    if manifest_dtype == "I64":
        return torch.int64
    return dtype


def _is_hf_layout(entries: dict[str, TensorEntry]) -> bool:
    try:
        from engine.weights.hf_names import is_hf_layout
    except ImportError:
        return False
    return bool(entries) and is_hf_layout(entries.keys())
