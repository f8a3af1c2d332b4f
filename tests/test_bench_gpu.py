"""bench/gpu.py end to end on CPU (`--dry-run-cpu`: tiny shapes, Triton interpreter), so the one expensive GPU run
finds no bug in the script; plus the pieces whose arithmetic the GPU figures rely on."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from bench import gpu  # noqa: E402
from engine.kernels.triton import available  # noqa: E402


def _errors(node, path="") -> list[str]:
    if isinstance(node, dict):
        found = [f"{path}: {node['error']}"] if "error" in node else []
        return found + [e for k, v in node.items() for e in _errors(v, f"{path}/{k}")]
    return []


@pytest.mark.slow
@pytest.mark.skipif(not available("cpu"), reason="needs the Triton interpreter (TRITON_INTERPRET=1, conftest.py)")
def test_dry_run_cpu_runs_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--out", str(out), "--dry-run-cpu", "--decode-layers", "1"]) == 0
    doc = json.loads(out.read_text())
    assert doc["finished"] and _errors(doc) == []
    sections = doc["sections"]
    assert [k for k, v in sections.items() if v["status"] == "ok"] == ["machine", "moe", "fp8", "e2e", "decode", "tune"]
    for row in sections["moe"]["tokens"].values():
        assert row["mxfp4_triton"]["rel_err_vs_bf16_grouped_mm"] < 0.02  # bf16 rounding of the reference path
        assert row["mxfp4_triton"]["bytes"] * 3 < row["bf16_grouped_mm"]["bytes"]
    for shape in sections["fp8"]["shapes"].values():
        assert all(shape[str(t)]["rel_err_fp8_vs_bf16"] < 0.02 for t in (1, 3))
    layer_runs = sections["decode"]["runs"]
    assert set(layer_runs) == {"L1_dequantized", "L1_native"}  # both weight modes of the Transformer
    for mode_run in layer_runs.values():
        (run,) = [v for v in mode_run.values() if isinstance(v, dict)]  # one variant on CPU
        for b in (1, 3):
            r = run[f"batch_{b}"]
            assert r["tokens_per_step"] == [b] * 2 and r["min_cached_tokens"] == 512  # every request hit the prefix
            assert r["bytes"]["step_total"] > r["bytes"]["layers_total"] > 0
    e2e = sections["e2e"]["workloads"]["2x16->3"]
    assert e2e["ours"]["output_tokens"] == e2e["transformers"]["output_tokens"] == 6
    assert {"copy_tb_s", "e2e_2x16->3_ratio", "fp8_speedup_vs_bf16_median", "tune_moe_w13_t4"} <= set(doc["summary"])


def test_cuda_only_without_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_expected_touched_experts():
    assert gpu.expected_touched(256, 6, 1) == pytest.approx(6)
    assert gpu.expected_touched(256, 6, 64) == pytest.approx(256 * (1 - (250 / 256) ** 64))
    assert gpu.expected_touched(8, 2, 10_000) == pytest.approx(8)


def test_marginal_per_layer_is_the_difference_of_step_times():
    runs = {"L4": {"layers": 4, "weights": "w", "default": {"batch_64": {"step_ms_median": 30.0}}},
            "L2": {"layers": 2, "weights": "w", "default": {"batch_64": {"step_ms_median": 17.0}}}}
    out = {"runs": runs}
    gpu._marginal_per_layer(out)
    assert out["marginal_per_layer_ms"] == {"L2->L4:default:batch_64": 6.5}


def test_decode_config_keeps_the_preset_dims_with_fewer_layers():
    cfg = gpu.decode_config("v4-flash", 4)
    assert cfg.hidden_size == 4096 and cfg.n_routed_experts == 256 and cfg.moe_intermediate_size == 2048
    assert cfg.num_hidden_layers == 4 and cfg.compress_ratios == (4, 128, 4, 128, 0) and cfg.num_hash_layers == 3
