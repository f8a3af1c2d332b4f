"""One chat choice's output as OpenAI JSON: the message of a full response, the deltas of a stream.

Both feed the same ChatOutputParser, so they agree. A delta carries one kind only: `reasoning_content`,
`content`, or `tool_calls` (one whole call per delta, `index` counting the choice's calls). The finish
reason is "tool_calls" when the model called a tool and stopped by itself (eos), as OpenAI reports it.
"""

from __future__ import annotations

from typing import Any

from cluster.server.chat.parser import ChatOutputParser, Piece, ToolCall
from cluster.server.chat.request import ChatFormat


class ChatChoice:
    def __init__(self, fmt: ChatFormat) -> None:
        self.fmt = fmt
        self.parser = ChatOutputParser(fmt.thinking, fmt.parse_tools)
        self.reasoning = ""
        self.content = ""
        self.calls: list[ToolCall] = []

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
                self.calls.append(p.call)
        return pieces

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def delta(self, piece: Piece) -> dict[str, Any]:
        if piece.kind == "reasoning":
            return {"reasoning_content": piece.text}
        if piece.kind == "content":
            return {"content": piece.text}
        assert piece.call is not None
        return {"tool_calls": [piece.call.to_openai(index=self.calls.index(piece.call))]}

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content if self.content or not self.calls
                               else None}
        if self.fmt.thinking:
            msg["reasoning_content"] = self.reasoning
        if self.calls:
            msg["tool_calls"] = [c.to_openai() for c in self.calls]
        return msg
