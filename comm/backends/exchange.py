"""Building blocks shared by the dispatch/combine backends: routing plan, row packing, all-to-all exchanges.

A *plan* orders this rank's (token, k) assignments by (chunk, destination rank), where a chunk is a unit
of pipelining (one for ``sync``, a micro-batch for ``tbo``, a wave of local expert slots for ``wave``).
Every chunk is one variable-size ``all_to_all_single`` each way. Dispatch rows carry the token's hidden
state, the destination's local slot (int32) and the routing weight (float32), packed into one uint8 row
so a chunk needs one collective whatever the activation dtype; combine rows carry the expert output.

gloo (torch 2.13) implements ``all_to_all_single`` with uneven splits, zero-row splits and ``async_op=True``,
so no isend/irecv emulation is needed; NCCL does too. With ``ep_size == 1`` and no process group the
exchange is a local copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

META_BYTES = 8  # int32 slot + float32 weight per dispatched row


@dataclass
class Plan:
    """This rank's assignments in send order: chunk-major, destination rank within a chunk."""

    tok: Tensor  # [N] index of the source token in the rank's batch
    slot: Tensor  # [N] local slot on the destination rank
    weight: Tensor  # [N] routing weight (float32)
    send: Tensor  # [C, ep_size] rows sent to each rank per chunk (int64, CPU)


def make_plan(phys: Tensor, topk_weights: Tensor, chunk: Tensor, num_chunks: int, slots_per_rank: int,
              ep_size: int) -> Plan:
    """``phys [T, k]`` physical slots, ``chunk [T, k]`` chunk id of each assignment -> Plan."""
    k = phys.shape[1] if phys.dim() == 2 else 1
    phys = phys.reshape(-1)
    dest = torch.div(phys, slots_per_rank, rounding_mode="floor")
    key = chunk.reshape(-1) * ep_size + dest
    order = torch.argsort(key, stable=True)
    send = torch.bincount(key, minlength=num_chunks * ep_size).view(num_chunks, ep_size).cpu()
    return Plan(tok=torch.div(order, k, rounding_mode="floor"), slot=(phys % slots_per_rank)[order],
                weight=topk_weights.reshape(-1)[order].float(), send=send)


def pack_dispatch(x: Tensor, slot: Tensor, weight: Tensor) -> Tensor:
    """Rows [N, D] + slot [N] + weight [N] -> uint8 [N, D*itemsize + 8]."""
    n = x.shape[0]
    xb = x.contiguous().view(torch.uint8)  # [N, D*itemsize]
    sb = slot.to(torch.int32).contiguous().view(torch.uint8).reshape(n, 4)
    wb = weight.to(torch.float32).contiguous().view(torch.uint8).reshape(n, 4)
    return torch.cat([xb, sb, wb], dim=1)


def unpack_dispatch(buf: Tensor, dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of pack_dispatch: (x [N, D] dtype, slot [N] int64, weight [N] float32)."""
    n = buf.shape[0]
    xbytes = buf.shape[1] - META_BYTES
    if xbytes != dim * dtype.itemsize:
        raise ValueError(f"dispatch rows carry {xbytes} activation bytes, expected {dim} x {dtype} "
                         "(do all ranks run the model in the same dtype?)")
    x = buf[:, :xbytes].contiguous().view(dtype)
    slot = buf[:, xbytes:xbytes + 4].contiguous().view(torch.int32).reshape(n).long()
    weight = buf[:, xbytes + 4:].contiguous().view(torch.float32).reshape(n)
    return x, slot, weight


def as_bytes(y: Tensor) -> Tensor:
    """[N, D] -> uint8 [N, D*itemsize] (a view when contiguous)."""
    return y.contiguous().view(torch.uint8)


def from_bytes(buf: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """uint8 [N, D*itemsize] -> [N, D] of dtype."""
    out = buf.contiguous().view(dtype)
    if out.shape[1] != dim:
        raise ValueError(f"combine rows hold {out.shape[1]} values, expected {dim}")
    return out


class _Done:
    def wait(self) -> bool:
        return True


class Exchange:
    """All-to-all on one group with byte/collective accounting; ``stats`` is a comm.dispatch.DispatchStats."""

    def __init__(self, group, ep_rank: int, ep_size: int, stats) -> None:
        self.group, self.ep_rank, self.ep_size, self.stats = group, ep_rank, ep_size, stats

    def _local(self) -> bool:
        return self.ep_size == 1 and not (dist.is_available() and dist.is_initialized())

    def counts(self, send: Tensor, device: torch.device) -> Tensor:
        """send [C, ep_size] rows this rank sends -> recv [C, ep_size] rows it receives from each rank."""
        c = send.shape[0]
        buf = send.t().contiguous().to(device)  # [ep_size, C]: C numbers for each destination
        self._account([c] * self.ep_size, [c] * self.ep_size, row_bytes=8)
        if self._local():
            return send.clone()
        out = torch.empty_like(buf)
        dist.all_to_all_single(out, buf, group=self.group)
        return out.cpu().t().contiguous()  # [C, ep_size]: from each source rank

    def start(self, rows: Tensor, send_splits: list[int], recv_splits: list[int], async_op: bool):
        """Launch a variable-size all_to_all of uint8 rows; returns (recv_rows, handle with .wait())."""
        out = rows.new_empty((sum(recv_splits), rows.shape[1]))
        self._account(send_splits, recv_splits, row_bytes=rows.shape[1])
        if self._local():
            out.copy_(rows)
            return out, _Done()
        work = dist.all_to_all_single(out, rows, recv_splits, send_splits, group=self.group, async_op=async_op)
        return out, (work if async_op else _Done())

    def wait(self, handle) -> None:
        t0 = time.perf_counter()
        handle.wait()
        self.stats.wait_s += time.perf_counter() - t0

    def _account(self, send_splits: list[int], recv_splits: list[int], row_bytes: int) -> None:
        st = self.stats
        st.collectives += 1
        st.bytes_sent += sum(send_splits) * row_bytes
        st.bytes_recv += sum(recv_splits) * row_bytes
        st.bytes_sent_remote += (sum(send_splits) - send_splits[self.ep_rank]) * row_bytes
        st.bytes_recv_remote += (sum(recv_splits) - recv_splits[self.ep_rank]) * row_bytes
