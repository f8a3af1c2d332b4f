"""Cache sizes against v4-model.md §2.7 and the page / plan arithmetic."""

from __future__ import annotations

import dataclasses

import pytest

from engine.cache.accounting import (
    CacheBreakdown,
    bytes_per_token,
    indexer_entry_bytes,
    kv_entry_bytes,
    page_bytes,
    plan_cache,
    sequence_cache_bytes,
    slot_bytes,
    snapshot_bytes,
)
from engine.model.config import SMALL, TINY, V4_FLASH, V4_PRO

GiB, MiB, KiB = 2**30, 2**20, 2**10
ONE_M = 1_048_576


def test_pro_bf16_at_1m_matches_section_2_7():
    b = sequence_cache_bytes(V4_PRO, ONE_M)
    assert b.csa_main == 30 * 256 * MiB
    assert b.csa_indexer == 30 * 64 * MiB
    assert b.hca == 31 * 8 * MiB
    assert b.window == 62 * 128 * 512 * 2  # 61 layers + MTP, 128 KiB each
    assert b.kv == 30 * (256 + 64) * MiB + 31 * 8 * MiB + 62 * 128 * KiB
    assert round(b.kv / GiB, 3) == 9.625
    # Compressor state: 30 CSA x (64 KiB main + 16 KiB indexer) + 31 HCA x 512 KiB, float32.
    assert b.compressor_state == 30 * (64 + 16) * KiB + 31 * 512 * KiB
    assert b.total == b.kv + b.compressor_state
    d = b.to_dict()
    assert d["kv"] == b.kv and d["total"] == b.total and d["window"] == b.window
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.window = 0  # type: ignore[misc]


def test_flash_bf16_at_1m():
    b = sequence_cache_bytes(V4_FLASH, ONE_M)
    assert b.csa_main == 21 * 256 * MiB and b.hca == 20 * 8 * MiB
    assert b.window == 44 * 128 * KiB
    assert round(b.kv / GiB, 2) == 6.72


def test_include_mtp_only_changes_the_mtp_window():
    with_mtp = sequence_cache_bytes(V4_PRO, ONE_M)
    without = sequence_cache_bytes(V4_PRO, ONE_M, include_mtp=False)
    assert with_mtp.window - without.window == 128 * 512 * 2
    assert with_mtp.compressed == without.compressed
    assert with_mtp.compressor_state == without.compressor_state  # the MTP layer is SWA-only


def test_fp8_ds_mla_pro():
    assert kv_entry_bytes(V4_PRO, "fp8_ds_mla") == 584
    b = sequence_cache_bytes(V4_PRO, ONE_M, "fp8_ds_mla")
    assert b.csa_indexer == 30 * (ONE_M // 4) * (128 + 8)  # indexer keys in FP8: 128 e4m3 + 2 scales padded to 8
    assert b.attention_kv == b.kv - b.csa_indexer
    assert round(b.attention_kv / GiB, 2) == 4.42
    # fp8 for other head dims: 48 FP8 + 16 BF16 RoPE + 1 scale padded to 8.
    assert kv_entry_bytes(TINY, "fp8_ds_mla") == 48 + 32 + 8
    assert indexer_entry_bytes(TINY, "fp8_ds_mla") == 32 + 8
    assert indexer_entry_bytes(V4_PRO, "fp8_ds_mla") == 136


def test_float32_doubles_bf16():
    bf = sequence_cache_bytes(V4_PRO, 4096)
    f32 = sequence_cache_bytes(V4_PRO, 4096, "float32")
    assert f32.kv == 2 * bf.kv
    assert f32.compressor_state == bf.compressor_state  # always float32


def test_partial_windows_are_not_compressed():
    b = sequence_cache_bytes(TINY, 130)  # CSA: 32 entries; HCA: 1 entry
    assert b.csa_main == 2 * 32 * 64 * 2
    assert b.csa_indexer == 2 * 32 * 32 * 2
    assert b.hca == 1 * 1 * 64 * 2
    assert sequence_cache_bytes(TINY, 0).compressed == 0


@pytest.mark.parametrize("cfg", [V4_PRO, V4_FLASH, TINY])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "fp8_ds_mla"])
def test_per_token_matches_per_sequence(cfg, dtype):
    per_tok = bytes_per_token(cfg, dtype)
    n = 128 * 10_000
    b = sequence_cache_bytes(cfg, n, dtype)
    assert per_tok["csa_main"] * n == b.csa_main
    assert per_tok["csa_indexer"] * n == b.csa_indexer
    assert per_tok["hca"] * n == b.hca
    assert per_tok["compressed"] * n == b.compressed
    # At large context the O(1) parts vanish per token.
    big = sequence_cache_bytes(cfg, 2**24, dtype)
    assert big.total / 2**24 == pytest.approx(per_tok["compressed"], rel=1e-3)


def test_slot_bytes():
    b = sequence_cache_bytes(V4_PRO, 12345)
    assert slot_bytes(V4_PRO) == b.window + b.compressor_state
    assert slot_bytes(V4_PRO, "fp8_ds_mla") == 62 * 128 * 584 + b.compressor_state


def test_page_bytes_tiny_by_hand():
    # TINY: 5 layers (0, 4, 128, 4, 0), head_dim 64, index_head_dim 32, window 128.
    compressed = 2 * (128 // 4) * (64 * 2 + 32 * 2) + 1 * 1 * 64 * 2
    assert page_bytes(TINY, 128, with_snapshot=False) == compressed
    snap = 5 * 127 * 64 * 2 + 2 * 4 * 2 * 4 * (2 * 64 + 2 * 32)
    assert snapshot_bytes(TINY) == snap
    assert page_bytes(TINY, 128) == compressed + snap
    assert page_bytes(TINY, 256, with_snapshot=False) == 2 * compressed


def test_page_bytes_pro():
    p = page_bytes(V4_PRO, 256, with_snapshot=False)
    assert p == sequence_cache_bytes(V4_PRO, 256).compressed
    assert p == 256 * bytes_per_token(V4_PRO)["compressed"]
    snap = 62 * 127 * 1024 + 30 * 4 * 2 * 4 * (1024 + 256)
    assert page_bytes(V4_PRO, 256) == p + snap


@pytest.mark.parametrize("bad", [0, -128, 64, 100, 130, 1.5, True])
def test_page_tokens_must_be_multiple_of_ratios(bad):
    with pytest.raises(ValueError, match="page_tokens"):
        page_bytes(V4_PRO, bad)


def test_page_tokens_without_hca():
    cfg = dataclasses.replace(TINY, compress_ratios=(0, 4, 4, 4, 0))
    assert page_bytes(cfg, 4, with_snapshot=False) == 3 * (64 * 2 + 32 * 2)
    with pytest.raises(ValueError, match="page_tokens"):
        page_bytes(cfg, 6)


def test_plan_cache_arithmetic():
    p = page_bytes(SMALL, 256)
    s = slot_bytes(SMALL)
    budget = 8 * s + 10 * p + p - 1
    plan = plan_cache(SMALL, budget, 256, 8)
    assert plan.num_pages == 10
    assert plan.page_bytes == p and plan.slot_bytes == s and plan.max_num_seqs == 8
    assert plan.tokens_capacity == 10 * 256
    assert plan.bytes_used == 8 * s + 10 * p <= budget
    exact = plan_cache(SMALL, 8 * s + p, 256, 8)
    assert exact.num_pages == 1


def test_plan_cache_pro_fp8():
    plan = plan_cache(V4_PRO, 60 * GiB, 256, 64, cache_dtype="fp8_ds_mla", with_snapshot=False)
    assert plan.bytes_used <= 60 * GiB < plan.bytes_used + plan.page_bytes
    assert plan.page_bytes == page_bytes(V4_PRO, 256, "fp8_ds_mla", with_snapshot=False)


def test_plan_cache_too_small():
    s, p = slot_bytes(TINY), page_bytes(TINY, 128)
    with pytest.raises(ValueError) as e:
        plan_cache(TINY, 4 * s + p - 1, 128, 4)
    msg = str(e.value)
    assert str(4 * s + p - 1) in msg and str(s) in msg and str(p) in msg and str(4 * s + p) in msg
    with pytest.raises(ValueError, match="cannot hold"):
        plan_cache(TINY, 0, 128, 1)
    with pytest.raises(ValueError, match="max_num_seqs"):
        plan_cache(TINY, 10**9, 128, 0)
    with pytest.raises(ValueError, match="page_tokens"):
        plan_cache(TINY, 10**9, 100, 1)


def test_bad_args():
    with pytest.raises(ValueError, match="cache_dtype"):
        sequence_cache_bytes(V4_PRO, 10, "fp16")
    with pytest.raises(ValueError, match="context_len"):
        sequence_cache_bytes(V4_PRO, -1)
    assert isinstance(sequence_cache_bytes(V4_PRO, 1), CacheBreakdown)
