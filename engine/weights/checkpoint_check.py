"""Compare what a checkpoint holds (names, dtypes, shapes) with the manifest, before loading anything.

Each manifest weight may be stored as in the manifest (FP8 e4m3 or packed FP4 plus a `.scale`, alias
`.weight_scale_inv`) or unquantized (BF16/F16/F32 at its logical shape, no scale). The result is one
`LoadItem` per weight found, saying how to read it, and the list of every problem, each naming its tensor.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from engine.weights.manifest import Manifest, TensorSpec

FLOAT_DTYPES = ("BF16", "F16", "F32")
INT_DTYPES = ("I64", "I32")  # tid2eid: I64 in the checkpoint, int32 in the reference
SCALE_DTYPES = ("F8_E8M0", "F32")  # UE8M0 as published; float32 scales (DeepSeek-V3 style) also decode
QUANT_DTYPE = {"fp8": "F8_E4M3", "fp4": "I8"}
SCALE_ALIAS = ".weight_scale_inv"  # transformers' FP8 name for `.scale`

_ROUTED = re.compile(r"^(?:layers|mtp)\.\d+\.ffn\.experts\.(\d+)\.")


def routed_expert_id(name: str) -> int | None:
    """The routed expert id of `layers.N.ffn.experts.{e}.*` / `mtp.i.ffn.experts.{e}.*`, else None."""
    m = _ROUTED.match(name)
    return int(m.group(1)) if m else None


def scale_name(weight_name: str) -> str:
    """`X.weight` -> `X.scale`."""
    return weight_name.removesuffix(".weight") + ".scale"


@dataclass(frozen=True)
class LoadItem:
    spec: TensorSpec  # the manifest weight (never a scale)
    stored: str  # how it is stored: "fp8", "fp4" or "plain" (unquantized or a non-linear tensor)
    key: str  # the stored name of the tensor
    scale_key: str | None = None  # the stored name of its scale, when quantized


def _canonical(found: Mapping[str, tuple[str, tuple[int, ...]]], problems: list[str]) -> dict[str, str]:
    """Official name -> stored name, folding `.weight_scale_inv` into `.scale`."""
    out: dict[str, str] = {}
    for key in found:
        name = key.removesuffix(SCALE_ALIAS) + ".scale" if key.endswith(SCALE_ALIAS) else key
        if name in out:
            problems.append(f"{name}: stored twice (as {out[name]} and {key})")
            continue
        out[name] = key
    return out


def _fmt(shape: tuple[int, ...]) -> str:
    return str(list(shape))


def check_tensors(
    manifest: Manifest,
    found: Mapping[str, tuple[str, tuple[int, ...]]],
    experts: Collection[int] | None = None,
    optional: tuple[str, ...] = (),
) -> tuple[list[LoadItem], list[str]]:
    """found: stored name -> (safetensors dtype, shape). Returns (items in manifest order, problems).

    Routed experts outside `experts` (None: all) and names starting with an `optional` prefix may be absent.
    """
    problems: list[str] = []
    canon = _canonical(found, problems)
    specs = manifest.by_name()
    used: set[str] = set()
    items: list[LoadItem] = []
    for spec in manifest.tensors:
        if spec.kind == "scale":
            continue
        key = canon.get(spec.name)
        if key is None:
            if spec.kind in QUANT_DTYPE:
                used.add(scale_name(spec.name))  # a scale without its weight: the weight is the problem
            eid = routed_expert_id(spec.name)
            if (experts is None or eid is None or eid in experts) and not spec.name.startswith(optional):
                problems.append(f"{spec.name}: missing")
            continue
        used.add(spec.name)
        dtype, shape = found[key]
        if spec.kind in QUANT_DTYPE:
            sname = scale_name(spec.name)
            skey = canon.get(sname)
            if skey is not None:
                used.add(sname)
            item = _check_linear(spec, key, dtype, shape, specs[sname], skey, found, problems)
        else:
            item = _check_plain(spec, key, dtype, shape, problems)
        if item is not None:
            items.append(item)
    for name, key in canon.items():
        if name not in used:
            problems.append(f"{key}: unexpected tensor (not in the manifest)")
    return items, problems


def _check_linear(spec: TensorSpec, key: str, dtype: str, shape: tuple[int, ...], sspec: TensorSpec,
                  skey: str | None, found: Mapping[str, tuple[str, tuple[int, ...]]],
                  problems: list[str]) -> LoadItem | None:
    qdtype = QUANT_DTYPE[spec.kind]
    n0 = len(problems)
    if dtype == qdtype:
        if shape != spec.shape:
            problems.append(f"{key}: shape {_fmt(shape)}, expected {_fmt(spec.shape)} ({qdtype})")
        if skey is None:
            problems.append(f"{sspec.name}: missing (scale of the {qdtype} weight {key})")
        else:
            sdtype, sshape = found[skey]
            if sdtype not in SCALE_DTYPES:
                problems.append(f"{skey}: dtype {sdtype}, expected {' or '.join(SCALE_DTYPES)}")
            if sshape != sspec.shape:
                problems.append(f"{skey}: shape {_fmt(sshape)}, expected {_fmt(sspec.shape)}")
        return LoadItem(spec, spec.kind, key, skey) if len(problems) == n0 else None
    if dtype in FLOAT_DTYPES:
        if shape != spec.logical_shape:
            problems.append(f"{key}: shape {_fmt(shape)}, expected {_fmt(spec.logical_shape)} (unquantized {dtype})")
        if skey is not None:
            problems.append(f"{skey}: unexpected scale: its weight {key} is unquantized ({dtype})")
        return LoadItem(spec, "plain", key) if len(problems) == n0 else None
    problems.append(f"{key}: dtype {dtype}, expected {qdtype} with a .scale, or unquantized "
                    f"{'/'.join(FLOAT_DTYPES)}")
    return None


def _check_plain(spec: TensorSpec, key: str, dtype: str, shape: tuple[int, ...],
                 problems: list[str]) -> LoadItem | None:
    n0 = len(problems)
    allowed = FLOAT_DTYPES if spec.dtype in FLOAT_DTYPES else INT_DTYPES if spec.dtype in INT_DTYPES else (spec.dtype,)
    if dtype not in allowed:
        problems.append(f"{key}: dtype {dtype}, expected {spec.dtype}"
                        + (f" (or {'/'.join(a for a in allowed if a != spec.dtype)})" if len(allowed) > 1 else ""))
    if shape != spec.shape:
        problems.append(f"{key}: shape {_fmt(shape)}, expected {_fmt(spec.shape)}")
    return LoadItem(spec, "plain", key) if len(problems) == n0 else None
