"""Model output -> reasoning, content and tool calls, incrementally (one parser per choice).

V4 writes, after a thinking-mode generation prompt, `{reasoning}</think>{answer}` and, when it calls tools,
`{answer}\\n\\n<｜DSML｜tool_calls>\\n<｜DSML｜invoke name="f">\\n<｜DSML｜parameter name="k" string="true|false">v
</｜DSML｜parameter>\\n</｜DSML｜invoke>\\n</｜DSML｜tool_calls>` before eos (cluster/server/chat/encoding.py).

`push(text)` takes the next piece of decoded text and returns what became certain, as `Piece`s of one
kind each: reasoning text, content text, or a tool-call delta. Text that might be the start of a marker
(`</think>`, the tool-calls block) is held back until it is known. Tool calls stream as the block is
written: a call's first delta (index, id, name) as soon as its invoke header is complete, then one
arguments fragment per parameter as each `</｜DSML｜parameter>` closes, then the closing `}` with the
invoke's close; the fragments concatenate to a JSON object (string parameters as JSON strings, the
others' JSON text as written). Anything in the tool-calls block that does not parse (bad JSON, a stray
text, the output ending inside the block) ends tool parsing: the raw text since the last complete call,
and everything after it, is content. Complete calls stand; an unfinished one is left out of a full
response (a stream has already sent its first deltas). The same parser shapes full responses (all text,
then `finish()`), so a streamed and a full response of the same output agree.
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
class ToolCallDelta:
    index: int  # the call's position among the choice's calls
    id: str | None  # the first delta of a call: its id and name, arguments ""
    name: str | None
    arguments: str  # the next fragment of the JSON arguments
    done: bool = False  # the invoke closed: the arguments are complete


@dataclass(frozen=True)
class Piece:
    kind: str  # "reasoning" | "content" | "tool_call"
    text: str = ""
    call: ToolCallDelta | None = None


class MalformedToolCall(ValueError):
    pass


def parameter_json(name: str, is_string: str, value: str) -> str:
    """One parameter as a JSON object member, or MalformedToolCall."""
    if is_string == "true":
        return f"{to_json(name)}: {to_json(value)}"
    try:
        json.loads(value)
    except ValueError:
        raise MalformedToolCall(f"parameter {name!r} is not valid JSON: {value[:80]!r}") from None
    return f"{to_json(name)}: {value.strip()}"


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
        self.unsettled = ""  # raw block text since the last complete call: content if the rest does not parse
        self.num_calls = 0
        self.num_params = 0  # of the open invoke
        self.param_names: set[str] = set()

    def push(self, text: str) -> list[Piece]:
        self.buf += text
        out: list[Piece] = []
        while True:
            before = (self.state, len(self.buf))
            getattr(self, f"_{self.state}")(out, final=False)
            if (self.state, len(self.buf)) == before or not self.buf:
                return out

    def finish(self) -> list[Piece]:
        """The output ended: whatever is held back is settled (an unfinished tool-calls block becomes content)."""
        out = self.push("")
        getattr(self, f"_{self.state}")(out, final=True)
        if self.state == "invoke":  # the output ended inside an invoke
            self._malformed(out)
        return out

    # ---------------- states ----------------
    def _emit(self, out: list[Piece], kind: str, text: str) -> None:
        if text:
            if out and out[-1].kind == kind:
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
                self.unsettled = sep + TOOL_CALLS_START
                self.buf, self.state = self.buf[i + len(TOOL_CALLS_START):], "tools"
                return
        keep = 0 if final or not self.parse_tools else _held(self.buf, (_BEFORE_TOOLS + TOOL_CALLS_START,))
        self._emit(out, "content", self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]

    def _plain(self, out: list[Piece], final: bool) -> None:
        self._emit(out, "content", self.buf)
        self.buf = ""

    def _consume(self, n: int) -> None:
        self.unsettled += self.buf[:n]
        self.buf = self.buf[n:]

    def _malformed(self, out: list[Piece]) -> None:
        self._emit(out, "content", self.unsettled + self.buf)
        self.buf, self.unsettled, self.state = "", "", "plain"

    def _tools(self, out: list[Piece], final: bool) -> None:
        """Between invokes: the next invoke's header, or the block's end."""
        s = self.buf.lstrip()
        ws = len(self.buf) - len(s)
        if s.startswith(TOOL_CALLS_END):
            self.buf, self.unsettled, self.state = s[len(TOOL_CALLS_END):], "", "plain"  # text after it: content
        elif s.startswith(INVOKE_START):
            head = _INVOKE_HEAD.match(s)
            if head is None:
                if final or ">" in s or "\n" in s:
                    self._malformed(out)
                return
            out.append(Piece("tool_call", call=ToolCallDelta(self.num_calls, f"call_{uuid.uuid4().hex[:24]}",
                                                             head.group(1), "")))
            self.num_params, self.param_names = 0, set()
            self._consume(ws + head.end())
            self.state = "invoke"
        elif (s and not (INVOKE_START.startswith(s) or TOOL_CALLS_END.startswith(s))) or (final and s):
            self._malformed(out)

    def _invoke(self, out: list[Piece], final: bool) -> None:
        """Inside an invoke: the next parameter, or the invoke's end."""
        s = self.buf.lstrip()
        ws = len(self.buf) - len(s)
        try:
            if s.startswith(INVOKE_END):
                out.append(Piece("tool_call", call=ToolCallDelta(self.num_calls, None, None,
                                                                 "}" if self.num_params else "{}", done=True)))
                self.num_calls += 1
                self.buf, self.unsettled, self.state = s[len(INVOKE_END):], "", "tools"
            elif s.startswith(PARAMETER_START):
                end = s.find(PARAMETER_END)
                if end < 0:
                    if final:
                        raise MalformedToolCall("the output ended inside a parameter")
                    return
                m = _PARAMETER.match(s)
                if m is None or m.end() != end + len(PARAMETER_END):
                    raise MalformedToolCall(f"bad parameter {s[:end + len(PARAMETER_END)][:80]!r}")
                name, is_string, value = m.groups()
                if name in self.param_names:
                    raise MalformedToolCall(f"parameter {name!r} given twice")
                member = parameter_json(name, is_string, value)
                out.append(Piece("tool_call", call=ToolCallDelta(self.num_calls, None, None,
                                                                 ("{" if not self.num_params else ", ") + member)))
                self.num_params += 1
                self.param_names.add(name)
                self._consume(ws + m.end())
            elif (s and not (PARAMETER_START.startswith(s) or INVOKE_END.startswith(s))) or (final and s):
                raise MalformedToolCall(f"unexpected text in an invoke: {s[:80]!r}")
        except MalformedToolCall:
            self._malformed(out)
