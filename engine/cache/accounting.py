"""Sizes of the DeepSeek-V4 hybrid cache (v4-model.md §2.7): the one place the engine and the capacity
planner get them from.

What one layer caches, per its `compress_ratios` entry (MTP layers included unless `include_mtp=False`;
the engine keeps their windows):

- every layer: a sliding window of `sliding_window` KV entries of `head_dim` values (a per-sequence slot;
  the reference's `kv_cache[B, 128, 512]` ring);
- CSA (ratio 4): one compressed main entry of `head_dim` per 4 tokens, plus one indexer key of
  `index_head_dim` per 4 tokens (lives in pages);
- HCA (ratio 128): one compressed entry of `head_dim` per 128 tokens (lives in pages);
- the compressor state (per sequence, always float32), read off the reference buffers of §2.7:
  CSA main `kv_state` and `score_state`, each `[2*4, 2*head_dim]` (slots 0-3 = previous window,
  4-7 = current, overlap c = 2); CSA indexer the same with `index_head_dim`, each `[8, 2*index_head_dim]`;
  HCA `kv_state` and `score_state`, each `[128, head_dim]` (c = 1). SWA-only layers have none.

Only finished windows are compressed: a sequence of n tokens holds `n // ratio` entries per layer; the
tokens of the partial window live in the compressor state.

Cache dtypes (`cache_dtype`), for the window and the compressed entries:

- "bfloat16": 2 bytes per value; "float32": 4 bytes per value (indexer keys too);
- "fp8_ds_mla": vLLM's layout. A 512-dim entry is 584 B = 448 FP8 no-RoPE values + 64 BF16 RoPE values
  (128 B) + 8 B of scales. Our reading for any head_dim: (head_dim - rope) FP8 bytes + rope * 2 bytes
  + one UE8M0 scale byte per 64 no-RoPE values (the reference's QAT block), the scales padded to a
  multiple of 8 bytes (7 scales -> 8 B at 512). The indexer keys are in FP8 too: all `index_head_dim`
  values in e4m3 with the same block-64 UE8M0 scales, padded the same way (136 B at 128). The §2.7 figure
  "≈4.42 GiB without the indexer keys" for Pro at 1M tokens is `kv - csa_indexer` (`attention_kv`).
  engine.cache.fp8 packs and unpacks this layout; the engine's pools hold exactly these bytes per entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.model.config import ModelConfig

CACHE_DTYPES = ("bfloat16", "float32", "fp8_ds_mla")
# The topology's `kv_cache.dtype` names -> CACHE_DTYPES (the planner and the topology read this one table).
KV_CACHE_DTYPES = {"bfloat16": "bfloat16", "float32": "float32", "fp8": "fp8_ds_mla"}
_STATE_BYTES = 4  # compressor state and prefix-cache compressor snapshots: float32
_CSA, _HCA = 4, 128
FP8_SCALE_BLOCK = 64  # no-RoPE values per UE8M0 scale in fp8_ds_mla
_FP8_SCALE_ALIGN = 8  # scale bytes are padded to this


@dataclass(frozen=True)
class CacheBreakdown:
    """Bytes of one sequence's cache, per component (all layers summed)."""

    window: int  # sliding-window slots of every layer
    csa_main: int  # compressed main entries of the CSA layers
    csa_indexer: int  # indexer keys of the CSA layers
    hca: int  # compressed entries of the HCA layers
    compressor_state: int  # partial-window compressor state (float32)

    @property
    def compressed(self) -> int:
        """The paged part: every compressed entry (main, indexer and HCA)."""
        return self.csa_main + self.csa_indexer + self.hca

    @property
    def kv(self) -> int:
        """Window + compressed entries: the per-sequence KV figure vLLM publishes."""
        return self.window + self.compressed

    @property
    def attention_kv(self) -> int:
        """What the attention kernel reads: `kv` without the indexer keys."""
        return self.window + self.csa_main + self.hca

    @property
    def total(self) -> int:
        """Everything one sequence holds: `kv` + compressor state."""
        return self.kv + self.compressor_state

    def to_dict(self) -> dict[str, int]:
        out = dataclasses.asdict(self)
        out.update(compressed=self.compressed, kv=self.kv, attention_kv=self.attention_kv, total=self.total)
        return out


@dataclass(frozen=True)
class CachePlan:
    """How a byte budget splits into per-sequence slots and pages of compressed entries."""

    num_pages: int
    page_bytes: int
    slot_bytes: int
    max_num_seqs: int
    tokens_capacity: int  # num_pages * page_tokens
    bytes_used: int  # max_num_seqs * slot_bytes + num_pages * page_bytes


# ---- per-entry sizes ---------------------------------------------------------------------------------
def _check_dtype(cache_dtype: str) -> None:
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")


def kv_entry_bytes(cfg: ModelConfig, cache_dtype: str = "bfloat16") -> int:
    """Bytes of one `head_dim` KV entry (window or compressed) in `cache_dtype` (584 for fp8_ds_mla at 512)."""
    _check_dtype(cache_dtype)
    if cache_dtype == "bfloat16":
        return 2 * cfg.head_dim
    if cache_dtype == "float32":
        return 4 * cfg.head_dim
    return fp8_entry_bytes(cfg.head_dim, cfg.qk_rope_head_dim)


def fp8_entry_bytes(dim: int, rope: int) -> int:
    """Bytes of one fp8_ds_mla entry of `dim` values whose last `rope` stay bfloat16 (584 at 512 / 64): the
    layout engine.cache.fp8 packs."""
    if not 0 <= rope < dim:
        raise ValueError(f"rope must be in [0, dim={dim}), got {rope}")
    nope = dim - rope
    n_scales = -(-nope // FP8_SCALE_BLOCK)
    return nope + -(-n_scales // _FP8_SCALE_ALIGN) * _FP8_SCALE_ALIGN + 2 * rope


def indexer_entry_bytes(cfg: ModelConfig, cache_dtype: str = "bfloat16") -> int:
    """Bytes of one indexer key (`index_head_dim` values): 2 per value in bfloat16, 4 in float32; in fp8_ds_mla
    all values in FP8 with their scales (the layout with no RoPE part: 136 B at 128)."""
    _check_dtype(cache_dtype)
    if cache_dtype == "fp8_ds_mla":
        return fp8_entry_bytes(cfg.index_head_dim, 0)
    return (4 if cache_dtype == "float32" else 2) * cfg.index_head_dim


def _ratios(cfg: ModelConfig, include_mtp: bool) -> tuple[int, ...]:
    return cfg.compress_ratios if include_mtp else cfg.compress_ratios[: cfg.num_hidden_layers]


def _layer_counts(cfg: ModelConfig, include_mtp: bool) -> tuple[int, int, int]:
    """(layers, CSA layers, HCA layers)."""
    ratios = _ratios(cfg, include_mtp)
    return len(ratios), ratios.count(_CSA), ratios.count(_HCA)


def _compressor_state_bytes(cfg: ModelConfig, include_mtp: bool) -> int:
    _, n_csa, n_hca = _layer_counts(cfg, include_mtp)
    csa_main = 2 * (2 * _CSA) * (2 * cfg.head_dim)  # kv_state + score_state [8, 2*head_dim]
    csa_index = 2 * (2 * _CSA) * (2 * cfg.index_head_dim)  # [8, 2*index_head_dim] x2
    hca = 2 * _HCA * cfg.head_dim  # [128, head_dim] x2
    return _STATE_BYTES * (n_csa * (csa_main + csa_index) + n_hca * hca)


# ---- public API --------------------------------------------------------------------------------------
def sequence_cache_bytes(
    cfg: ModelConfig, context_len: int, cache_dtype: str = "bfloat16", include_mtp: bool = True
) -> CacheBreakdown:
    """The cache of one sequence of `context_len` tokens: full window slots, `context_len // ratio`
    compressed entries per compressed layer, and the compressor state."""
    if not isinstance(context_len, int) or isinstance(context_len, bool) or context_len < 0:
        raise ValueError(f"context_len must be a non-negative integer, got {context_len!r}")
    entry = kv_entry_bytes(cfg, cache_dtype)
    n_layers, n_csa, n_hca = _layer_counts(cfg, include_mtp)
    return CacheBreakdown(
        window=n_layers * cfg.sliding_window * entry,
        csa_main=n_csa * (context_len // _CSA) * entry,
        csa_indexer=n_csa * (context_len // _CSA) * indexer_entry_bytes(cfg, cache_dtype),
        hca=n_hca * (context_len // _HCA) * entry,
        compressor_state=_compressor_state_bytes(cfg, include_mtp),
    )


def bytes_per_token(cfg: ModelConfig, cache_dtype: str = "bfloat16", include_mtp: bool = True) -> dict[str, float]:
    """Asymptotic bytes per context token of the compressed components (windows and state are O(1)):
    keys `csa_main`, `csa_indexer`, `hca` and their sum `compressed`."""
    entry = kv_entry_bytes(cfg, cache_dtype)
    _, n_csa, n_hca = _layer_counts(cfg, include_mtp)
    out = {
        "csa_main": n_csa * entry / _CSA,
        "csa_indexer": n_csa * indexer_entry_bytes(cfg, cache_dtype) / _CSA,
        "hca": n_hca * entry / _HCA,
    }
    out["compressed"] = out["csa_main"] + out["csa_indexer"] + out["hca"]
    return out


def _check_page_tokens(cfg: ModelConfig, page_tokens: int, include_mtp: bool) -> None:
    in_use = sorted({r for r in _ratios(cfg, include_mtp) if r > 0})
    ok = isinstance(page_tokens, int) and not isinstance(page_tokens, bool) and page_tokens > 0
    if not ok or any(page_tokens % r for r in in_use):
        raise ValueError(f"page_tokens must be a positive multiple of every compress ratio in use {in_use}, "
                         f"got {page_tokens!r}")


def snapshot_bytes(cfg: ModelConfig, cache_dtype: str = "bfloat16", include_mtp: bool = True) -> int:
    """The boundary state stored with a full page for prefix caching: the `sliding_window - 1` window
    entries before the boundary in every layer (cache dtype), plus per CSA layer the previous window's raw
    compressor inputs, kv and gate, `[4, 2*head_dim]` and `[4, 2*index_head_dim]` each, float32. (At a page
    boundary the current CSA window and any HCA window are empty, so nothing else is needed.)"""
    n_layers, n_csa, _ = _layer_counts(cfg, include_mtp)
    window = n_layers * (cfg.sliding_window - 1) * kv_entry_bytes(cfg, cache_dtype)
    csa = n_csa * _STATE_BYTES * 2 * _CSA * (2 * cfg.head_dim + 2 * cfg.index_head_dim)
    return window + csa


def page_bytes(
    cfg: ModelConfig, page_tokens: int, cache_dtype: str = "bfloat16", with_snapshot: bool = True,
    include_mtp: bool = True,
) -> int:
    """Bytes of one page: the compressed entries of `page_tokens` tokens in every layer, plus (with_snapshot)
    the prefix-caching boundary state (`snapshot_bytes`). `page_tokens` must be a positive multiple of every
    compress ratio in use (128 for the V4 models)."""
    _check_page_tokens(cfg, page_tokens, include_mtp)
    b = sequence_cache_bytes(cfg, page_tokens, cache_dtype, include_mtp)
    return b.compressed + (snapshot_bytes(cfg, cache_dtype, include_mtp) if with_snapshot else 0)


def slot_bytes(cfg: ModelConfig, cache_dtype: str = "bfloat16", include_mtp: bool = True) -> int:
    """Bytes of one sequence's slot: the window of every layer plus the compressor state."""
    b = sequence_cache_bytes(cfg, 0, cache_dtype, include_mtp)
    return b.window + b.compressor_state


def plan_cache(
    cfg: ModelConfig, budget_bytes: int, page_tokens: int, max_num_seqs: int, cache_dtype: str = "bfloat16",
    with_snapshot: bool = True, include_mtp: bool = True,
) -> CachePlan:
    """Split `budget_bytes` into `max_num_seqs` slots and as many whole pages as fit in the rest.

    Raises ValueError when the budget cannot hold the slots plus one page."""
    if not isinstance(max_num_seqs, int) or isinstance(max_num_seqs, bool) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be a positive integer, got {max_num_seqs!r}")
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be a non-negative integer, got {budget_bytes!r}")
    p_bytes = page_bytes(cfg, page_tokens, cache_dtype, with_snapshot, include_mtp)
    s_bytes = slot_bytes(cfg, cache_dtype, include_mtp)
    slots = max_num_seqs * s_bytes
    num_pages = (budget_bytes - slots) // p_bytes if budget_bytes >= slots else 0
    if num_pages < 1:
        raise ValueError(
            f"cache budget of {budget_bytes} bytes cannot hold {max_num_seqs} sequence slots x {s_bytes} bytes "
            f"= {slots} bytes plus one page of {p_bytes} bytes ({page_tokens} tokens, {cache_dtype}); "
            f"need at least {slots + p_bytes} bytes")
    return CachePlan(
        num_pages=num_pages,
        page_bytes=p_bytes,
        slot_bytes=s_bytes,
        max_num_seqs=max_num_seqs,
        tokens_capacity=num_pages * page_tokens,
        bytes_used=slots + num_pages * p_bytes,
    )
