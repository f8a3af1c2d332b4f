"""Token sampling for one decode step: logits controls, greedy, temperature, top-k, top-p, per-request seeds,
logprobs.

Logits controls first, on every row that asks for them (greedy rows too), as scheduler/sampling.py defines
them: repetition penalty, frequency and presence penalties, logit bias, then the min_tokens mask. They are
batched: per step the rows' token histories are flattened once into index tensors, counted with one
index_put (scatter-add) into a [n, V] tensor, and applied with tensor ops; no Python loop touches the
vocabulary. Rows without controls are not touched.

Order for a sampled (non-greedy) row: logits / temperature -> top-k (keep the k largest) -> top-p (the
smallest set of tokens, by descending probability, whose mass reaches top_p; always at least the top token,
computed on the top-k-renormalised distribution) -> draw. The draw is an exponential race,
`argmax(p / E)` with `E ~ Exp(1)` i.i.d. per token, which picks token i with probability p_i.

Reproducibility: a row with its own `torch.Generator` (a request with `seed`; the runner creates
`torch.Generator(device).manual_seed(seed)` once per request and passes it every step) draws its noise
from that generator alone, V values per sampled step, so its tokens do not depend on the rest of the
batch. (The probabilities are computed batched, row by row; the only cross-row coupling is the length of
the sorted prefix (max top-k in the batch), which could at most move a top-p cut whose mass lies within an
ulp of top_p.) Greedy rows consume no randomness. Rows without a generator share the sampler's own generator.

Device-agnostic: works on CPU or CUDA logits. Request generators must live on the logits' device
(`torch.Generator(device=logits.device)`); the sampler's own generators are created per device from `seed`.

Logprobs (when `params.logprobs is not None`): from `log_softmax` of the raw float32 logits (before
temperature / top-k / top-p, as vLLM's default): the sampled token's logprob and the top-`logprobs`
tokens as {token_id: logprob} (empty for 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from scheduler.sampling import SamplingParams

# Temperatures below this are treated as greedy (dividing by them would only overflow).
GREEDY_EPS = 1e-5


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [B]
    # Per row: (logprob of the sampled token, {token_id: logprob} of the top tokens), or None.
    logprobs: list[tuple[float, dict[int, float]] | None]


class Sampler:
    """Samples one token per row of a [B, V] logits tensor. `eos_token_id`: what min_tokens holds back
    (with each request's stop_token_ids)."""

    def __init__(self, seed: int = 0, eos_token_id: int | None = None) -> None:
        self.seed = seed
        self.eos_token_id = eos_token_id
        self._generators: dict[torch.device, torch.Generator] = {}

    def _default_generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[device] = g
        return g

    def __call__(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        output_token_ids: Sequence[Sequence[int]] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> SamplerOutput:
        """logits: [B, V] (float32; other float dtypes are upcast). params, generators: B entries each.
        output_token_ids / prompt_token_ids: each row's tokens so far (needed by rows with min_tokens or
        penalties; repetition_penalty also reads the prompt)."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if len(params) != batch or len(generators) != batch:
            raise ValueError(f"need one SamplingParams and one generator (or None) per row: B={batch}, "
                             f"got {len(params)} params and {len(generators)} generators")
        raw = logits.float()
        logits = self.apply_controls(raw, params, output_token_ids, prompt_token_ids)
        device = logits.device
        token_ids = torch.empty(batch, dtype=torch.long, device=device)

        greedy = [i for i, p in enumerate(params) if p.temperature < GREEDY_EPS]
        sampled = [i for i, p in enumerate(params) if p.temperature >= GREEDY_EPS]
        if greedy:
            rows = torch.tensor(greedy, device=device)
            token_ids[rows] = logits[rows].argmax(dim=-1)
        if sampled:
            rows = torch.tensor(sampled, device=device)
            probs = self._probs(logits[rows], [params[i] for i in sampled])
            noise = self._noise([generators[i] for i in sampled], vocab, device)
            token_ids[rows] = (probs / noise).argmax(dim=-1)

        ids = token_ids.tolist()
        return SamplerOutput(token_ids=ids, logprobs=self._logprobs(raw, params, ids))

    def apply_controls(self, logits: Tensor, params: Sequence[SamplingParams],
                       output_token_ids: Sequence[Sequence[int]] | None,
                       prompt_token_ids: Sequence[Sequence[int]] | None) -> Tensor:
        """[B, V] logits after the penalties, logit bias and min_tokens mask (a new tensor if any applies)."""
        penalized = [i for i, p in enumerate(params) if p.penalized]
        biased = [i for i, p in enumerate(params) if p.logit_bias]
        held = [i for i, p in enumerate(params) if p.min_tokens]
        if not (penalized or biased or held):
            return logits
        if (penalized or held) and output_token_ids is None:
            raise ValueError("min_tokens and the penalties need output_token_ids")
        device, vocab = logits.device, logits.shape[1]
        logits = logits.clone()
        if penalized:
            logits[torch.tensor(penalized, device=device)] = self._penalize(
                logits[torch.tensor(penalized, device=device)], [params[i] for i in penalized],
                [output_token_ids[i] for i in penalized],
                [prompt_token_ids[i] for i in penalized] if prompt_token_ids is not None else None)
        if biased:
            rows = [i for i in biased for _ in params[i].logit_bias]
            ids = [t for i in biased for t, _ in params[i].logit_bias]
            vals = [b for i in biased for _, b in params[i].logit_bias]
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"logit_bias token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            logits.index_put_((torch.tensor(rows, device=device), torch.tensor(ids, device=device)),
                              torch.tensor(vals, dtype=logits.dtype, device=device), accumulate=True)
        rows, ids = [], []
        for i in held:
            p = params[i]
            if len(output_token_ids[i]) < p.min_tokens:
                stops = [*p.stop_token_ids, *(() if p.ignore_eos or self.eos_token_id is None else
                                              (self.eos_token_id,))]
                rows += [i] * len(stops)
                ids += stops
        if rows:
            logits.index_put_((torch.tensor(rows, device=device), torch.tensor(ids, device=device)),
                              torch.tensor(float("-inf"), device=device))
        return logits

    @staticmethod
    def _penalize(logits: Tensor, params: Sequence[SamplingParams], outputs: Sequence[Sequence[int]],
                  prompts: Sequence[Sequence[int]] | None) -> Tensor:
        """[n, V] logits of penalized rows -> penalized (repetition, then frequency and presence)."""
        n, vocab = logits.shape
        device = logits.device
        counts = torch.zeros(n, vocab, dtype=logits.dtype, device=device)
        rows = [j for j, out in enumerate(outputs) for _ in out]
        if rows:
            ids = torch.tensor([t for out in outputs for t in out], device=device)
            counts.index_put_((torch.tensor(rows, device=device), ids), torch.ones(len(rows), device=device),
                              accumulate=True)
        rep = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype, device=device)[:, None]
        if bool((rep != 1).any()):
            seen = counts > 0
            if prompts is not None:
                prompt_rows = [j for j, pr in enumerate(prompts) for _ in pr]
                if prompt_rows:
                    seen[torch.tensor(prompt_rows, device=device),
                         torch.tensor([t for pr in prompts for t in pr], device=device)] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=device)[:, None]
        pres = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=device)[:, None]
        return logits - freq * counts - pres * (counts > 0).to(logits.dtype)

    @staticmethod
    def _probs(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
        """[n, V] logits of the sampled rows -> [n, V] probabilities after temperature, top-k, top-p."""
        n, vocab = logits.shape
        device = logits.device
        temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        logits = logits / temp[:, None]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if all(k == vocab for k in top_k) and all(p >= 1.0 for p in top_p):
            return torch.softmax(logits, dim=-1)

        # Only the max(top_k) largest can survive: a partial sort when every row has a top-k.
        k_max = max(top_k)
        if k_max < vocab:
            sorted_logits, order = logits.topk(k_max, dim=-1, sorted=True)
        else:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(sorted_logits.shape[-1], device=device)[None, :]
        k = torch.tensor(top_k, device=device)[:, None]
        sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        p = torch.tensor(top_p, dtype=torch.float32, device=device)[:, None]
        drop = (mass_before >= p) & (p < 1.0)
        drop[:, 0] = False  # the top token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        masked = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.softmax(masked, dim=-1)

    def _noise(self, generators: Sequence[torch.Generator | None], vocab: int, device: torch.device) -> Tensor:
        """[n, V] Exp(1) noise: each seeded row from its own generator, the others from the sampler's."""
        noise = torch.empty(len(generators), vocab, dtype=torch.float32, device=device)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            block = torch.empty(len(unseeded), vocab, dtype=torch.float32, device=device)
            block.exponential_(generator=self._default_generator(device))
            noise[torch.tensor(unseeded, device=device)] = block
        for i, g in enumerate(generators):
            if g is not None:  # a standalone [V] draw, so the values depend only on g's state
                noise[i] = torch.empty(vocab, dtype=torch.float32, device=device).exponential_(generator=g)
        # Exp(1) may return exactly 0 in principle; p / 0 would give inf/nan.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    @staticmethod
    def _logprobs(
        logits: Tensor, params: Sequence[SamplingParams], token_ids: list[int]
    ) -> list[tuple[float, dict[int, float]] | None]:
        out: list[tuple[float, dict[int, float]] | None] = [None] * len(params)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not wanted:
            return out
        device = logits.device
        rows = torch.tensor(wanted, device=device)
        logp = torch.log_softmax(logits[rows], dim=-1)  # [n, V]
        chosen = logp.gather(-1, torch.tensor([token_ids[i] for i in wanted], device=device)[:, None])[:, 0]
        n_top = min(max(params[i].logprobs for i in wanted), logits.shape[1])
        top_vals, top_ids = logp.topk(n_top, dim=-1) if n_top else (None, None)
        chosen_l = chosen.tolist()
        top_vals_l = top_vals.tolist() if top_vals is not None else None
        top_ids_l = top_ids.tolist() if top_ids is not None else None
        for j, i in enumerate(wanted):
            k = min(params[i].logprobs, n_top)
            top = {} if k == 0 else dict(zip(top_ids_l[j][:k], top_vals_l[j][:k]))
            out[i] = (chosen_l[j], top)
        return out
