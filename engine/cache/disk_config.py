"""The disk tier's settings (engine.cache.disk): no torch here, so the topology can hold them too."""

from __future__ import annotations

from dataclasses import dataclass

SWA_MODES = ("full", "periodic", "none")


@dataclass(frozen=True)
class DiskCacheConfig:
    path: str
    capacity_gb: float = 16.0
    swa: str = "full"  # full | periodic | none: how much window/compressor state is stored (module doc)
    period_tokens: int = 4096  # periodic: a state every period_tokens tokens (a multiple of page_tokens)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"disk cache path must be a non-empty string, got {self.path!r}")
        if not isinstance(self.capacity_gb, (int, float)) or isinstance(self.capacity_gb, bool) \
                or not self.capacity_gb > 0:
            raise ValueError(f"disk cache capacity_gb must be > 0, got {self.capacity_gb!r}")
        if self.swa not in SWA_MODES:
            raise ValueError(f"disk cache swa must be one of {', '.join(SWA_MODES)}, got {self.swa!r}")
        if not isinstance(self.period_tokens, int) or isinstance(self.period_tokens, bool) or self.period_tokens < 1:
            raise ValueError(f"disk cache period_tokens must be a positive integer, got {self.period_tokens!r}")

    @property
    def capacity_bytes(self) -> int:
        return int(self.capacity_gb * 2**30)
