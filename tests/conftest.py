"""Shared fixtures: tiny random checkpoints written in the official layout, and models loaded from them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import TINY, ModelConfig

# A second parity config: another arrangement of layer kinds, one hash layer, a shorter window,
# more output groups, two shared experts' worth of width... everything tiny.
TINY_B = dataclasses.replace(
    TINY,
    num_hidden_layers=5,
    compress_ratios=(128, 4, 0, 4, 128, 0),
    num_hash_layers=1,
    sliding_window=32,
    o_groups=4,
    num_attention_heads=4,
    index_topk=4,
    n_routed_experts=12,
    num_experts_per_tok=3,
    routed_scaling_factor=2.5,
)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def _write(tmp_path_factory, cfg: ModelConfig, name: str, seed: int):
    from engine.make_checkpoint import write_checkpoint

    out = tmp_path_factory.mktemp(name)
    write_checkpoint(cfg, out, seed=seed)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return _write(tmp_path_factory, TINY, "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_b_ckpt(tmp_path_factory):
    return _write(tmp_path_factory, TINY_B, "tiny_b", seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from engine.loader import load_model

    return load_model(tiny_ckpt, dtype=torch.float32)
