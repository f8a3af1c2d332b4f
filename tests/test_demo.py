"""cluster/demo.py (`make demo`) beside a running `megaserve up` of the topology it brings up itself."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cluster import demo

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_demo_stops_before_touching_a_served_checkpoint(tmp_path, monkeypatch, capsys):
    """An `up` of examples/local.yaml is running (its up.json names a live driver): the demo writes nothing,
    says what is running and how to stop it, and exits 1 instead of rewriting the served checkpoint."""
    examples = tmp_path / "examples"
    examples.mkdir()
    shutil.copy(EXAMPLES / "local.yaml", examples / "local.yaml")
    state = tmp_path / "out" / "megaserve" / "local"  # server.state_dir of local.yaml, relative to its folder
    state.mkdir(parents=True)
    (state / "up.json").write_text(json.dumps({"pid": os.getpid(), "phase": "ready", "http": "http://127.0.0.1:8000"}))
    monkeypatch.setattr(demo, "EXAMPLES", examples)
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--dir", str(tmp_path / "out" / "demo")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"megaserve demo: `megaserve up examples/local.yaml` is running (pid {os.getpid()}, "
                   f"http://127.0.0.1:8000); the demo rewrites the checkpoint it serves "
                   f"({tmp_path / 'out' / 'demo' / 'tiny'}) and brings up the same topology. Stop it first: "
                   f"megaserve down examples/local.yaml")
    assert not (tmp_path / "out" / "demo").exists()
    # once that driver is gone, nothing is in the way
    (state / "up.json").write_text(json.dumps({"pid": 2**22 + 1, "phase": "ready"}))
    assert demo.running_cluster(examples / "local.yaml") is None
