"""The V4 hybrid cache of one rank (v4-model.md §2.7; DESIGN.md "KV cache").

Compressed entries live in page pools, one per compressed layer (and one for each CSA layer's
indexer keys); a page holds the entries of `page_tokens` consecutive tokens, so one page id
addresses the same token range in every layer. The scheduler hands out the page ids. Windows and
the compressors' partial windows are per-sequence tensors (the "slots"). For prefix caching, the
state at the end of a full page is stored with the page (`snapshots`), so a hit restores it exactly.

`kv_dtype` (the topology's `kv_cache.dtype`): "fp8": the pools hold packed uint8 entries in the fp8_ds_mla
layout (engine.cache.fp8; `kv_codec` for the main entries, `index_codec` for the indexer keys), exactly
engine.cache.accounting's bytes per entry; "bfloat16"/"float32" other than the model dtype: the pools hold
the entries cast to it. Either way the attention layers round their window KV the same way (`bind`). None
or the model dtype: the pools hold the entries as computed.
"""

from __future__ import annotations

import torch

from engine.cache.fp8 import CastEntryCodec, FP8EntryCodec
from engine.cache.seq_state import LayerSnapshot, PagedEntries
from engine.model.config import ModelConfig
from engine.model.model import SequenceState, Transformer


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, num_pages: int, page_tokens: int, dtype: torch.dtype,
                 device: torch.device | str, kv_dtype: str | None = None) -> None:
        ratios = {r for r in cfg.compress_ratios[:cfg.num_hidden_layers] if r}
        bad = [r for r in ratios if page_tokens % r]
        if page_tokens <= 0 or bad:
            raise ValueError(f"page_tokens={page_tokens} must be a positive multiple of every compress ratio "
                             f"in use {sorted(ratios)}")
        self.cfg, self.num_pages, self.page_tokens = cfg, num_pages, page_tokens
        if kv_dtype not in (None, "fp8", "bfloat16", "float32"):
            raise ValueError(f"kv_dtype must be None (the model dtype), 'fp8', 'bfloat16' or 'float32', "
                             f"got {kv_dtype!r}")
        self.kv_codec = self.index_codec = None
        kv_width, index_width, pool_dtype = cfg.head_dim, cfg.index_head_dim, dtype
        if kv_dtype in ("bfloat16", "float32") and getattr(torch, kv_dtype) != dtype:
            pool_dtype = getattr(torch, kv_dtype)
            self.kv_codec = CastEntryCodec(cfg.head_dim, pool_dtype, dtype)
            self.index_codec = CastEntryCodec(cfg.index_head_dim, pool_dtype, dtype)
        elif kv_dtype == "fp8":
            self.kv_codec = FP8EntryCodec(cfg.head_dim, cfg.qk_rope_head_dim, dtype)
            self.index_codec = FP8EntryCodec(cfg.index_head_dim, 0, dtype)
            kv_width, index_width, pool_dtype = self.kv_codec.entry_bytes, self.index_codec.entry_bytes, torch.uint8
        # One page past the scheduler's: the decode step writes an entry that is not finished yet there, and
        # pads page tables with it (engine.cache.decode_slots); no sequence ever owns it.
        self.scratch_page = num_pages
        # layer -> [num_pages + 1 (scratch), page_tokens/m, head_dim (fp8: kv_codec.entry_bytes)]
        self.comp_pools: dict[int, torch.Tensor] = {}
        # CSA layer -> [num_pages + 1, page_tokens/4, index_head_dim (fp8: index_codec.entry_bytes)]
        self.index_pools: dict[int, torch.Tensor] = {}
        for layer, ratio in enumerate(cfg.compress_ratios[:cfg.num_hidden_layers]):
            if ratio:
                self.comp_pools[layer] = torch.zeros(num_pages + 1, page_tokens // ratio, kv_width,
                                                     dtype=pool_dtype, device=device)
            if ratio == 4:
                self.index_pools[layer] = torch.zeros(num_pages + 1, page_tokens // 4, index_width,
                                                      dtype=pool_dtype, device=device)
        # page id -> the state of every main layer at the end of that page (prefix caching)
        self.snapshots: dict[int, list[LayerSnapshot]] = {}

    def bind(self, model: Transformer) -> None:
        """Make the model's attention layers quantize their window KV as this cache stores entries (fp8), or not."""
        for block in [*model.layers, *(m.block for m in model.mtp)]:
            block.attn.kv_codec = self.kv_codec

    def pool_bytes(self) -> int:
        pools = [*self.comp_pools.values(), *self.index_pools.values()]
        return sum(p.numel() * p.element_size() for p in pools)

    def _stores(self, layer: int, page_ids: list[int], num_tokens: int) -> tuple[PagedEntries | None, ...]:
        ratio = self.cfg.compress_ratios[layer]
        comp = PagedEntries(self.comp_pools[layer], page_ids, num_tokens // ratio, self.kv_codec) if ratio else None
        index = PagedEntries(self.index_pools[layer], page_ids, num_tokens // 4, self.index_codec) \
            if ratio == 4 else None
        return comp, index

    def new_sequence(self, model: Transformer, page_ids: list[int], num_computed: int) -> SequenceState:
        """A sequence whose compressed entries go to `page_ids` (the request's page table, extended in
        place as pages arrive). `num_computed` > 0: a prefix hit of that many tokens (a page boundary)."""
        device = model.embed.weight.device
        snap = None
        if num_computed:
            if num_computed % self.page_tokens:
                raise ValueError(f"a prefix hit must end at a page boundary, got {num_computed} tokens")
            snap = self.snapshots[page_ids[num_computed // self.page_tokens - 1]]
        layers = []
        for i, block in enumerate(model.layers):
            comp, index = self._stores(i, page_ids, num_computed)
            if snap is None:
                layers.append(block.attn.new_state(device, comp, index))
            else:
                layers.append(block.attn.restore(snap[i], num_computed, comp, index))
        layers += [m.block.attn.new_state(device) for m in model.mtp]  # MTP: not run by the runner yet
        return SequenceState(layers)

    def store_snapshot(self, page_id: int, state: SequenceState, boundary: int) -> None:
        """Keep the state at `boundary` (the end of page `page_id`) captured during the last forward."""
        n_main = self.cfg.num_hidden_layers
        self.snapshots[page_id] = [state.layers[i].snapshots.pop(boundary) for i in range(n_main)]
