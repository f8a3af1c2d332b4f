"""The CUDA path: the model in bfloat16 on a GPU against float32 on the CPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from engine.model.generate import greedy_generate
from engine.weights.loader import load_model


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32(tiny_ckpt, tiny_model):
    gpu = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(2, 512, (300,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = gpu.compute_logits(gpu(ids, [gpu.new_state()], [300])).cpu()
        ref = tiny_model.compute_logits(tiny_model(ids, [tiny_model.new_state()], [300]))
    assert torch.isfinite(got).all()
    assert (got.softmax(-1) - ref.softmax(-1)).abs().sum(-1).max().item() < 0.15
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


@pytest.mark.gpu
def test_cuda_fp32_greedy_matches_cpu(tiny_ckpt, tiny_model):
    gpu = load_model(tiny_ckpt, dtype=torch.float32, device="cuda")
    prompts = [[5, 6, 7] * 20, list(range(2, 140))]
    assert greedy_generate(gpu, prompts, 8) == greedy_generate(tiny_model, prompts, 8)
