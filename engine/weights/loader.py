"""Build a `Transformer` from a checkpoint directory (official or transformers-renamed layout)."""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

import torch

from engine.model.model import Transformer
from engine.model.moe import EPContext
from engine.model.weight_format import DENSE, check_mode
from engine.weights.checkpoint import open_checkpoint

log = logging.getLogger(__name__)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               experts: Collection[int] | None = None, ep: EPContext | None = None,
               weights: str = "native") -> Transformer:
    """Validate the checkpoint against its manifest, then stream its tensors into a new model.

    `weights`: "native" (default) keeps the checkpoint's precision in memory (FP8 linears, MXFP4 experts,
    BF16 tensors; `Checkpoint.native_formats`), "dequantized" holds every weight in `dtype` (the reference;
    what an unquantized checkpoint loads as either way). `device="meta"` builds the model without data.

    `experts`: the routed experts to load (a rank loads only its own); None loads all.
    `ep`: build an expert-parallel model (engine.model.model docstring); only the experts of this rank's slots
    are read, per layer. Give `experts` or `ep`, not both.
    Raises `engine.weights.checkpoint.CheckpointError` naming every bad tensor before anything is loaded.
    """
    if ep is not None and experts is not None:
        raise ValueError("pass either experts or ep (the placement decides the experts), not both")
    ckpt = open_checkpoint(path)
    ckpt.validate(experts=experts if ep is None else ep.placement.local_experts(ep.ep_rank))
    formats = ckpt.native_formats() if check_mode(weights) == "native" else DENSE
    if weights == "native" and formats is DENSE:
        log.info("%s: unquantized checkpoint: weights held in %s (native = dequantized here)", ckpt.path, dtype)
    with torch.device(device):
        model = Transformer(ckpt.config, dtype=dtype, local_experts=None if experts is None else sorted(experts),
                            with_mtp=ckpt.has_mtp, ep=ep, weights=formats)
    if torch.device(device).type == "meta":
        return model.eval()
    if ep is not None:
        experts = model.experts_per_layer()
    model.load_weights(ckpt.iter_weights(dtype=dtype, device=device, experts=experts, native=formats is not DENSE))
    return model.eval()
