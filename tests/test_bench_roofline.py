"""bench/roofline.py: the offline workload's FLOPs agree with the model the engine runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engine.model.config import get_preset
from engine.model.model import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a folder of scripts, not installed
from bench.roofline import ceiling, workload_flops  # noqa: E402


def _matmul_params_per_token(cfg) -> tuple[int, int]:
    """(params a token's matmuls touch in the main layers, LM head params), counted from the real modules:
    every 2-D weight of a main layer (the routed experts are stacked 3-D), plus top-k of the routed experts."""
    model = Transformer(cfg, torch.float32, with_mtp=False)
    dense = sum(p.numel() for p in model.layers.parameters() if p.dim() == 2)
    routed = 0
    for block in model.layers:
        e = block.ffn.experts
        routed += cfg.num_experts_per_tok * (e.w1[0].numel() + e.w2[0].numel() + e.w3[0].numel())
    return dense + routed, model.head.weight.numel()


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_workload_flops_match_the_model_matmuls(preset):
    cfg = get_preset(preset)
    n, p_len, new = 3, 40, 5
    f = workload_flops(cfg, n, p_len, new)
    body, head = _matmul_params_per_token(cfg)
    tokens = n * (p_len + new - 1)
    matmuls = 2 * body * tokens + 2 * head * n * new  # the head runs once per new token
    # The planner also counts the attention core (scores and values over window + compressed entries): a
    # little more than the matmuls, never less.
    assert matmuls <= f["total_flops"] <= 1.25 * matmuls
    assert f["total_flops"] == f["prefill_flops"] + f["decode_flops"]


def test_decode_flops_grow_with_new_tokens_and_vanish_at_one():
    cfg = get_preset("tiny")
    assert workload_flops(cfg, 2, 16, 1)["decode_flops"] == 0
    a, b = workload_flops(cfg, 2, 16, 3), workload_flops(cfg, 2, 16, 6)
    assert a["prefill_flops"] == b["prefill_flops"] and b["decode_flops"] > a["decode_flops"] > 0
    with pytest.raises(ValueError, match="prompt_len"):
        workload_flops(cfg, 2, 0, 3)


def test_ceiling_is_tokens_over_the_floor():
    roof = ceiling({"total_flops": 500e9}, {"fp32_gemm_gflops_best": 200.0}, 2048)
    assert roof["floor_s_at_gemm_peak"] == 2.5
    assert roof["ceiling_output_tok_s"] == pytest.approx(2048 / 2.5, abs=0.1)
