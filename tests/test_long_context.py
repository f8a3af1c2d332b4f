"""bench/long_context.py at 16K tokens (the 1M-token run is the same script: see its docstring): one request of
chunked prefill and decode through the engine, the sequence's cache as held within 2% of the accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_long_request_memory_matches_accounting(tmp_path: Path) -> None:
    from bench import long_context

    decode = 4
    tokens = 16384 - decode  # the sequence ends on a page boundary: no partly filled page
    res = long_context.run(tokens, tmp_path / "long.json", chunk=4096, decode_tokens=decode, log=lambda s: None)
    s = res["summary"]
    assert s["status"] == "done" and s["tokens"] == tokens
    assert res["decode"]["tokens"] == decode
    mem = res["memory"]
    assert mem["sequence_tokens"] == tokens + decode
    assert abs(mem["ratio_total"] - 1) <= 0.02, mem
    assert mem["sequence_held"]["pages"] == mem["accounting"]["compressed"]  # whole pages: exactly the entries
    assert [p["tokens"] for p in res["prefill"]["checkpoints"]][-1] == tokens
    assert json.loads((tmp_path / "long.json").read_text())["summary"] == s
