"""Persistent per-layer decode buffers: the state a decoding sequence carries between steps, in fixed slots.

The eager paths keep each sequence's window and compressor partial windows as its own tensors
(`LayerState`). A sequence that decodes moves them once into a slot of `DecodeSlots` (`load`); from then
on every decode step reads and writes the slots in place with index ops whose shapes depend only on the
batch size, never on the data:

- window ring `[S+1, W, head_dim]`: the KV of position p sits at `p % W`, so a query at p sees the ring's
  entries at positions p-W+1 .. p (those >= 0);
- per compressor (ratio m, width c*d, float32): `pend_kv/pend_gate [S+1, m, c*d]`, the rows of the window
  being filled (position p at `p % m`, gate without ape), and `prev_kv/prev_gate [S+1, m, c*d]` (CSA overlap:
  the last finished window, ape added; gate -inf before the first entry).

Slot S is scratch: padding rows of a bucket read and write there. Finished entries go to the paged pools of
`PagedKVCache` (its last page is scratch too: an unfinished entry is written there), packed by its codecs when
the cache is FP8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.cache.seq_state import CompressorState, LayerSnapshot, LayerState


@dataclass
class CompressorSlots:
    """One compressor's partial windows for every slot (float32)."""

    ratio: int
    pend_kv: torch.Tensor  # [S+1, m, c*d]
    pend_gate: torch.Tensor  # [S+1, m, c*d], ape not added
    prev_kv: torch.Tensor  # [S+1, m, c*d]
    prev_gate: torch.Tensor  # [S+1, m, c*d], ape added; -inf: no previous window

    @classmethod
    def empty(cls, slots: int, ratio: int, width: int, device: torch.device | str) -> CompressorSlots:
        z = lambda: torch.zeros(slots, ratio, width, dtype=torch.float32, device=device)  # noqa: E731
        prev_gate = torch.full((slots, ratio, width), float("-inf"), dtype=torch.float32, device=device)
        return cls(ratio, z(), z(), z(), prev_gate)

    def load(self, slot: int, cs: CompressorState, num_tokens: int) -> None:
        """Copy one sequence's compressor state (at `num_tokens` tokens) into `slot`."""
        n_pend = num_tokens % self.ratio
        if cs.pend_kv.shape[0] != n_pend:
            raise ValueError(f"compressor holds {cs.pend_kv.shape[0]} pending rows at {num_tokens} tokens "
                             f"(ratio {self.ratio}): expected {n_pend}")
        self.pend_kv[slot, :n_pend] = cs.pend_kv
        self.pend_gate[slot, :n_pend] = cs.pend_gate
        if cs.prev_kv is None:
            self.prev_kv[slot] = 0
            self.prev_gate[slot] = float("-inf")
        else:
            self.prev_kv[slot] = cs.prev_kv
            self.prev_gate[slot] = cs.prev_gate

    def prev(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last finished window of `slot` (raw kv, gate with ape): a snapshot's `comp_prev`."""
        return self.prev_kv[slot].clone(), self.prev_gate[slot].clone()


@dataclass
class LayerSlots:
    """One main layer's decode buffers, with the page pools its compressed entries live in."""

    window: torch.Tensor  # [S+1, W, head_dim] ring
    comp: CompressorSlots | None
    index: CompressorSlots | None
    comp_pool: torch.Tensor | None  # [num_pages+1, per_page, head_dim]
    index_pool: torch.Tensor | None  # [num_pages+1, per_page, index_head_dim]
    workspace: dict[str, torch.Tensor] = field(default_factory=dict)  # CPU: per-step buffers kept (attention_decode)
    comp_codec: object = None  # the pools' entry codecs (PagedKVCache.kv_codec / index_codec): None = plain entries
    index_codec: object = None

    def load(self, slot: int, st: LayerState) -> None:
        """Copy one sequence's eager state into `slot` (its last min(p, W-1) window rows go to their ring places)."""
        p, w = st.num_tokens, self.window.shape[1]
        a = st.window.shape[0]
        if a != min(p, w - 1):
            raise ValueError(f"window holds {a} rows at {p} tokens; expected {min(p, w - 1)} (window {w})")
        if a:
            ring = torch.arange(p - a, p, device=self.window.device) % w
            self.window[slot].index_copy_(0, ring, st.window.to(self.window.dtype))
        for slots, cs in ((self.comp, st.comp), (self.index, st.index)):
            if slots is not None:
                slots.load(slot, cs, p)

    def snapshot(self, slot: int, boundary: int) -> LayerSnapshot:
        """The state at `boundary` (= the tokens the slot holds now, a page boundary): what a prefix hit restores."""
        w = self.window.shape[1]
        a = min(boundary, w - 1)
        ring = torch.arange(boundary - a, boundary, device=self.window.device) % w
        window = self.window[slot].index_select(0, ring)
        comp_prev = self.comp.prev(slot) if self.comp is not None and self.comp.ratio == 4 else None
        index_prev = self.index.prev(slot) if self.index is not None else None
        return LayerSnapshot(window, comp_prev, index_prev)


class DecodeSlots:
    """The decode buffers of every main layer for `max_seqs` sequences (+ one scratch slot), and the slot table."""

    def __init__(self, model, cache, max_seqs: int) -> None:
        device = model.embed.weight.device
        self.max_seqs = max_seqs
        self.scratch = max_seqs
        self.scratch_page = cache.scratch_page
        self.layers: list[LayerSlots] = []
        n = max_seqs + 1
        for i, block in enumerate(model.layers):
            attn = block.attn
            window = torch.zeros(n, attn.window, attn.head_dim, dtype=attn.wkv.compute_dtype, device=device)
            comp = index = None
            if attn.compressor is not None:
                comp = CompressorSlots.empty(n, attn.ratio, attn.compressor.ape.shape[1], device)
            if attn.indexer is not None:
                ic = attn.indexer.compressor
                index = CompressorSlots.empty(n, ic.ratio, ic.ape.shape[1], device)
            self.layers.append(LayerSlots(window, comp, index, cache.comp_pools.get(i), cache.index_pools.get(i),
                                          comp_codec=cache.kv_codec, index_codec=cache.index_codec))
        self._free = list(range(max_seqs - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def acquire(self, layers: list[LayerState]) -> int:
        """A free slot holding a copy of the sequence's main-layer states."""
        if not self._free:
            raise RuntimeError(f"all {self.max_seqs} decode slots are taken")
        slot = self._free.pop()
        for ls, st in zip(self.layers, layers, strict=False):
            ls.load(slot, st)
        return slot

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.max_seqs or slot in self._free:
            raise ValueError(f"slot {slot} is not taken")
        self._free.append(slot)


@dataclass
class DecodeBatch:
    """One decode step's metadata on the device: row b is the one new token of a sequence at position
    `pos[b]` in slot `slot[b]` with page table `pages[b]` (padded with the scratch page); padding rows use the
    scratch slot, position 0 and scratch pages."""

    input_ids: torch.Tensor  # [B] int64
    pos: torch.Tensor  # [B] int64
    slot: torch.Tensor  # [B] int64
    pages: torch.Tensor  # [B, P] int64
    slots: DecodeSlots

    @property
    def size(self) -> int:
        return self.pos.shape[0]
