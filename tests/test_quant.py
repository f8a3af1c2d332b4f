"""engine/weights/formats.py: byte layouts of FP8/MXFP4 weights and their E8M0 scales, and round trips."""

import pytest
import torch

from engine.weights.formats import (
    FP4_VALUES,
    dequantize_fp4,
    dequantize_fp8_block,
    e8m0_to_float,
    float_to_fp4_codes,
    fp4_codes_to_float,
    pack_fp4_codes,
    quantize_fp4,
    quantize_fp8_block,
    unpack_fp4_codes,
)


def e8m0(*exponents: int) -> torch.Tensor:
    return torch.tensor([e + 127 for e in exponents], dtype=torch.uint8).view(torch.float8_e8m0fnu)


def test_e8m0_decoding_by_byte():
    b = torch.tensor([0, 1, 100, 126, 127, 128, 254, 255], dtype=torch.uint8)
    got = e8m0_to_float(b.view(torch.float8_e8m0fnu))
    want = [2.0**-127, 2.0**-126, 2.0**-27, 0.5, 1.0, 2.0, 2.0**127]
    assert got.dtype == torch.float32
    assert got[:7].tolist() == want
    assert torch.isnan(got[7])
    assert torch.equal(e8m0_to_float(b)[:7], got[:7])  # raw bytes decode the same


# ---- MXFP4 ------------------------------------------------------------------------------------
def test_fp4_nibble_order_and_sign():
    packed = torch.tensor([[0x21, 0x9A, 0x7F, 0x08]], dtype=torch.uint8).view(torch.int8)
    # 0x21: low 1 -> 0.5 (element 0), high 2 -> 1.0 (element 1)
    # 0x9A: low 0xA = sign|2 -> -1.0, high 0x9 = sign|1 -> -0.5
    # 0x7F: low 0xF = sign|7 -> -6.0, high 0x7 -> 6.0
    # 0x08: low 0x8 = -0.0, high 0 -> 0.0
    codes = unpack_fp4_codes(packed)
    assert codes.tolist() == [[1, 2, 10, 9, 15, 7, 8, 0]]
    assert fp4_codes_to_float(codes).tolist() == [[0.5, 1.0, -1.0, -0.5, -6.0, 6.0, -0.0, 0.0]]
    assert torch.equal(pack_fp4_codes(codes), packed)


def test_fp4_code_table():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = fp4_codes_to_float(codes).tolist()
    assert vals[:8] == list(FP4_VALUES)
    assert vals[8:] == [-v for v in FP4_VALUES]


def test_fp4_scale_layout_one_scale_per_32_along_k():
    n, k = 2, 64
    codes = torch.full((n, k), 2, dtype=torch.uint8)  # every value 1.0
    scale = e8m0(0, 3, -2, 5).view(n, k // 32)
    w = dequantize_fp4(pack_fp4_codes(codes), scale, torch.float32)
    assert w.shape == (n, k)
    assert (w[0, :32] == 1.0).all() and (w[0, 32:] == 8.0).all()
    assert (w[1, :32] == 0.25).all() and (w[1, 32:] == 32.0).all()


def test_fp4_rounding_ties_to_even_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 2.6, 7.0, -0.1, -0.3, -5.5])
    got = fp4_codes_to_float(float_to_fp4_codes(x)).tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 3.0, 6.0, 0.0, -0.5, -6.0]


def test_fp4_round_trip_exact_for_representable_values():
    g = torch.Generator().manual_seed(0)
    n, k = 8, 128
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    codes[:, ::32] = 7  # each group's amax is 6 -> the chosen scale is exactly the group's scale
    exps = torch.randint(-10, 10, (n, k // 32), generator=g)
    w = fp4_codes_to_float(codes) * torch.pow(2.0, exps.float()).repeat_interleave(32, dim=1)
    packed, scale = quantize_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (n, k // 2)
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (n, k // 32)
    assert torch.equal(e8m0_to_float(scale), torch.pow(2.0, exps.float()))
    assert torch.equal(dequantize_fp4(packed, scale, torch.float32), w)


def test_fp4_round_trip_error_bound_and_scale_choice():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 256, generator=g) * 3
    packed, scale = quantize_fp4(w)
    s = e8m0_to_float(scale)
    amax = w.abs().view(16, 8, 32).amax(-1)
    assert (amax / s <= 6).all() and (amax / s > 3).all()  # the smallest power of two that fits
    d = dequantize_fp4(packed, scale, torch.float32)
    # e2m1 spacing is at most 2 (between 4 and 6) -> error at most 1 * scale
    assert ((d - w).abs() <= s.repeat_interleave(32, dim=1) * 1.0).all()
    assert torch.equal(dequantize_fp4(packed, scale, torch.bfloat16).float(), d)  # exact in bf16


def test_fp4_batched_leading_dims_and_zero_group():
    w = torch.zeros(3, 4, 64)
    w[1, 2, 40] = -3.0
    packed, scale = quantize_fp4(w)
    assert packed.shape == (3, 4, 32) and scale.shape == (3, 4, 2)
    assert e8m0_to_float(scale)[0, 0, 0] == 1.0  # all-zero group: scale 1
    assert torch.equal(dequantize_fp4(packed, scale, torch.float32), w)


# ---- FP8 e4m3 block ------------------------------------------------------------------------------
def test_fp8_scale_layout_per_128x128_block():
    q = torch.ones(256, 384).to(torch.float8_e4m3fn)
    scale = e8m0(0, 1, 2, -1, -2, 4).view(2, 3)
    w = dequantize_fp8_block(q, scale, torch.float32)
    blocks = w.view(2, 128, 3, 128)
    for i in range(2):
        for j in range(3):
            assert (blocks[i, :, j] == e8m0_to_float(scale)[i, j]).all()


@pytest.mark.parametrize("shape", [(128, 256), (200, 300), (1, 5), (129, 127)])
def test_fp8_round_trip_relative_error(shape):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(*shape, generator=g) * 5
    q, scale = quantize_fp8_block(w)
    nb, kb = -(-shape[0] // 128), -(-shape[1] // 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (nb, kb)
    d = dequantize_fp8_block(q, scale, torch.float32)
    s = e8m0_to_float(scale).repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 for normals; absolute 2^-10 * scale for subnormals
    assert ((d - w).abs() <= torch.maximum(w.abs() / 16, s * 2.0**-10)).all()
    assert torch.equal(dequantize_fp8_block(q, scale, torch.bfloat16).float(), d)


def test_fp8_scale_choice_is_smallest_power_of_two():
    w = torch.zeros(130, 130)
    w[0, 0] = 448.0  # block (0,0): amax 448 -> scale 1
    w[0, 129] = 449.0  # block (0,1): just above -> scale 2
    w[129, 0] = 0.5  # block (1,0): 0.5/448 -> 2^-9 (0.5 / 2^-9 = 256 <= 448; 2^-10 would give 512)
    q, scale = quantize_fp8_block(w)
    assert e8m0_to_float(scale).tolist() == [[1.0, 2.0], [2.0**-9, 1.0]]  # zero block (1,1): scale 1
    assert dequantize_fp8_block(q, scale, torch.float32)[0, 0] == 448.0


def test_fp8_round_trip_exact_for_representable_values():
    g = torch.Generator().manual_seed(3)
    q0 = (torch.randn(256, 128, generator=g) * 50).to(torch.float8_e4m3fn)
    q0[0, 0] = 448.0
    q0[128, 0] = -448.0
    w = q0.float() * torch.tensor([[4.0], [0.125]]).repeat_interleave(128, 0)
    q, scale = quantize_fp8_block(w)
    assert e8m0_to_float(scale).flatten().tolist() == [4.0, 0.125]
    assert torch.equal(q.float(), q0.float())
    assert torch.equal(dequantize_fp8_block(q, scale, torch.float32), w)
