"""cluster/cli.py: `megaserve manifest` and `megaserve make-checkpoint` through `main([...])`."""

import json

from cluster.cli import main
from engine.model.config import get_preset
from engine.weights.checkpoint import open_checkpoint
from engine.weights.manifest import build_manifest


def test_manifest_json_v4_pro(capsys):
    assert main(["manifest", "--preset", "v4-pro", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tensors"]) == 145116
    assert out["bytes"] == 864704792696
    assert {"params_total", "params_active", "params_main", "num_tensors"} <= set(out)
    assert out["tensors"][0] == {"name": "embed.weight", "shape": [129280, 7168], "dtype": "BF16"}


def test_manifest_json_without_tensors(capsys):
    assert main(["manifest", "--preset", "v4-flash", "--json", "--no-tensors"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tensors"] == out["num_tensors"] and out["bytes"] == build_manifest(get_preset("v4-flash")).bytes


def test_manifest_summary(capsys):
    assert main(["manifest", "--preset", "v4-pro"]) == 0
    out = capsys.readouterr().out
    assert "145,116" in out and "864.70 GB" in out
    assert "1,598.84B" in out and "F8_E4M3" in out and "I8" in out


def test_manifest_from_config_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(get_preset("tiny").to_dict()))
    assert main(["manifest", "--config", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes"] == build_manifest(get_preset("tiny")).bytes


def test_make_checkpoint(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["make-checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "7"]) == 0
    assert "wrote" in capsys.readouterr().out
    ckpt = open_checkpoint(out)
    ckpt.validate()
    assert ckpt.config == get_preset("tiny")
    u = tmp_path / "u"
    assert main(["make-checkpoint", "--config", str(out / "config.json"), "--out", str(u), "--seed", "7",
                 "--no-quantize"]) == 0
    assert not any(n.endswith(".scale") for n in json.loads((u / "model.safetensors.index.json").read_text())[
        "weight_map"])


def test_errors(tmp_path, capsys):
    assert main(["manifest", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    bad = tmp_path / "config.json"
    bad.write_text("{")
    assert main(["manifest", "--config", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_a_reader_that_leaves_early_is_no_error(tmp_path):
    """`megaserve status | head`: the command's output goes to a closed pipe; no BrokenPipeError, exit 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "cluster.cli", "manifest", "--preset", "tiny"], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (0, "")
