"""Checkpoint number formats (v4-model.md §4.3): FP8 e4m3 with 128x128 UE8M0 block scales, MXFP4 (e2m1).

Pure torch and device-agnostic. Power-of-two scales are stored as `torch.float8_e8m0fnu`, whose byte b
means 2^(b-127) (255 is NaN). Both dequantizers compute in float32; a dequantized value is an e4m3 or e2m1
value times a power of two, so it is exact in bfloat16 and float32 alike.

Scale choice (both formats): the smallest power of two s with amax / s <= max_finite (448 for e4m3,
6 for e2m1), i.e. s = 2^ceil(log2(amax / max_finite)), exponent clamped to [-127, 127]. A block or group
whose values are all zero gets s = 1 (byte 127).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest e2m1 magnitude
FP4_GROUP = 32  # MXFP4: one scale per 32 values along K
E8M0_BIAS = 127

# e2m1 magnitudes of nibble codes 0..7; bit 3 is the sign (codes 8..15 are the negatives).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding thresholds between consecutive magnitudes; ties go to the even code (IEEE round-half-even):
# 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0.
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


# ---- UE8M0 scales ------------------------------------------------------------------------------
def e8m0_to_float(scale: Tensor) -> Tensor:
    """Decode E8M0 scales (float8_e8m0fnu or their uint8 bytes) to float32, any shape.

    Built from the exponent byte as float32 bits, so it needs no float8 cast support on the device.
    """
    b = scale.view(torch.uint8).to(torch.int32)
    bits = torch.where(b > 0, b << 23, torch.full_like(b, 1 << 22))  # byte 0 is 2^-127, a subnormal
    bits = torch.where(b == 255, torch.full_like(b, 0x7FC00000), bits)  # NaN
    return bits.view(torch.float32)


def _e8m0_from_exponent(exp: Tensor) -> Tensor:
    """int exponents in [-127, 127] -> float8_e8m0fnu scales 2^exp."""
    return (exp + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)


def _pow2_exponent(amax: Tensor, max_value: float) -> Tensor:
    """Smallest integer e with amax <= max_value * 2^e (int32, clamped to [-127, 127]); 0 where amax == 0."""
    amax = amax.float()
    _, e = torch.frexp(amax / max_value)  # amax / max = m * 2^e, m in [0.5, 1): ceil(log2) is e or e - 1
    e = e.to(torch.int32) - 1
    e = e + (amax > max_value * torch.ldexp(torch.ones_like(amax), e)).to(torch.int32)  # exact power-of-2 test
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    return e.clamp(-E8M0_BIAS, E8M0_BIAS)


def _pow2(exp: Tensor) -> Tensor:
    return e8m0_to_float(_e8m0_from_exponent(exp))


# ---- FP8 e4m3, 128x128 blocks --------------------------------------------------------------------
def quantize_fp8_block(w: Tensor, block: int = 128) -> tuple[Tensor, Tensor]:
    """w [N, K] float -> (float8_e4m3fn [N, K], float8_e8m0fnu scale [ceil(N/block), ceil(K/block)]).

    scale[i, j] covers rows i*block..(i+1)*block-1 and columns j*block..(j+1)*block-1; w ≈ q * scale.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8_block expects a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    x = w.float()
    padded = F.pad(x.abs(), (0, kb * block - k, 0, nb * block - n))
    amax = padded.view(nb, block, kb, block).amax(dim=(1, 3))  # [nb, kb]
    exp = _pow2_exponent(amax, FP8_MAX)
    q = (x / _expand_blocks(_pow2(exp), block, n, k)).to(torch.float8_e4m3fn)
    return q, _e8m0_from_exponent(exp)


def dequantize_fp8_block(w: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """float8_e4m3fn [N, K] and scale [ceil(N/b), ceil(K/b)] (E8M0 or float) -> [N, K] in dtype.

    The block size b is inferred from the shapes (128 in the checkpoint).
    """
    n, k = w.shape
    block = _block_size(n, k, scale.shape)
    s = e8m0_to_float(scale) if scale.dtype in (torch.float8_e8m0fnu, torch.uint8) else scale.float()
    return (w.float() * _expand_blocks(s, block, n, k)).to(dtype)


def _block_size(n: int, k: int, scale_shape: torch.Size) -> int:
    for block in (128, 64, 32, 256, 512):
        if tuple(scale_shape) == (-(-n // block), -(-k // block)):
            return block
    raise ValueError(f"scale shape {tuple(scale_shape)} matches no square block size for a [{n}, {k}] weight")


def _expand_blocks(s: Tensor, block: int, n: int, k: int) -> Tensor:
    """[nb, kb] per-block values -> [n, k] per-element values."""
    return s.repeat_interleave(block, dim=0)[:n].repeat_interleave(block, dim=1)[:, :k]


# ---- MXFP4 (e2m1), groups of 32 along K -------------------------------------------------------------
def pack_fp4_codes(codes: Tensor) -> Tensor:
    """uint8 nibble codes [..., K] (values 0..15) -> int8 [..., K/2]; element 2k low nibble, 2k+1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dim, got {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4_codes(packed: Tensor) -> Tensor:
    """int8 (or uint8) [..., K/2] -> uint8 nibble codes [..., K]."""
    b = packed.view(torch.uint8)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)


def fp4_codes_to_float(codes: Tensor) -> Tensor:
    """uint8 nibble codes [...] -> their e2m1 values as float32 [...].

    Arithmetic, not a table lookup (gather is slow on CPU): for magnitude code m = 2e + mant,
    4 * value = (2 + mant) << e when e > 0, else 2 * mant (subnormal).
    """
    c = codes.to(torch.int32)
    e, mant = (c >> 1) & 3, c & 1
    quarters = torch.where(e > 0, (2 + mant) << e, 2 * mant)
    return torch.where(c >= 8, -quarters, quarters).float() * 0.25


def float_to_fp4_codes(x: Tensor) -> Tensor:
    """float [...] (already divided by its scale) -> nearest e2m1 nibble codes uint8 [...].

    Ties round to the even code; |x| > 6 saturates to 6; zero magnitude is code 0 (never -0).
    """
    a = x.float().abs()
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for i, mid in enumerate(_FP4_MIDPOINTS):
        code += (a > mid) if i % 2 == 0 else (a >= mid)  # code i even: tie stays at i; odd: tie goes up
    return code | ((x < 0) & (code > 0)).to(torch.uint8) << 3


def quantize_fp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., N, K] float (K % 32 == 0) -> (packed int8 [..., N, K/2], float8_e8m0fnu scale [..., N, K/32])."""
    k = w.shape[-1]
    if k % FP4_GROUP:
        raise ValueError(f"MXFP4 needs K divisible by {FP4_GROUP}, got shape {tuple(w.shape)}")
    x = w.float().unflatten(-1, (k // FP4_GROUP, FP4_GROUP))  # [..., N, K/32, 32]
    exp = _pow2_exponent(x.abs().amax(dim=-1), FP4_MAX)  # [..., N, K/32]
    codes = float_to_fp4_codes(x / _pow2(exp).unsqueeze(-1)).flatten(-2)
    return pack_fp4_codes(codes), _e8m0_from_exponent(exp)


def dequantize_fp4(packed: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """packed int8 [..., N, K/2] and E8M0 scale [..., N, K/32] -> [..., N, K] in dtype."""
    vals = fp4_codes_to_float(unpack_fp4_codes(packed))  # [..., N, K]
    group = vals.shape[-1] // scale.shape[-1]
    s = e8m0_to_float(scale) if scale.dtype in (torch.float8_e8m0fnu, torch.uint8) else scale.float()
    return (vals * s.repeat_interleave(group, dim=-1)).to(dtype)
