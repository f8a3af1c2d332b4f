"""Build a `Transformer` from a checkpoint directory (official or transformers-renamed layout)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch

from engine.model.model import Transformer
from engine.model.moe import EPContext
from engine.weights.checkpoint import open_checkpoint


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               experts: Collection[int] | None = None, ep: EPContext | None = None) -> Transformer:
    """Validate the checkpoint against its manifest, then stream its tensors into a new model.

    `experts`: the routed experts to load (a rank loads only its own); None loads all.
    `ep`: build an expert-parallel model (engine.model.model docstring); only the experts of this rank's slots
    are read, per layer. Give `experts` or `ep`, not both.
    Raises `engine.weights.checkpoint.CheckpointError` naming every bad tensor before anything is loaded.
    """
    if ep is not None and experts is not None:
        raise ValueError("pass either experts or ep (the placement decides the experts), not both")
    ckpt = open_checkpoint(path)
    ckpt.validate(experts=experts if ep is None else ep.placement.local_experts(ep.ep_rank))
    with torch.device(device):
        model = Transformer(ckpt.config, dtype=dtype, local_experts=None if experts is None else sorted(experts),
                            with_mtp=ckpt.has_mtp, ep=ep)
    if ep is not None:
        experts = model.experts_per_layer()
    model.load_weights(ckpt.iter_weights(dtype=dtype, device=device, experts=experts))
    return model.eval()
