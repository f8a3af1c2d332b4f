"""GPU hardware profiles for the planner, read from hardware.yaml (every figure carries its source)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

HARDWARE_FILE = Path(__file__).with_name("hardware.yaml")
_FIELDS = ("hbm_bytes", "hbm_bw", "bf16_flops", "fp8_flops", "fp4_flops", "nvlink_bw", "nvl_domain", "scaleout_bw")
_OPTIONAL = ("fp4_flops",)


class HardwareError(ValueError):
    """A hardware profile is unknown or malformed; the message names the profile and field."""


@dataclass(frozen=True)
class Hardware:
    key: str
    name: str
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    bf16_flops: float  # dense FLOP/s
    fp8_flops: float
    fp4_flops: float | None  # None: no FP4 tensor cores (FP4 weights run as FP8)
    nvlink_bw: float  # bytes/s per GPU, per direction
    nvl_domain: int  # GPUs in one NVLink domain
    scaleout_bw: float  # bytes/s per GPU, per direction
    sources: tuple[tuple[str, str], ...]  # (field, source) for every figure

    @property
    def has_fp4(self) -> bool:
        return self.fp4_flops is not None

    def flops(self, dtype: str) -> float:
        """Dense tensor-core rate for a GEMM whose operands are `dtype` ("bf16", "fp8", "fp4")."""
        if dtype == "fp4":
            return self.fp4_flops if self.fp4_flops is not None else self.fp8_flops
        if dtype == "fp8":
            return self.fp8_flops
        if dtype == "bf16":
            return self.bf16_flops
        raise HardwareError(f"unknown compute dtype {dtype!r}; one of bf16, fp8, fp4")


def _parse(key: str, raw: object) -> Hardware:
    if not isinstance(raw, dict):
        raise HardwareError(f"{HARDWARE_FILE}: profile '{key}' must be a mapping")
    unknown = set(raw) - set(_FIELDS) - {"name"}
    if unknown:
        raise HardwareError(f"{HARDWARE_FILE}: profile '{key}' has unknown fields {sorted(unknown)}")
    values: dict[str, object] = {}
    sources: list[tuple[str, str]] = []
    for f in _FIELDS:
        item = raw.get(f)
        if not isinstance(item, dict) or set(item) != {"value", "source"}:
            raise HardwareError(f"{HARDWARE_FILE}: '{key}.{f}' must be {{value, source}}")
        v, src = item["value"], item["source"]
        if not isinstance(src, str) or not src.strip():
            raise HardwareError(f"{HARDWARE_FILE}: '{key}.{f}' needs a source")
        if v is None and f in _OPTIONAL:
            values[f] = None
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            values[f] = int(v) if f == "nvl_domain" else float(v)
        else:
            raise HardwareError(f"{HARDWARE_FILE}: '{key}.{f}' must be a positive number (got {v!r})")
        sources.append((f, src))
    return Hardware(key=key, name=str(raw.get("name", key)), sources=tuple(sources), **values)  # type: ignore[arg-type]


@lru_cache(maxsize=4)
def load_profiles(path: str | None = None) -> dict[str, Hardware]:
    """All profiles of hardware.yaml (or `path`), by lower-case key."""
    p = Path(path) if path else HARDWARE_FILE
    raw = yaml.safe_load(p.read_text())
    if not isinstance(raw, dict):
        raise HardwareError(f"{p}: must hold a mapping of profiles")
    return {str(k).lower(): _parse(str(k).lower(), v) for k, v in raw.items()}


def get_hardware(key: str) -> Hardware:
    profiles = load_profiles()
    try:
        return profiles[key.lower()]
    except KeyError:
        raise HardwareError(f"unknown accelerator {key!r}; profiles: {sorted(profiles)}") from None
