"""The DeepSeek-V4 model (v4-model.md §0–§4), parameter names equal to the official checkpoint.

    embed -> [4 mHC streams] -> Block* (mHC -> attention -> mHC -> MoE) -> hc_head -> norm -> head
    MTP:  e_proj(enorm(embed(next_ids))) + h_proj(hnorm(h)) -> Block -> its hc_head -> norm -> head

A forward takes a packed batch: the new tokens of several sequences back to back, each
sequence carrying its own `SequenceState` (prefill, chunked prefill and decode alike).

Expert parallelism: `Transformer(cfg, dtype, ep=EPContext(ep_rank, ep_size, placement, backend))` holds
only this rank's physical expert slots (`placement.local_logical(layer, ep_rank)` per MoE layer) and every
MoE layer exchanges tokens with the other ranks through one `comm.dispatch.Dispatcher` (`model.dispatcher`,
whose `last_stats`/`totals` count the bytes). `forward` is then collective: every rank calls it each step,
with an empty batch (`input_ids` of length 0, no states) when it has no tokens. MoE layer ids: main layers
0..num_hidden_layers-1, then the MTP blocks; the MTP blocks are built only if the placement covers them.
`load_model(path, ep=...)` loads only the experts of this rank's slots.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from comm.dispatch import Dispatcher
from comm.placement import Placement
from engine.cache.decode_slots import DecodeBatch, LayerSlots
from engine.cache.seq_state import LayerState
from engine.model.attention import Attention, SeqSlice
from engine.model.config import ModelConfig
from engine.model.layers import Embedding, Linear, RMSNorm
from engine.model.mhc import hc_head, hc_post, hc_pre
from engine.model.moe import EPContext, LoadRecorder, MoE
from engine.model.weight_format import DENSE, WeightFormats, building


@dataclass
class SequenceState:
    """One sequence's cache: one LayerState per block (main layers, then MTP layers)."""

    layers: list[LayerState]

    @property
    def num_tokens(self) -> int:
        return self.layers[0].num_tokens


class Block(nn.Module):
    """mHC -> attn_norm -> attention -> mHC -> ffn_norm -> MoE, on the 4-stream state [T, hc, D]."""

    def __init__(self, cfg: ModelConfig, layer_id: int, local_experts: list[int], dtype: torch.dtype,
                 dispatcher: Dispatcher | None = None) -> None:
        super().__init__()
        d, hc = cfg.hidden_size, cfg.hc_mult
        n_mix = (2 + hc) * hc
        self.cfg, self.layer_id = cfg, layer_id
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_id, dtype)
        self.ffn = MoE(cfg, layer_id, local_experts, dtype, dispatcher)
        for sub in ("attn", "ffn"):
            setattr(self, f"hc_{sub}_fn", nn.Parameter(torch.zeros(n_mix, hc * d, dtype=torch.float32)))
            setattr(self, f"hc_{sub}_base", nn.Parameter(torch.zeros(n_mix, dtype=torch.float32)))
            setattr(self, f"hc_{sub}_scale", nn.Parameter(torch.zeros(3, dtype=torch.float32)))

    def _hc(self, sub: str, h: torch.Tensor):
        c = self.cfg
        return hc_pre(h, getattr(self, f"hc_{sub}_fn"), getattr(self, f"hc_{sub}_base"),
                      getattr(self, f"hc_{sub}_scale"), c.hc_eps, c.rms_norm_eps, c.hc_sinkhorn_iters)

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                seqs: list[SeqSlice], decode: tuple[DecodeBatch, LayerSlots] | None = None) -> torch.Tensor:
        """h [T, hc, D] -> [T, hc, D]. `decode`: the first rows are decode-slot tokens (Attention.forward); with
        no other sequence the step is the static decode step and the MoE routes sync-free too."""
        y, post, comb = self._hc("attn", h)
        if seqs or decode is not None:  # an EP rank without tokens skips attention but still joins the MoE exchange
            h = hc_post(h, self.attn(self.attn_norm(y), positions, seqs, decode), post, comb)
        y, post, comb = self._hc("ffn", h)
        sync_free = decode is not None and not seqs
        return hc_post(h, self.ffn(self.ffn_norm(y), input_ids, sync_free=sync_free), post, comb)

    def forward_steps(self, h: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                      seqs: list[SeqSlice], token_offset: int) -> Generator[None, None, torch.Tensor]:
        """`forward` as a generator yielding while MoE communication is in flight (model-level tbo)."""
        y, post, comb = self._hc("attn", h)
        if seqs:
            h = hc_post(h, self.attn(self.attn_norm(y), positions, seqs), post, comb)
        y, post, comb = self._hc("ffn", h)
        out = yield from self.ffn.forward_steps(self.ffn_norm(y), input_ids, token_offset)
        return hc_post(h, out, post, comb)


class HCHead(nn.Module):
    """The final mHC collapse + norm (parameters `hc_head_*`, `norm`) of the model or an MTP block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hc = cfg.hidden_size, cfg.hc_mult
        self.cfg = cfg
        self.hc_head_fn = nn.Parameter(torch.zeros(hc, hc * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(hc, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, hc, D] -> normed [T, D]."""
        y = hc_head(h, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.cfg.hc_eps, self.cfg.rms_norm_eps)
        return self.norm(y)


class MTPBlock(nn.Module):
    """Multi-token prediction block `mtp.i` (§3): predicts token t+2 from h_t and token t+1."""

    def __init__(self, cfg: ModelConfig, layer_id: int, local_experts: list[int], dtype: torch.dtype,
                 dispatcher: Dispatcher | None = None) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.block = Block(cfg, layer_id, local_experts, dtype, dispatcher)
        self.e_proj = Linear(d, d, dtype)
        self.h_proj = Linear(d, d, dtype)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = HCHead(cfg)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                seqs: list[SeqSlice]) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, hc, D] main-model streams at t, emb [T, D] embedding of token t+1 -> (h' [T, hc, D], y [T, D])."""
        x = self.e_proj(self.enorm(emb)).unsqueeze(1) + self.h_proj(self.hnorm(h))  # [T, hc, D]
        x = self.block(x, input_ids, positions, seqs)
        return x, self.head(x)


class Transformer(nn.Module):
    """DeepSeek-V4 for causal LM. `local_experts`: the routed experts this rank holds (default: all).

    `with_mtp=False` builds no MTP block (for checkpoints without one, e.g. saved by transformers).
    `ep`: expert parallelism (module docstring); `local_experts` must then be None.
    `weights`: how the weights are held (engine.model.weight_format); default: every weight in `dtype`.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 local_experts: Sequence[int] | None = None, with_mtp: bool = True,
                 ep: EPContext | None = None, weights: WeightFormats = DENSE) -> None:
        super().__init__()
        self.weight_formats = weights
        with building(weights):
            self._build(cfg, dtype, local_experts, with_mtp, ep)

    def _build(self, cfg: ModelConfig, dtype: torch.dtype, local_experts: Sequence[int] | None, with_mtp: bool,
               ep: EPContext | None) -> None:
        self.cfg, self.dtype, self.ep = cfg, dtype, ep
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.dispatcher: Dispatcher | None = None
        if ep is None:
            experts = list(range(cfg.n_routed_experts)) if local_experts is None else sorted(local_experts)
            per_layer = [experts] * (cfg.num_hidden_layers + n_mtp)
        else:
            if local_experts is not None:
                raise ValueError("pass either local_experts or ep (the placement decides the experts), not both")
            _check_placement(cfg, ep.placement)
            if ep.placement.num_layers < cfg.num_hidden_layers + n_mtp:
                n_mtp = 0  # the placement does not cover the MTP blocks: build none
            self.dispatcher = ep.dispatcher()
            per_layer = [ep.placement.local_logical(i, ep.ep_rank) for i in range(cfg.num_hidden_layers + n_mtp)]
            experts = sorted({e for row in per_layer for e in row})
        self.local_experts = experts
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(Block(cfg, i, per_layer[i], dtype, self.dispatcher)
                                    for i in range(cfg.num_hidden_layers))
        self.final = HCHead(cfg)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, dtype, stored="bf16")
        self.mtp = nn.ModuleList(
            MTPBlock(cfg, cfg.num_hidden_layers + i, per_layer[cfg.num_hidden_layers + i], dtype, self.dispatcher)
            for i in range(n_mtp)
        )

    # ---- expert parallelism ------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, indexed by MoE layer id (main layers, then MTP blocks)."""
        return [b.ffn for b in self.layers] + [m.block.ffn for m in self.mtp]

    def set_load_recorder(self, recorder: LoadRecorder | None) -> None:
        """Have every MoE layer call `recorder.record(layer, topk_idx)` (this rank's tokens); None stops it."""
        for moe in self.moe_layers():
            moe.load_recorder = recorder

    def set_backend(self, backend: str, num_waves: int | None = None) -> None:
        """Switch the dispatch/combine backend ("sync" | "tbo" | "wave") without reloading; every rank must
        switch at the same point. The new dispatcher starts with fresh stats."""
        if self.ep is None or self.dispatcher is None:
            raise RuntimeError("set_backend needs a model built with ep=EPContext(...)")
        self.ep = replace(self.ep, backend=backend, num_waves=num_waves)
        self.dispatcher = self.ep.dispatcher()
        for moe in self.moe_layers():
            moe.dispatcher = self.dispatcher

    def set_placement(self, placement: Placement) -> None:
        """Switch to a new placement after the slot weights were moved (e.g. comm.rebalance): updates the
        dispatcher and each layer's slot -> logical expert list. Collective use: every rank, same placement."""
        if self.ep is None or self.dispatcher is None:
            raise RuntimeError("set_placement needs a model built with ep=EPContext(...)")
        ep = replace(self.ep, placement=placement)  # validates placement.ep_size
        _check_placement(self.cfg, placement)
        moes = self.moe_layers()
        if placement.num_layers < len(moes):
            raise ValueError(f"placement has {placement.num_layers} layers, the model {len(moes)} MoE layers")
        if placement.slots_per_rank != len(moes[0].experts.local_experts):
            raise ValueError(f"placement has {placement.slots_per_rank} slots per rank, the model holds "
                             f"{len(moes[0].experts.local_experts)}")
        self.ep = ep
        self.dispatcher.set_placement(placement)
        for i, moe in enumerate(moes):
            moe.experts.local_experts = placement.local_logical(i, self.ep.ep_rank)
        self.local_experts = placement.local_experts(self.ep.ep_rank)

    # ---- state ----------------------------------------------------------------------
    def new_state(self) -> SequenceState:
        device = self.embed.weight.device
        blocks = [*self.layers, *(m.block for m in self.mtp)]
        return SequenceState([b.attn.new_state(device) for b in blocks])

    @staticmethod
    def _slices(states: Sequence[SequenceState], seq_lens: Sequence[int], layer: int,
                start: int = 0) -> list[SeqSlice]:
        out = []
        for st, n in zip(states, seq_lens, strict=True):
            out.append(SeqSlice(start, n, st.layers[layer]))
            start += n
        return out

    @staticmethod
    def positions_for(states: Sequence[SequenceState], seq_lens: Sequence[int], layer: int = 0) -> torch.Tensor:
        """Positions of the new tokens: each sequence continues where its cache ends."""
        if not states:
            return torch.zeros(0, dtype=torch.int64)
        return torch.cat([torch.arange(st.layers[layer].num_tokens, st.layers[layer].num_tokens + n)
                          for st, n in zip(states, seq_lens, strict=True)])

    # ---- forward --------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, states: Sequence[SequenceState],
                seq_lens: Sequence[int], decode: DecodeBatch | None = None) -> torch.Tensor:
        """input_ids [T] (sequences packed back to back, seq_lens new tokens each) -> h [T, hc, D].

        Appends the tokens to each sequence's state. Logits: `compute_logits(h)`.
        `decode`: sequences decoding from decode slots (engine.cache.decode_slots); their tokens
        (`decode.input_ids`) come first, then `input_ids` of `states`. The caller advances their host-side
        counters. With no `states` this is the static decode step (engine.core.graph_runner).
        """
        device = self.embed.weight.device
        input_ids = input_ids.to(device)
        positions = self.positions_for(states, seq_lens).to(device) if states or decode is None else None
        n_dec = 0
        if decode is not None:
            if self.dispatcher is not None and self.dispatcher.backend == "tbo":
                raise ValueError("the decode-slot step does not run with the tbo backend (it splits sequences)")
            n_dec = decode.size
            input_ids = decode.input_ids if positions is None else torch.cat([decode.input_ids, input_ids])
            positions = decode.pos if positions is None else torch.cat([decode.pos, positions])
        h = self.embed(input_ids).unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()  # [T, hc, D]
        if self.dispatcher is not None and self.dispatcher.backend == "tbo":
            return self._forward_two_batches(h, input_ids, positions, states, seq_lens)
        for i, block in enumerate(self.layers):
            dec = None if decode is None else (decode, decode.slots.layers[i])
            h = block(h, input_ids, positions, self._slices(states, seq_lens, i, n_dec), dec)
        return h

    def _forward_two_batches(self, h: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                             states: Sequence[SequenceState], seq_lens: Sequence[int]) -> torch.Tensor:
        """EP `tbo`: the batch split at half its tokens into two micro-batches, run layer by layer in lock-step
        so one micro-batch's attention/experts compute while the other's MoE tokens or results travel.

        Exact: attention is per sequence and everything else per token. A sequence straddling the split is cut
        in two chunks (micro-batch 0 always runs a layer's attention first, so the second chunk sees the first
        in the cache: chunked prefill) unless a prefix-cache snapshot is pending for it this step; then it goes
        whole to one side. A rank that cannot split (one decode token, no tokens) runs an empty micro-batch:
        the collectives still pair up with its peers."""
        half = (sum(seq_lens) + 1) // 2
        parts: list[tuple[list[SequenceState], list[int]]] = [([], []), ([], [])]
        cut, cum = 0, 0
        for st, n in zip(states, seq_lens, strict=True):
            if cum + n <= half:
                parts[0][0].append(st)
                parts[0][1].append(n)
                cut = cum + n
            elif cum >= half:
                parts[1][0].append(st)
                parts[1][1].append(n)
            elif not any(layer.snapshot_at for layer in st.layers):
                a = half - cum
                parts[0][0].append(st)
                parts[0][1].append(a)
                parts[1][0].append(st)
                parts[1][1].append(n - a)
                cut = half
            else:
                side = 0 if half - cum >= cum + n - half else 1
                parts[side][0].append(st)
                parts[side][1].append(n)
                cut = cum + n if side == 0 else cum
            cum += n
        bounds = [(0, cut), (cut, cum)]

        def run(lo: int, hi: int, sts: Sequence[SequenceState], ls: list[int]):
            hh = h[lo:hi]
            for i, block in enumerate(self.layers):
                hh = yield from block.forward_steps(hh, input_ids[lo:hi], positions[lo:hi],
                                                    self._slices(sts, ls, i), lo)
            return hh

        gens = [run(lo, hi, sts, ls) for (lo, hi), (sts, ls) in zip(bounds, parts, strict=True)]
        outs: list[torch.Tensor | None] = [None, None]
        live = [0, 1]
        while live:
            for j in list(live):
                try:
                    next(gens[j])
                except StopIteration as stop:
                    outs[j] = stop.value
                    live.remove(j)
        return torch.cat(outs)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, hc, D] -> logits [T, V] in float32."""
        return self.head(self.final(h)).float()

    def mtp_forward(self, h: torch.Tensor, next_ids: torch.Tensor, states: Sequence[SequenceState],
                    seq_lens: Sequence[int], depth: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative head: h [T, hc, D] at positions t, next_ids [T] = tokens t+1 -> (h_mtp, logits for t+2).

        The MTP block keeps its own window cache (layer `num_hidden_layers + depth` of each state).
        """
        if depth >= len(self.mtp):
            raise ValueError(f"no MTP block {depth}: this model has {len(self.mtp)} (its checkpoint had none?)")
        layer = self.cfg.num_hidden_layers + depth
        device = self.embed.weight.device
        next_ids = next_ids.to(device)
        positions = self.positions_for(states, seq_lens, layer).to(device)
        h_mtp, y = self.mtp[depth](h, self.embed(next_ids), next_ids, positions,
                                   self._slices(states, seq_lens, layer))
        return h_mtp, self.head(y).float()

    # ---- weights --------------------------------------------------------------------
    _EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)$")
    _STACKED = ("experts.w1", "experts.w2", "experts.w3", "experts.w1_scale", "experts.w2_scale", "experts.w3_scale")

    def _param_name(self, name: str) -> str:
        """Official checkpoint name -> our parameter name (they differ only around the heads)."""
        if name in ("norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"):
            return "final." + name
        m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
        if m:
            i, rest = m.groups()
            if rest in ("norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"):
                return f"mtp.{i}.head.{rest}"
            if rest.split(".")[0] in ("e_proj", "h_proj", "enorm", "hnorm"):
                return f"mtp.{i}.{rest}"
            return f"mtp.{i}.block.{rest}"
        return name

    def expected_weights(self) -> set[str]:
        """Every official tensor name this model instance needs (experts: only its local ones)."""
        names = set()
        for pname in {**dict(self.named_parameters()), **dict(self.named_buffers())}:
            if pname.endswith(self._STACKED) or pname.endswith("freqs") \
                    or pname.endswith(".g2l"):
                continue
            names.add(self._official_name(pname))
        prefixes = [f"layers.{i}" for i in range(self.cfg.num_hidden_layers)]
        prefixes += [f"mtp.{i}" for i in range(len(self.mtp))]
        for p, moe in zip(prefixes, self.moe_layers(), strict=True):
            kinds = ("weight",) if moe.experts.fmt == "dense" else ("weight", "scale")
            for e in set(moe.experts.local_experts):
                names.update(f"{p}.ffn.experts.{e}.{w}.{k}" for w in ("w1", "w2", "w3") for k in kinds)
        return names

    def experts_per_layer(self) -> dict[int, set[int]]:
        """MoE layer id -> the logical experts this model holds there (what it must load)."""
        return {i: set(moe.experts.local_experts) for i, moe in enumerate(self.moe_layers())}

    @staticmethod
    def _official_name(pname: str) -> str:
        if pname.startswith("final."):
            return pname[len("final."):]
        m = re.match(r"^mtp\.(\d+)\.(head|block)\.(.*)$", pname)
        if m:
            return f"mtp.{m.group(1)}.{m.group(3)}"
        return pname

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (official name, tensor) pairs into the model; every expected tensor must come.

        Dequantized tensors for a dense model; for native formats the stored bytes (`X.weight` and `X.scale`
        as the checkpoint names them). Routed experts outside `local_experts` are ignored (a rank loads only its
        own); under EP a logical expert is copied into every local slot that holds it.
        """
        params = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        missing = self.expected_weights()
        for name, tensor in weights:
            m = self._EXPERT.match(name)
            if m:
                prefix, e, w, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
                if prefix.startswith("mtp.") and not self.mtp:
                    continue  # built without MTP
                pname = self._param_name(prefix)
                key = f"{pname}.{w}" if kind == "weight" else f"{pname}.{w}_scale"
                if key not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in the model (its experts are held "
                                   f"{self.get_submodule(pname).fmt})")
                stacked = params[key]
                slots = [s for s, le in enumerate(self.get_submodule(pname).local_experts) if le == e]
                if not slots:
                    continue
                if tuple(stacked.shape[1:]) != tuple(tensor.shape):
                    raise ValueError(f"tensor {name!r}: shape {tuple(tensor.shape)}, model expects "
                                     f"{tuple(stacked.shape[1:])}")
                for s in slots:
                    stacked[s].copy_(tensor.to(device=stacked.device, dtype=stacked.dtype))
                missing.discard(name)
                continue
            else:
                pname = self._param_name(name)
                if name.startswith("mtp.") and not self.mtp:
                    continue  # built without MTP
                if pname not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
                target = params[pname]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {name!r}: shape {tuple(tensor.shape)}, model expects {tuple(target.shape)}")
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            missing.discard(name)
        if missing:
            raise KeyError(f"{len(missing)} tensors never loaded: {sorted(missing)[:20]}")


def _check_placement(cfg: ModelConfig, p: Placement) -> None:
    if p.num_experts != cfg.n_routed_experts:
        raise ValueError(f"placement has {p.num_experts} logical experts, the model {cfg.n_routed_experts}")
    if p.num_layers < cfg.num_hidden_layers:
        raise ValueError(f"placement covers {p.num_layers} MoE layers, the model has {cfg.num_hidden_layers} "
                         f"(+{cfg.num_nextn_predict_layers} MTP)")
