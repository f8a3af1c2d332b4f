"""Request specs for the load generator: `random`, `sharegpt` (vLLM's filters) and timed `trace` replay.

Every dataset yields `RequestSpec(prompt, prompt_len, output_len, send_time)`. `prompt` is a string, or a list of
token ids when the server accepts them (`/v1/completions` with `--random-token-ids`). Without a tokenizer, text
lengths are counted with `approx_token_count` (about 4 characters per token); pass `count_tokens` to do better.
With the server's tokenizer (`--tokenizer`), `random` and `trace` prompts are random non-special token ids decoded
to text and adjusted until the text re-encodes to the target length, as vLLM's random dataset does.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Lowercase words: one word plus its leading space is one token in most BPE vocabularies.
_WORDS = ("the of and to in is was for on as with by at from that this are be or an it not have has but which "
          "time year people way day man thing woman life child world school state family student group country "
          "problem hand part place case week company system program question work number night point home water "
          "room mother area money story fact month lot right study book eye job word business issue side kind head "
          "house service friend father power hour game line end member law car city community name president team "
          "minute idea kid body information back parent face others level office door health person art war "
          "history party result change morning reason research girl guy moment air teacher force education").split()


@dataclass(frozen=True)
class RequestSpec:
    prompt: str | list[int]
    prompt_len: int
    output_len: int
    send_time: float | None = None  # seconds after the start (trace replay); None: the arrival process decides


def approx_token_count(text: str) -> int:
    """A tokenizer-free estimate: about 4 characters per token (at least 1 for non-empty text)."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def range_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """vLLM's `--random-range-ratio r`: lengths uniform over integers in [floor(L(1-r)), ceil(L(1+r))]; r=0 fixes L."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random range ratio must be in [0, 1), got {range_ratio}")
    return math.floor(length * (1 - range_ratio)), math.ceil(length * (1 + range_ratio))


def tokenizer_prompt(tokenizer, length: int, rng: random.Random, max_retry: int = 10) -> tuple[str, int]:
    """Text of random non-special tokens that re-encodes (without special tokens) to `length` tokens.

    Decoding then re-encoding may merge or split tokens, so the ids are re-encoded and truncated or topped up with
    fresh random ids up to `max_retry` times. Returns (text, its token count), the count exact unless the
    retries ran out (then off by a few tokens, as in vLLM).
    """
    special = set(tokenizer.get_added_tokens_decoder())
    vocab = tokenizer.get_vocab_size()

    def draw(n: int) -> list[int]:
        out = []
        while len(out) < n:
            if (t := rng.randrange(vocab)) not in special:
                out.append(t)
        return out

    ids = draw(length)
    for _ in range(max_retry):
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) == length:
            return text, length
        ids = ids[:length] if len(ids) > length else ids + draw(length - len(ids))
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False).ids)


def _prompt(n_in: int, rng: random.Random, token_ids: bool, vocab_size: int, tokenizer) -> tuple[str | list[int], int]:
    if token_ids:
        return [rng.randrange(100, vocab_size) for _ in range(n_in)], n_in  # low ids: specials
    if tokenizer is not None:
        return tokenizer_prompt(tokenizer, n_in, rng)
    return "".join(" " + rng.choice(_WORDS) for _ in range(n_in)).lstrip(), n_in


def random_dataset(num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0,
                   token_ids: bool = False, vocab_size: int = 32000, tokenizer=None) -> list[RequestSpec]:
    """`random`: input/output lengths uniform in vLLM's range; prompts of random words, of random token ids, or
    (with a `tokenizers.Tokenizer`) of text that encodes to exactly the input length."""
    for name, value in (("--num-prompts", num_prompts), ("--random-input-len", input_len),
                        ("--random-output-len", output_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    rng = random.Random(seed)
    in_lo, in_hi = range_bounds(input_len, range_ratio)
    out_lo, out_hi = range_bounds(output_len, range_ratio)
    out_lo = max(out_lo, 1)
    specs = []
    for _ in range(num_prompts):
        n_in = rng.randint(in_lo, in_hi)
        n_out = rng.randint(out_lo, max(out_hi, out_lo))
        prompt, n_tok = _prompt(n_in, rng, token_ids, vocab_size, tokenizer)
        specs.append(RequestSpec(prompt, n_tok, n_out))
    return specs


def sharegpt_dataset(path: str | Path, num_prompts: int, seed: int = 0, fixed_output_len: int | None = None,
                     count_tokens: Callable[[str], int] = approx_token_count) -> list[RequestSpec]:
    """`sharegpt`: first human turn = prompt, first gpt turn's length = output length; vLLM's filters.

    Dropped: fewer than 2 turns, prompt < 4 tokens, output < 4 tokens (unless `fixed_output_len`),
    prompt > 1024 tokens, prompt + output > 2048 tokens. Conversations are shuffled with `seed`.
    `sharegpt_dataset_with_drops` also says how many were dropped by which rule.
    """
    return sharegpt_dataset_with_drops(path, num_prompts, seed, fixed_output_len, count_tokens)[0]


SHAREGPT_DROPS = ("no human+gpt turns", "prompt < 4 tokens", "output < 4 tokens", "prompt > 1024 tokens",
                  "prompt + output > 2048 tokens")


def sharegpt_dataset_with_drops(path: str | Path, num_prompts: int, seed: int = 0,
                                fixed_output_len: int | None = None,
                                count_tokens: Callable[[str], int] = approx_token_count
                                ) -> tuple[list[RequestSpec], dict[str, int]]:
    """`sharegpt_dataset`, plus {rule: conversations dropped by it} over the conversations looked at (the
    filters stop once `num_prompts` prompts are found; rules are those of SHAREGPT_DROPS)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--dataset-path {path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise ValueError(f"--dataset-path {path}: a ShareGPT file is a JSON list of conversations, "
                         f"got a {type(data).__name__}")
    drops = dict.fromkeys(SHAREGPT_DROPS, 0)
    convs = []
    for entry in data:
        turns = (entry.get("conversations") or entry.get("conversation") or []) if isinstance(entry, dict) else []
        human = next((t.get("value", "") for t in turns if t.get("from") == "human"), None)
        gpt = next((t.get("value", "") for t in turns if t.get("from") == "gpt"), None)
        if len(turns) >= 2 and human is not None and gpt is not None:
            convs.append((human, gpt))
        else:
            drops["no human+gpt turns"] += 1
    random.Random(seed).shuffle(convs)
    specs = []
    for prompt, completion in convs:
        if len(specs) == num_prompts:
            break
        p_len = count_tokens(prompt)
        o_len = fixed_output_len if fixed_output_len is not None else count_tokens(completion)
        if p_len < 4:
            drops["prompt < 4 tokens"] += 1
        elif fixed_output_len is None and o_len < 4:
            drops["output < 4 tokens"] += 1
        elif p_len > 1024:
            drops["prompt > 1024 tokens"] += 1
        elif p_len + o_len > 2048:
            drops["prompt + output > 2048 tokens"] += 1
        else:
            specs.append(RequestSpec(prompt, p_len, o_len))
    return specs, drops


def trace_dataset(path: str | Path, num_prompts: int | None = None, seed: int = 0, timestamp_unit: str = "s",
                  token_ids: bool = False, vocab_size: int = 32000, tokenizer=None) -> list[RequestSpec]:
    """`trace`: JSONL lines with `timestamp`, `input_len`, `output_len` (or `input_length`/`output_length`).

    Send times are the timestamps relative to the first line, in seconds (`timestamp_unit="ms"` for
    Mooncake-style traces). Prompts are random text (or token ids) of the given input length.
    """
    scale = {"s": 1.0, "ms": 1e-3}[timestamp_unit]
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows.append((float(r["timestamp"]) * scale, int(r.get("input_len", r.get("input_length"))),
                         int(r.get("output_len", r.get("output_length")))))
    rows.sort(key=lambda r: r[0])
    if num_prompts is not None:
        rows = rows[:num_prompts]
    rng = random.Random(seed)
    t0 = rows[0][0] if rows else 0.0
    specs = []
    for ts, n_in, n_out in rows:
        prompt, n_tok = _prompt(n_in, rng, token_ids, vocab_size, tokenizer)
        specs.append(RequestSpec(prompt, n_tok, max(n_out, 1), send_time=ts - t0))
    return specs
