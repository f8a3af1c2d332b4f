"""Do a topology's ranks fit their devices? Checked by `megaserve up` before any actor starts.

Each rank's weight bytes come from the one accounting (engine/weights/resident.py, `topology_rank_bytes`, the
layout `megaserve plan` prints); what a rank may use is its GPU's HBM (the node's accelerator profile), or on a
one-node CPU topology this machine's available memory shared by its ranks. Nodes whose memory cannot be known
from here (a CUDA node without an accelerator profile, CPU nodes of a multi-node topology) are not checked.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cluster.topology import Topology
from engine.weights.resident import format_bytes, topology_rank_bytes


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo, else the physical memory (sysconf)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def effective_weights_mode(topo: Topology) -> str:
    """The topology's `model.weights`; an unquantized checkpoint is held dequantized whatever it says."""
    mode = topo.model.weights
    path = topo.model.path
    if mode == "native" and path is not None and (path / "config.json").is_file():
        from engine.model.weight_format import DENSE
        from engine.weights.checkpoint import CheckpointError, open_checkpoint

        try:
            if open_checkpoint(path).native_formats() is DENSE:
                return "dequantized"
        except CheckpointError:
            return mode  # the ranks report the checkpoint's problems when they load it
    return mode


def weights_fit_problem(topo: Topology) -> str | None:
    """None when every checked rank's weights fit its memory, else one line naming the first rank that does not,
    the bytes it needs and the bytes available."""
    from cluster.plan.hardware import get_hardware

    cfg = topo.model_config()
    mode = effective_weights_mode(topo)
    need = topology_rank_bytes(cfg, mode, getattr(torch, topo.model.dtype), topo.world_size,
                               topo.parallel.placement.redundant_experts).total
    rank = 0
    for node in topo.nodes:
        avail, what = None, ""
        if node.device == "cuda" and node.accelerator is not None:
            avail, what = int(get_hardware(node.accelerator).hbm_bytes), f"HBM of a {node.accelerator}"
        elif node.device == "cpu" and len(topo.nodes) == 1:
            avail, what = host_available_bytes() // node.ranks, f"this host's available memory / {node.ranks} ranks"
        if avail is not None and need > avail:
            return (f"{topo.source}: rank {rank} (node {node.name}) does not fit: its weights ({mode}) need "
                    f"{need:,} bytes ({format_bytes(need)}), {avail:,} bytes available ({what}); add ranks "
                    f"(fewer expert slots each) or use larger devices")
        rank += node.ranks
    return None
