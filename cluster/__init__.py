"""Topology, launcher, frontend, client, harness, planner, CLI. The only package that imports ray."""

from __future__ import annotations

from typing import Any

__all__ = ["Client", "ClientError"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import cluster` (and every cluster submodule) stays light: the client loads on first use.
    if name in __all__:
        from cluster import client

        return getattr(client, name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
