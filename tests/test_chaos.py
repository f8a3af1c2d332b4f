"""Chaos under load, as a test: bench/chaos.py on a small topology (2 simulated nodes x 1 CPU rank, the tiny
model): a rank actor's process SIGKILLed under a `megaserve bench serve` load, then the driver SIGKILLed during
a batch job. No request lost, no output changed (failures only retriable, and they succeed when retried), every
batch custom_id exactly once after the restart. Prints the figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_rank_and_driver_kills_lose_nothing(tiny_ckpt: Path, tmp_path: Path) -> None:
    from bench import chaos

    topo = tmp_path / "chaos.yaml"
    topo.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_ckpt), "dtype": "float32"},
        "nodes": [{"name": "a", "label": {"megaserve.node": "a"}, "ranks": 1},
                  {"name": "b", "label": {"megaserve.node": "b"}, "ranks": 1}],
        "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 256, "page_tokens": 128},
        "kv_cache": {"budget_bytes": 16 * 2**20},
        "server": {"port": 0, "state_dir": str(tmp_path / "state")},
        "ray": {"namespace": f"megaserve-chaos-{tmp_path.name}"},
        "health": {"ping_interval_s": 0.5, "ping_timeout_s": 5.0, "step_timeout_s": 20.0, "max_restarts": 3},
    }))
    figures = chaos.run(topo, tmp_path / "chaos.json", n_prompts=4, rounds=2, max_tokens=12, load_prompts=12,
                        load_rate=4.0, batch_lines=16, ready_timeout_s=240)
    chaos.print_figures(figures)
    s = figures["summary"]
    assert s["kills_injected"] == 2
    assert s["requests_lost"] == 0 and s["outputs_changed"] == 0, figures
    assert s["batch_missing"] == 0 and s["batch_duplicated"] == 0 and figures["batch"]["status"] == "completed"
    assert figures["interactive"]["retried_failed"] == 0
    assert s["interactive_requests"] == 4 * 3 and figures["bench_serve_during_rank_kill"]["completed"] > 0
    assert s["passed"]
