"""ServerSettings: what the frontend needs to know, from the command line or from a Topology."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
DEFAULT_MAX_CHOICES_PER_REQUEST = 256  # prompts x n of one request
DEFAULT_MAX_REQUESTS_IN_FLIGHT = 1024  # POST /v1/* requests served at once (more: 429)
DEFAULT_MAX_FILE_STORAGE_BYTES = 10 * 2**30  # all stored files together (uploads beyond: 413)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None  # the environment variable that holds the API key (None: no auth)
    state_dir: Path = Path(".megaserve")
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_batch_file_bytes: int = 100 * 2**20
    batch_concurrency: int = 8
    model_name: str | None = None  # served model id (default: the model directory's name)
    max_choices_per_request: int = DEFAULT_MAX_CHOICES_PER_REQUEST
    max_requests_in_flight: int = DEFAULT_MAX_REQUESTS_IN_FLIGHT
    max_file_storage_bytes: int = DEFAULT_MAX_FILE_STORAGE_BYTES
    retry_after_s: int = 1  # the Retry-After of a 429
    status_interval_s: float = 1.0  # /health and /metrics snapshot refresh (the topology's ping interval)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for key in ("max_body_bytes", "max_batch_file_bytes", "batch_concurrency", "max_choices_per_request",
                    "max_requests_in_flight", "max_file_storage_bytes", "retry_after_s"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not isinstance(self.status_interval_s, (int, float)) or not self.status_interval_s > 0:
            raise ValueError(f"status_interval_s must be a positive number, got {self.status_interval_s!r}")
        object.__setattr__(self, "state_dir", Path(self.state_dir))

    def api_key(self) -> str | None:
        """The key clients must send (read from the environment now); None when auth is off.

        Raises ValueError when `api_key_env` names a variable that is unset or empty: a server that was told
        to require a key must not silently run open.
        """
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"api_key_env names {self.api_key_env!r}, but that environment variable is unset or empty")
        return key

    @classmethod
    def from_topology(cls, topology: Any, **overrides: Any) -> ServerSettings:
        """Settings from a cluster.topology.Topology's `server` section (plus explicit overrides)."""
        s = topology.server
        values = dict(host=s.host, port=s.port, api_key_env=s.api_key_env, state_dir=Path(s.state_dir),
                      max_body_bytes=s.max_body_bytes, max_batch_file_bytes=s.max_batch_file_bytes,
                      batch_concurrency=s.batch_concurrency, max_choices_per_request=s.max_choices_per_request,
                      max_requests_in_flight=s.max_requests_in_flight, max_file_storage_bytes=s.max_file_storage_bytes,
                      status_interval_s=topology.health.ping_interval_s)
        if topology.model.path is not None:
            values["model_name"] = Path(topology.model.path).name
        values.update(overrides)
        return cls(**values)
