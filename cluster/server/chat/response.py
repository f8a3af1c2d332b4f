"""One chat choice's output as OpenAI JSON: the message of a full response, the deltas of a stream.

Both feed the same ChatOutputParser, so they agree. A delta carries one kind only: `reasoning_content`,
`content`, or `tool_calls` (one call's delta: its first with index, id, type and name, then arguments
fragments by index). A full message lists the complete calls. The finish reason is "tool_calls" when the
model completed a call and stopped by itself (eos), as OpenAI reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.server.chat.parser import ChatOutputParser, Piece
from cluster.server.chat.request import ChatFormat


@dataclass
class _Call:
    id: str
    name: str
    arguments: str = ""
    done: bool = False


class ChatChoice:
    def __init__(self, fmt: ChatFormat) -> None:
        self.fmt = fmt
        self.parser = ChatOutputParser(fmt.thinking, fmt.parse_tools)
        self.reasoning = ""
        self.content = ""
        self.calls: list[_Call] = []

    def feed(self, text: str, final: bool = False) -> list[Piece]:
        """Text of the choice's next tokens (`final`: the choice ended) -> the settled pieces."""
        pieces = self.parser.push(text)
        if final:
            pieces += self.parser.finish()
        for p in pieces:
            if p.kind == "reasoning":
                self.reasoning += p.text
            elif p.kind == "content":
                self.content += p.text
            else:
                assert p.call is not None
                if p.call.id is not None:
                    self.calls.append(_Call(p.call.id, p.call.name or ""))
                call = self.calls[p.call.index]
                call.arguments += p.call.arguments
                call.done = p.call.done
        return pieces

    @property
    def complete_calls(self) -> list[_Call]:
        return [c for c in self.calls if c.done]

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.complete_calls and reason == "stop" else reason

    @staticmethod
    def delta(piece: Piece) -> dict[str, Any]:
        if piece.kind == "reasoning":
            return {"reasoning_content": piece.text}
        if piece.kind == "content":
            return {"content": piece.text}
        d = piece.call
        assert d is not None
        if d.id is not None:
            call = {"index": d.index, "id": d.id, "type": "function",
                    "function": {"name": d.name, "arguments": d.arguments}}
        else:
            call = {"index": d.index, "function": {"arguments": d.arguments}}
        return {"tool_calls": [call]}

    def message(self) -> dict[str, Any]:
        calls = self.complete_calls
        msg: dict[str, Any] = {"role": "assistant", "content": self.content if self.content or not calls else None}
        if self.fmt.thinking:
            msg["reasoning_content"] = self.reasoning
        if calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name,
                                                                                "arguments": c.arguments}}
                                 for c in calls]
        return msg
