"""The test tokenizer: byte-level BPE trained deterministically on the built-in corpus.

Ids 0 and 1 are DeepSeek's `<｜begin▁of▁sentence｜>` (bos) and `<｜end▁of▁sentence｜>` (eos) (the ids
docs/v4-model.md gives), then the 256 byte symbols, then the merges, then V4's chat tokens
(`CHAT_TOKENS`: role markers, thinking markers, the DSML marker, quick-instruction task tokens) as added
tokens at the top of the vocabulary, so every chat marker is one id (their ids in the official tokenizer
are not documented here; ours are `vocab_size - len(CHAT_TOKENS)` upwards). The vocabulary is exactly
`vocab_size` whenever the corpus offers enough merges: true for `tiny` (512) and `small` (4096); for the
real 129,280 it stops short (about 8.8k tokens), which is harmless as every id stays below the model's
vocab_size.

Markers that the chat output parsers must see in decoded text (`<think>`, `</think>`, `｜DSML｜`) are
added as non-special tokens, so `decode(..., skip_special_tokens=True)` keeps them; bos, eos and the
role/task markers are special. Encoding adds no special tokens; callers prepend bos themselves.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.weights.tokenizer_corpus import corpus

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
LATEST_REMINDER_TOKEN = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML_TOKEN = "｜DSML｜"
TASK_TOKENS = {"action": "<｜action｜>", "query": "<｜query｜>", "authority": "<｜authority｜>",
               "domain": "<｜domain｜>", "title": "<｜title｜>", "read_url": "<｜read_url｜>"}
TEXT_MARKERS = (THINK_START, THINK_END, DSML_TOKEN)  # kept by skip_special_tokens decoding
CHAT_TOKENS = (USER_TOKEN, ASSISTANT_TOKEN, LATEST_REMINDER_TOKEN, *TASK_TOKENS.values(), *TEXT_MARKERS)
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE with at most `vocab_size` tokens (exactly that many for vocab_size <= 4096), V4's
    chat tokens the last `len(CHAT_TOKENS)` of them."""
    return Tokenizer.from_str(_trained_json(vocab_size))


@lru_cache(maxsize=4)
def _trained_json(vocab_size: int) -> str:
    base = vocab_size - len(CHAT_TOKENS)
    if base < 258:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for bos/eos, 256 bytes and "
                         f"{len(CHAT_TOKENS)} chat tokens (needs >= {258 + len(CHAT_TOKENS)})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base,
        min_frequency=1,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus()], trainer=trainer)
    tok.add_tokens([AddedToken(t, special=t not in TEXT_MARKERS, normalized=False) for t in CHAT_TOKENS])
    return tok.to_str()


def tokenizer_config() -> dict:
    """The `tokenizer_config.json` contents (names bos/eos, as transformers reads them)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir`."""
    out = Path(out_dir)
    tok.save(str(out / TOKENIZER_FILE))
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """`model_dir/tokenizer.json` as a `tokenizers.Tokenizer`."""
    return Tokenizer.from_file(str(Path(model_dir) / TOKENIZER_FILE))
