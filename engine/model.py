"""The DeepSeek-V4 model (v4-model.md §0–§4), parameter names equal to the official checkpoint.

    embed -> [4 mHC streams] -> Block* (mHC -> attention -> mHC -> MoE) -> hc_head -> norm -> head
    MTP:  e_proj(enorm(embed(next_ids))) + h_proj(hnorm(h)) -> Block -> its hc_head -> norm -> head

A forward takes a packed batch: the new tokens of several sequences back to back, each
sequence carrying its own `SequenceState` (prefill, chunked prefill and decode alike).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.attention import Attention, SeqSlice
from engine.config import ModelConfig
from engine.layers import Linear, RMSNorm
from engine.mhc import hc_head, hc_post, hc_pre
from engine.moe import MoE
from engine.seq_state import LayerState


@dataclass
class SequenceState:
    """One sequence's cache: one LayerState per block (main layers, then MTP layers)."""

    layers: list[LayerState]

    @property
    def num_tokens(self) -> int:
        return self.layers[0].num_tokens


class Block(nn.Module):
    """mHC -> attn_norm -> attention -> mHC -> ffn_norm -> MoE, on the 4-stream state [T, hc, D]."""

    def __init__(self, cfg: ModelConfig, layer_id: int, local_experts: list[int], dtype: torch.dtype) -> None:
        super().__init__()
        d, hc = cfg.hidden_size, cfg.hc_mult
        n_mix = (2 + hc) * hc
        self.cfg, self.layer_id = cfg, layer_id
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_id, dtype)
        self.ffn = MoE(cfg, layer_id, local_experts, dtype)
        for sub in ("attn", "ffn"):
            setattr(self, f"hc_{sub}_fn", nn.Parameter(torch.zeros(n_mix, hc * d, dtype=torch.float32)))
            setattr(self, f"hc_{sub}_base", nn.Parameter(torch.zeros(n_mix, dtype=torch.float32)))
            setattr(self, f"hc_{sub}_scale", nn.Parameter(torch.zeros(3, dtype=torch.float32)))

    def _hc(self, sub: str, h: torch.Tensor):
        c = self.cfg
        return hc_pre(h, getattr(self, f"hc_{sub}_fn"), getattr(self, f"hc_{sub}_base"),
                      getattr(self, f"hc_{sub}_scale"), c.hc_eps, c.rms_norm_eps, c.hc_sinkhorn_iters)

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                seqs: list[SeqSlice]) -> torch.Tensor:
        """h [T, hc, D] -> [T, hc, D]."""
        y, post, comb = self._hc("attn", h)
        h = hc_post(h, self.attn(self.attn_norm(y), positions, seqs), post, comb)
        y, post, comb = self._hc("ffn", h)
        return hc_post(h, self.ffn(self.ffn_norm(y), input_ids), post, comb)


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

    def __init__(self, cfg: ModelConfig, layer_id: int, local_experts: list[int], dtype: torch.dtype) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.block = Block(cfg, layer_id, local_experts, dtype)
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
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 local_experts: Sequence[int] | None = None, with_mtp: bool = True) -> None:
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        experts = list(range(cfg.n_routed_experts)) if local_experts is None else sorted(local_experts)
        self.local_experts = experts
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, i, experts, dtype) for i in range(cfg.num_hidden_layers))
        self.final = HCHead(cfg)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, dtype)
        self.mtp = nn.ModuleList(
            MTPBlock(cfg, cfg.num_hidden_layers + i, experts, dtype)
            for i in range(cfg.num_nextn_predict_layers if with_mtp else 0)
        )

    # ---- state ----------------------------------------------------------------------
    def new_state(self) -> SequenceState:
        device = self.embed.weight.device
        blocks = [*self.layers, *(m.block for m in self.mtp)]
        return SequenceState([b.attn.new_state(device) for b in blocks])

    @staticmethod
    def _slices(states: Sequence[SequenceState], seq_lens: Sequence[int], layer: int) -> list[SeqSlice]:
        out, start = [], 0
        for st, n in zip(states, seq_lens, strict=True):
            out.append(SeqSlice(start, n, st.layers[layer]))
            start += n
        return out

    @staticmethod
    def positions_for(states: Sequence[SequenceState], seq_lens: Sequence[int], layer: int = 0) -> torch.Tensor:
        """Positions of the new tokens: each sequence continues where its cache ends."""
        return torch.cat([torch.arange(st.layers[layer].num_tokens, st.layers[layer].num_tokens + n)
                          for st, n in zip(states, seq_lens, strict=True)])

    # ---- forward --------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, states: Sequence[SequenceState],
                seq_lens: Sequence[int]) -> torch.Tensor:
        """input_ids [T] (sequences packed back to back, seq_lens new tokens each) -> h [T, hc, D].

        Appends the tokens to each sequence's state. Logits: `compute_logits(h)`.
        """
        device = self.embed.weight.device
        input_ids = input_ids.to(device)
        positions = self.positions_for(states, seq_lens).to(device)
        h = self.embed(input_ids).unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()  # [T, hc, D]
        for i, block in enumerate(self.layers):
            h = block(h, input_ids, positions, self._slices(states, seq_lens, i))
        return h

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
    _EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")

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
            if pname.endswith(("experts.w1", "experts.w2", "experts.w3")) or pname.endswith("freqs") \
                    or pname.endswith(".g2l"):
                continue
            names.add(self._official_name(pname))
        prefixes = [f"layers.{i}" for i in range(self.cfg.num_hidden_layers)]
        prefixes += [f"mtp.{i}" for i in range(len(self.mtp))]
        for p in prefixes:
            for e in self.local_experts:
                names.update(f"{p}.ffn.experts.{e}.{w}.weight" for w in ("w1", "w2", "w3"))
        return names

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
        """Copy (official name, dequantized tensor) pairs into the model; every expected tensor must come.

        Routed experts outside `local_experts` are ignored (a rank loads only its own).
        """
        params = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        missing = self.expected_weights()
        for name, tensor in weights:
            m = self._EXPERT.match(name)
            if m:
                prefix, e, w = m.group(1), int(m.group(2)), m.group(3)
                stacked = params[self._param_name(prefix) + "." + w]
                local = self.local_experts.index(e) if e in self.local_experts else -1
                if local < 0:
                    continue
                target = stacked[local]
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
