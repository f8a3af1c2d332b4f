"""Greedy generation straight on the model (no scheduler): the reference the engine is tested against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.model.model import Transformer


@torch.inference_mode()
def greedy_generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_token_id: int | None = None) -> list[list[int]]:
    """Prefill all prompts in one packed batch, then decode them together; returns the new tokens."""
    states = [model.new_state() for _ in prompts]
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
    h = model(ids, states, lens)
    last = torch.tensor(lens).cumsum(0) - 1
    next_ids = model.compute_logits(h[last.to(h.device)]).argmax(-1).tolist()
    outs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    while live:
        still = []
        for i, tok in zip(live, next_ids, strict=True):
            outs[i].append(tok)
            if len(outs[i]) < max_new_tokens and tok != eos_token_id:
                still.append(i)
        live = still
        if not live:
            break
        ids = torch.tensor([outs[i][-1] for i in live], dtype=torch.long)
        h = model(ids, [states[i] for i in live], [1] * len(live))
        next_ids = model.compute_logits(h).argmax(-1).tolist()
    return outs
