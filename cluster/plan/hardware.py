"""GPU hardware profiles for the planner, read from hardware.yaml (every figure carries its source), and the
memory-only profile of a CPU host (`cpu_host`): CPU ranks are planned for memory, not for speed."""

from __future__ import annotations

import os
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
    device: str = "cuda"  # "cpu": a host's RAM share (cpu_host); its rates are 0 and the perf model skips it

    @property
    def has_fp4(self) -> bool:
        return self.fp4_flops is not None

    @property
    def memory_name(self) -> str:
        """How a message names this rank's memory."""
        return f"HBM of a {self.key}" if self.device == "cuda" else "RAM per CPU rank"

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


def host_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_host(memory_bytes_per_rank: int) -> Hardware:
    """A CPU rank for the memory plan: `memory_bytes_per_rank` of RAM; no rates (nothing is modelled for speed)."""
    if memory_bytes_per_rank <= 0:
        raise HardwareError(f"a CPU rank needs memory, got {memory_bytes_per_rank} bytes")
    return Hardware(key="cpu", name="CPU host", hbm_bytes=float(memory_bytes_per_rank), hbm_bw=0.0, bf16_flops=0.0,
                    fp8_flops=0.0, fp4_flops=None, nvlink_bw=0.0, nvl_domain=1, scaleout_bw=0.0,
                    sources=(("hbm_bytes", "this machine's physical memory (os.sysconf) shared by its ranks"),),
                    device="cpu")
