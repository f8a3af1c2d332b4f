"""The test tokenizer: byte-level BPE trained deterministically on the built-in corpus.

Ids 0 and 1 are DeepSeek's `<｜begin▁of▁sentence｜>` (bos) and `<｜end▁of▁sentence｜>` (eos), then the
256 byte symbols, then the merges. The vocabulary is exactly `vocab_size` whenever the corpus offers
enough merges: true for `tiny` (512) and `small` (4096); for the real 129,280 it stops short (about
8.8k tokens), which is harmless as every id stays below the model's vocab_size.
Encoding adds no special tokens; callers prepend bos themselves.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.weights.tokenizer_corpus import corpus

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE with at most `vocab_size` tokens (exactly that many for vocab_size <= 4096)."""
    return Tokenizer.from_str(_trained_json(vocab_size))


@lru_cache(maxsize=4)
def _trained_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus()], trainer=trainer)
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
