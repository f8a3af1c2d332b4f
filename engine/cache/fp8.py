"""The FP8 KV cache layout (`kv_cache.dtype: fp8`, accounting name "fp8_ds_mla"; v4-model.md §2.7, §2.8).

One cache entry of `dim` values, whose trailing `rope` values carry RoPE, is stored as `entry_bytes` bytes:

    [0, nope)                     the nope = dim - rope leading values in float8 e4m3fn, one byte each
    [nope, nope + scale_bytes)    one UE8M0 scale byte per SCALE_BLOCK of them (value 2^(byte - 127)),
                                  zero-padded to a multiple of SCALE_ALIGN bytes
    [nope + scale_bytes, end)     the rope trailing values in bfloat16, two bytes each

At the V4 shape (head_dim 512, rope 64) that is 448 + 8 + 128 = 584 B, vLLM's `fp8_ds_mla` entry. The
quantization is the reference's QAT simulation (`act_quant` with block 64 and UE8M0 scales, §2.3/§2.4): per
block, scale = 2^ceil(log2(amax / 448)) with amax at least 1e-4, value = clamp(x / scale, +-448) in e4m3fn.
Indexer keys use the same layout with rope = 0: all `index_head_dim` values in FP8 (136 B at 128).

`qdq` is the quantize-dequantize round trip, for the sliding-window KV, which the reference also quantizes
before caching (§2.8 `fp8_qdq(kv[..., :448])`): the window holds exactly the values an entry would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.cache.accounting import FP8_SCALE_BLOCK as SCALE_BLOCK
from engine.cache.accounting import fp8_entry_bytes

FP8_MAX = 448.0  # largest finite e4m3fn value
_AMAX_MIN = 1e-4  # the reference's floor on a block's amax


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (e4m3fn values [..., n], UE8M0 scale exponents as uint8 bytes [..., ceil(n / 64)])."""
    n = x.shape[-1]
    nb = -(-n // SCALE_BLOCK)
    xf = x.float()
    if nb * SCALE_BLOCK != n:
        xf = torch.nn.functional.pad(xf, (0, nb * SCALE_BLOCK - n))
    xb = xf.unflatten(-1, (nb, SCALE_BLOCK))
    amax = xb.abs().amax(dim=-1).clamp(min=_AMAX_MIN)
    exp = torch.ceil(torch.log2(amax / FP8_MAX)).clamp(-127, 127)  # scale = 2^exp >= amax / 448
    q = (xb * torch.exp2(-exp)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2)[..., :n], (exp + 127).to(torch.uint8)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`quantize_blocks`' output -> float32 values [..., n]."""
    n, nb = q.shape[-1], scale.shape[-1]
    if nb != -(-n // SCALE_BLOCK):
        raise ValueError(f"{nb} scales for {n} values (one per {SCALE_BLOCK})")
    s = torch.exp2(scale.float() - 127)[..., None].expand(*scale.shape, SCALE_BLOCK).flatten(-2)[..., :n]
    return q.float() * s


@dataclass(frozen=True)
class FP8EntryCodec:
    """Packs entries of `dim` values (the last `rope` in bfloat16) into `entry_bytes` uint8; unpacks to `dtype`."""

    dim: int
    rope: int
    dtype: torch.dtype  # what `decode` returns: the model's compute dtype

    @property
    def nope(self) -> int:
        return self.dim - self.rope

    @property
    def entry_bytes(self) -> int:
        return fp8_entry_bytes(self.dim, self.rope)

    @property
    def _scale_end(self) -> int:
        return self.entry_bytes - 2 * self.rope

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> uint8 [..., entry_bytes]."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"entries of {x.shape[-1]} values, the codec packs {self.dim}")
        out = torch.zeros(*x.shape[:-1], self.entry_bytes, dtype=torch.uint8, device=x.device)
        q, scale = quantize_blocks(x[..., :self.nope])
        out[..., :self.nope] = q.view(torch.uint8)
        out[..., self.nope:self.nope + scale.shape[-1]] = scale
        if self.rope:
            out[..., self._scale_end:] = x[..., self.nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
        return out

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        """uint8 [..., entry_bytes] -> [..., dim] in `dtype`."""
        if packed.shape[-1] != self.entry_bytes:
            raise ValueError(f"packed entries of {packed.shape[-1]} bytes, the codec's are {self.entry_bytes}")
        n_scales = -(-self.nope // SCALE_BLOCK)
        q = packed[..., :self.nope].contiguous().view(torch.float8_e4m3fn)
        nope = dequantize_blocks(q, packed[..., self.nope:self.nope + n_scales]).to(self.dtype)
        if not self.rope:
            return nope
        rope = packed[..., self._scale_end:].contiguous().view(torch.bfloat16).to(self.dtype)
        return torch.cat([nope, rope], dim=-1)

    def qdq(self, x: torch.Tensor) -> torch.Tensor:
        """What an entry `x` reads back as after a round trip through the layout, in x's dtype (`decode(encode(x))`
        without the packing)."""
        q, scale = quantize_blocks(x[..., :self.nope])
        nope = dequantize_blocks(q, scale).to(x.dtype)
        return torch.cat([nope, x[..., self.nope:].to(torch.bfloat16).to(x.dtype)], dim=-1)


@dataclass(frozen=True)
class CastEntryCodec:
    """The codec interface for a cache kept in another float dtype than the model computes in (a bfloat16
    cache under a float32 model): entries are cast to `store` on write and back to `dtype` on read."""

    dim: int
    store: torch.dtype
    dtype: torch.dtype

    @property
    def entry_bytes(self) -> int:
        return self.dim * self.store.itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.store)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(self.dtype)

    def qdq(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.store).to(x.dtype)
