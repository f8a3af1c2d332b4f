"""Process-group setup for one rank: the backend follows the device (gloo on CPU, NCCL on CUDA).

Public API:
    backend_for(device) -> "gloo" | "nccl"
    rank_device(rank, device) -> torch.device     (CUDA: cuda:{rank % device_count})
    init_process_group(rank, world_size, master_addr, master_port, device, timeout_s=600.0) -> torch.device
    destroy_process_group()                        (no-op when no group is initialised)

Callers never name a backend; nothing above ``comm`` knows whether gloo or NCCL carries the bytes.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist


def _device_type(device: str | torch.device) -> str:
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device (use 'cpu' or 'cuda')") from e


def backend_for(device: str | torch.device) -> str:
    """The torch.distributed backend for ``device``: gloo for CPU, NCCL for CUDA."""
    kind = _device_type(device)
    if kind == "cpu":
        return "gloo"
    if kind == "cuda":
        return "nccl"
    raise ValueError(f"device {device!r}: expert parallelism supports only 'cpu' (gloo) and 'cuda' (NCCL)")


def rank_device(rank: int, device: str | torch.device) -> torch.device:
    """The device this rank computes on: CPU for every rank, or one CUDA device per rank (round-robin)."""
    kind = _device_type(device)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available in this process")
        return torch.device("cuda", rank % torch.cuda.device_count())
    backend_for(device)  # raises the unsupported-device error
    raise AssertionError("unreachable")


def init_process_group(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device: str | torch.device,
    timeout_s: float = 600.0,
) -> torch.device:
    """Join the default process group over TCP and return this rank's compute device.

    ``timeout_s`` bounds every collective, so a rank whose peer died fails instead of hanging forever.
    Rank 0 hosts torch.distributed's TCPStore on a socket bound to ``master_addr`` only (torch's own store
    would listen on every interface of the machine); the other ranks connect to it there.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    if not 0 < int(master_port) < 65536:
        raise ValueError(f"master_port {master_port} is not a TCP port")
    backend = backend_for(device)
    dev = rank_device(rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = rendezvous_store(rank, world_size, master_addr, int(master_port), timeout)
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        **({"device_id": dev} if dev.type == "cuda" else {}),
    )
    return dev


def rendezvous_store(rank: int, world_size: int, master_addr: str, master_port: int,
                     timeout: datetime.timedelta) -> dist.TCPStore:
    """The process group's TCPStore: rank 0 serves it on a socket bound to (master_addr, master_port) only."""
    if rank != 0:
        return dist.TCPStore(master_addr, master_port, world_size, False, timeout=timeout)
    try:
        sock = socket.create_server((master_addr, master_port))
    except OSError as e:
        raise RuntimeError(f"rank 0 cannot listen for the process group on {master_addr}:{master_port}: {e}") from e
    # The store takes the listening socket over (and closes it with the store).
    return dist.TCPStore(master_addr, master_port, world_size, True, timeout=timeout, master_listen_fd=sock.detach())


def destroy_process_group() -> None:
    """Leave the default process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
