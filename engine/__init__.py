"""One rank's compute: the DeepSeek-V4 model, its weights and cache, the step loop.

`from engine import LLM, SamplingParams` is the offline API (imported lazily, so that
`import engine.model.config` stays light).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from engine.core.llm import LLM

        return LLM
    if name == "SamplingParams":
        from scheduler.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
