"""Smoke test of bench/moe_overlap.py --quick: it runs at 2 ranks and writes the JSON the lead reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from engine.model.config import get_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a folder of scripts, not installed
from bench.moe_overlap import main, summarize  # noqa: E402

ROW_KEYS = {"part", "world_size", "tokens_per_rank", "backend", "time_s", "compute_only_s", "exposed_comm_s",
            "comm_share", "speedup_vs_sync", "bytes_moved", "bytes_incl_local", "collectives_per_rank",
            "assignments", "repeats"}


@pytest.mark.slow
def test_quick_run_writes_the_result_json(tmp_path, capsys):
    out = tmp_path / "moe.json"
    assert main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exposed ms" in printed and "MB moved" in printed
    res = json.loads(out.read_text())
    assert res["benchmark"] == "moe_overlap" and res["workload"]["quick"] is True
    assert {"torch", "python"} <= set(res["versions"])
    rows = res["results"]
    # 2 parts x 1 world size x 2 token counts x 4 backends (the registered ones: sync, tbo, wave, ll).
    assert len(rows) == 16
    cfg = get_preset("tiny")
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["world_size"] == 2 and r["repeats"] == 2
        t = r["time_s"]
        assert 0 < t["min"] <= t["p10"] <= t["median"] <= t["p90"] <= t["max"]
        assert r["exposed_comm_s"] == pytest.approx(t["median"] - r["compute_only_s"]["median"])
        assert r["bytes_moved"] > 0 and r["bytes_incl_local"] >= r["bytes_moved"]
        if r["part"] == "layer":  # every token's top-k assignments leave their rank once
            assert r["assignments"] == r["tokens_per_rank"] * cfg.num_experts_per_tok * 2
    by_key = {(r["part"], r["tokens_per_rank"], r["backend"]): r for r in rows}
    for part in ("layer", "model"):
        for tokens in (1, 8):
            sync = by_key[(part, tokens, "sync")]
            assert sync["speedup_vs_sync"] == 1.0
            # Same routing for every backend: the same assignments travel.
            backends = ("sync", "tbo", "wave", "ll")
            assert {by_key[(part, tokens, b)]["assignments"] for b in backends} == {sync["assignments"]}
        assert by_key[(part, 8, "sync")]["bytes_moved"] > by_key[(part, 1, "sync")]["bytes_moved"]
    summary = res["summary"]
    for part in ("layer", "model"):
        for backend in ("tbo", "wave", "ll"):
            entry = summary[part][backend]["ws2"]
            assert set(entry) == {"best_speedup_vs_sync", "tokens_per_rank", "points"}


def _row(part, tokens, backend, median, exposed):
    return {"part": part, "world_size": 2, "tokens_per_rank": tokens, "backend": backend,
            "time_s": {"median": median}, "comm_share": exposed / median}


def test_summary_counts_only_points_where_communication_matters():
    rows = [
        _row("layer", 1, "sync", 10.0, 1.0),   # comm 10% of sync: ignored
        _row("layer", 1, "tbo", 5.0, 0.5),
        _row("layer", 8, "sync", 10.0, 3.0),   # 30%: counts
        _row("layer", 8, "tbo", 8.0, 1.0),
        _row("layer", 64, "sync", 10.0, 2.0),  # exactly 20%: counts
        _row("layer", 64, "tbo", 12.5, 4.0),
    ]
    s = summarize(rows)
    assert s["layer"]["tbo"]["ws2"] == {"best_speedup_vs_sync": 1.25, "tokens_per_rank": 8, "points": 2}
    none = summarize(rows[:2])
    assert none["layer"]["tbo"]["ws2"] == {"best_speedup_vs_sync": None, "tokens_per_rank": None, "points": 0}
