"""Shared fixtures: tiny random checkpoints written in the official layout, and models loaded from them."""

from __future__ import annotations

import os

import pytest
import torch

# Triton picks its CPU interpreter when triton.language is first imported (transformers imports triton during
# collection), so it is chosen here, before any test module: without CUDA the Triton kernel tests
# (tests/test_triton_kernels.py) run under TRITON_INTERPRET=1; with CUDA they run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.model.config import TINY, ModelConfig


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def _write(tmp_path_factory, cfg: ModelConfig, name: str, seed: int):
    from engine.weights.make_checkpoint import write_checkpoint

    out = tmp_path_factory.mktemp(name)
    write_checkpoint(cfg, out, seed=seed)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return _write(tmp_path_factory, TINY, "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from engine.weights.loader import load_model

    return load_model(tiny_ckpt, dtype=torch.float32)
