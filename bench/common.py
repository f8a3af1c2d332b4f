"""What every benchmark shares: the software versions it ran with, and writing its JSON."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def versions(with_transformers: bool = True) -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    if with_transformers:
        out["transformers"] = __import__("transformers").__version__
    return out


def write_result(path: str | Path, result: dict) -> None:
    """Write the benchmark's JSON (its headline figures under `summary`) and print the summary."""
    assert "summary" in result, "every benchmark JSON has a top-level summary"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))
