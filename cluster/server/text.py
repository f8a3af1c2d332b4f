"""Token ids -> text for a stream of deltas: incremental detokenization and stop strings.

Decoding is incremental (vLLM's prefix/read offsets): only the last few tokens are decoded per delta, and
text that ends in an incomplete UTF-8 sequence is held back until the next token completes it.

Stop strings are matched on the text; the output is cut right before the first match (the stop string
itself is not returned, as in OpenAI's API). Text that might be the beginning of a stop string is held
back until it is known not to be, so a streamed client never sees text that is later cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only); cut at the stop string once stopped
        self.sent = 0  # characters of `text` handed out
        self.stopped = False  # a stop string matched
        self.num_tokens_at_stop: int | None = None  # tokens consumed up to the one that completed the stop
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Append tokens; returns the text that became safe to hand out ("" while held back or stopped)."""
        if self.stopped:
            return ""
        self.token_ids.extend(int(t) for t in new_token_ids)
        prefix_text = self._decode(self.token_ids[self._prefix:self._read])
        new_text = self._decode(self.token_ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            start = len(self.text)
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.token_ids)
            if self.stop and self._cut(start):
                return self._take(len(self.text))
        return self._take(len(self.text) - self._held())

    def finish(self) -> str:
        """The request ended: hand out whatever was held back."""
        if not self.stopped and self._read < len(self.token_ids):
            known = self._decode(self.token_ids[self._prefix:self._read])
            tail = self._decode(self.token_ids[self._prefix:])[len(known):]
            start = len(self.text)
            self.text += tail
            self._read = len(self.token_ids)
            if self.stop:
                self._cut(start)
        return self._take(len(self.text))

    def _cut(self, start: int) -> bool:
        """Look for a stop string overlapping text[start:]; cut there. True if one matched."""
        lo = max(0, start - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.stopped = True
        self.num_tokens_at_stop = len(self.token_ids)
        return True

    def _held(self) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        if not self.stop:
            return 0
        tail = self.text[-(self._max_stop - 1):] if self._max_stop > 1 else ""
        for k in range(len(tail), 0, -1):
            piece = tail[-k:]
            if any(s.startswith(piece) and len(s) > k for s in self.stop):
                return k
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        out = self.text[self.sent:end]
        self.sent = end
        return out
