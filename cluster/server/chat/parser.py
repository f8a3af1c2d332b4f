"""Model output -> reasoning, content and tool calls, incrementally (one parser per choice).

V4 writes, after a thinking-mode generation prompt, `{reasoning}</think>{answer}` and, when it calls tools,
`{answer}\\n\\n<｜DSML｜tool_calls>\\n<｜DSML｜invoke name="f">\\n<｜DSML｜parameter name="k" string="true|false">v
</｜DSML｜parameter>\\n</｜DSML｜invoke>\\n</｜DSML｜tool_calls>` before eos (cluster/server/chat/encoding.py).

`push(text)` takes the next piece of decoded text and returns what became certain, as `Piece`s of one
kind each: reasoning text, content text, or one whole tool call. Text that might be the start of a marker
(`</think>`, the tool-calls block) is held back until it is known. A tool call is emitted as soon as its
`</｜DSML｜invoke>` closes, with its arguments as a JSON object string (string parameters as JSON strings,
the others' JSON text as written). Anything in the tool-calls block that does not parse (bad JSON, a
missing close, stray text) ends tool parsing: that raw text, and everything after it, is content. The
calls already emitted stand. The same parser shapes full responses (all text, then `finish()`), so a
streamed and a full response of the same output agree.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from cluster.server.chat.encoding import (
    INVOKE_END,
    INVOKE_START,
    PARAMETER_END,
    PARAMETER_START,
    TOOL_CALLS_END,
    TOOL_CALLS_START,
    to_json,
)
from engine.weights.tokenizer import THINK_END

_BEFORE_TOOLS = "\n\n"  # the encoding separates an answer from its tool calls by a blank line
_INVOKE_HEAD = re.compile(re.escape(INVOKE_START) + r' name="([^"\n]+)">')
_PARAMETER = re.compile(r'\s*' + re.escape(PARAMETER_START) + r' name="([^"\n]+)" string="(true|false)">(.*?)'
                        + re.escape(PARAMETER_END), re.S)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class Piece:
    kind: str  # "reasoning" | "content" | "tool_call"
    text: str = ""
    call: ToolCall | None = None


class MalformedToolCall(ValueError):
    pass


def parse_invoke(block: str) -> tuple[str, str]:
    """(name, JSON arguments) of one `<｜DSML｜invoke ...>...</｜DSML｜invoke>` block, or MalformedToolCall."""
    head = _INVOKE_HEAD.match(block)
    if head is None:
        raise MalformedToolCall(f"bad invoke header in {block[:80]!r}")
    body, pos, args = block[:-len(INVOKE_END)], head.end(), {}
    while (m := _PARAMETER.match(body, pos)) is not None:
        name, is_string, value = m.groups()
        if name in args:
            raise MalformedToolCall(f"parameter {name!r} given twice")
        if is_string == "true":
            args[name] = to_json(value)
        else:
            try:
                json.loads(value)
            except ValueError:
                raise MalformedToolCall(f"parameter {name!r} is not valid JSON: {value[:80]!r}") from None
            args[name] = value.strip()
        pos = m.end()
    if body[pos:].strip():
        raise MalformedToolCall(f"unexpected text in invoke: {body[pos:pos + 80]!r}")
    return head.group(1), "{" + ", ".join(f"{to_json(k)}: {v}" for k, v in args.items()) + "}"


def _held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`."""
    for k in range(min(len(text), max(len(m) for m in markers) - 1), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) and len(m) > k for m in markers):
            return k
    return 0


class ChatOutputParser:
    """Splits one choice's output text; `thinking`: the output starts with reasoning; `parse_tools`: the
    DSML tool-calls block is parsed (tools given and tool_choice not "none")."""

    def __init__(self, thinking: bool, parse_tools: bool) -> None:
        self.parse_tools = parse_tools
        self.state = "reasoning" if thinking else "content"
        self.buf = ""
        self.block_start = ""  # the marker text that opened the tool-calls block (content if nothing parses)
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> list[Piece]:
        self.buf += text
        out: list[Piece] = []
        while True:
            before = (self.state, len(self.buf))
            getattr(self, f"_{self.state}")(out, final=False)
            if (self.state, len(self.buf)) == before or not self.buf:
                return out

    def finish(self) -> list[Piece]:
        """The output ended: whatever is held back is settled (an open tool-calls block becomes content)."""
        out = self.push("")
        getattr(self, f"_{self.state}")(out, final=True)
        return out

    # ---------------- states ----------------
    def _emit(self, out: list[Piece], kind: str, text: str) -> None:
        if text:
            if out and out[-1].kind == kind and kind != "tool_call":
                out[-1] = Piece(kind, out[-1].text + text)
            else:
                out.append(Piece(kind, text))

    def _reasoning(self, out: list[Piece], final: bool) -> None:
        i = self.buf.find(THINK_END)
        if i >= 0:
            self._emit(out, "reasoning", self.buf[:i])
            self.buf, self.state = self.buf[i + len(THINK_END):], "content"
            return
        keep = 0 if final else _held(self.buf, (THINK_END,))
        self._emit(out, "reasoning", self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]

    def _content(self, out: list[Piece], final: bool) -> None:
        if self.parse_tools:
            i = self.buf.find(TOOL_CALLS_START)
            if i >= 0:
                text = self.buf[:i]
                sep = _BEFORE_TOOLS if text.endswith(_BEFORE_TOOLS) else ""
                self._emit(out, "content", text[:len(text) - len(sep)])
                self.block_start = sep + TOOL_CALLS_START
                self.buf, self.state = self.buf[i + len(TOOL_CALLS_START):], "tools"
                return
        keep = 0 if final or not self.parse_tools else _held(self.buf, (_BEFORE_TOOLS + TOOL_CALLS_START,))
        self._emit(out, "content", self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]

    def _plain(self, out: list[Piece], final: bool) -> None:
        self._emit(out, "content", self.buf)
        self.buf = ""

    def _tools(self, out: list[Piece], final: bool) -> None:
        s = self.buf.lstrip()
        try:
            if s.startswith(TOOL_CALLS_END):
                self.buf, self.state = s[len(TOOL_CALLS_END):], "plain"  # text after the block: content
            elif s.startswith(INVOKE_START):
                end = s.find(INVOKE_END)
                if end < 0:
                    if final:
                        raise MalformedToolCall("the output ended inside an invoke")
                    return
                block = s[:end + len(INVOKE_END)]
                name, arguments = parse_invoke(block)
                call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, arguments)
                self.calls.append(call)
                out.append(Piece("tool_call", call=call))
                self.buf = s[len(block):]
            elif s and not (INVOKE_START.startswith(s) or TOOL_CALLS_END.startswith(s)):
                raise MalformedToolCall(f"unexpected text in the tool-calls block: {s[:80]!r}")
            elif final and s:
                raise MalformedToolCall("the output ended inside the tool-calls block")
        except MalformedToolCall:
            self._emit(out, "content", ("" if self.calls else self.block_start) + self.buf)
            self.buf, self.state = "", "plain"
