"""An OpenAI chat request -> the V4 prompt and how to read the output.

Fields read here: `messages` (roles system, developer, user, assistant, tool; assistant `tool_calls` and
`reasoning_content`; tool `tool_call_id`), `tools` (function tools), `tool_choice` ("auto", "none",
"required", {"type": "function", "function": {"name": ...}}), `chat_template_kwargs.thinking` (vLLM's
switch; default on, as DeepSeek's API serves V4), `reasoning_effort` ("max" adds the encoding's
maximum-effort preamble; "low", "medium", "high" are plain thinking).

Tool definitions are added to the first system message (one with empty content is put first when there is
none). `tool_choice` "required" and a named function have no constrained decoding behind them here:
the tool-calls block is written into the output for the model (`ChatFormat.forced_prefix`: the block's
opening and, for a named function, its invoke header), after the reasoning in thinking mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from cluster.server.chat.encoding import INVOKE_START, TOOL_CALLS_START, encode_messages
from cluster.server.errors import bad_request
from engine.weights.tokenizer import THINK_END

ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_THINKING = True
EFFORTS = {"low": None, "medium": None, "high": "high", "max": "max"}


@dataclass(frozen=True)
class ChatFormat:
    """How a chat request's output is read (cluster/server/chat/parser.py) and steered."""

    thinking: bool
    parse_tools: bool
    forced_prefix: str = ""  # written after the reasoning (thinking) or at once, for tool_choice required/named
    forced_prefix_ids: tuple[int, ...] = ()
    think_end_id: int | None = None  # thinking + forced prefix: the first leg stops at this token


def _text(content: Any, where: str, allow_none: bool = False) -> str:
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}[{j}] must be {{'type': 'text', 'text': str}} (only text parts are "
                                  f"supported)", where)
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"{where} must be a string or a list of text parts, got {type(content).__name__}", where)


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise bad_request(f"{where} must be a list", where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"{where}[{j}] must be {{'type': 'function', 'function': {{'name': str, "
                              f"'arguments': str}}}}", f"{where}[{j}]")
        args = fn.get("arguments", "{}")
        if not isinstance(args, (str, dict)):
            raise bad_request(f"{where}[{j}].function.arguments must be a JSON string", f"{where}[{j}]")
        out.append({"id": call.get("id") or "", "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def chat_messages(messages: Any) -> list[dict]:
    """Validated messages in the shape the encoding takes."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{where} must be an object, got {type(msg).__name__}", where)
        role = msg.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {list(ROLES)}, got {role!r}", f"{where}.role")
        m: dict[str, Any] = {"role": role}
        if role == "assistant":
            m["content"] = _text(msg.get("content"), f"{where}.content", allow_none=True)
            if msg.get("tool_calls"):
                m["tool_calls"] = _tool_calls(msg["tool_calls"], f"{where}.tool_calls")
            reasoning = msg.get("reasoning_content")
            if reasoning is not None:
                m["reasoning_content"] = _text(reasoning, f"{where}.reasoning_content")
        elif role == "tool":
            m["content"] = _text(msg.get("content"), f"{where}.content")
            m["tool_call_id"] = str(msg.get("tool_call_id") or "")
        else:
            m["content"] = _text(msg.get("content"), f"{where}.content")
        out.append(m)
    if all(m["role"] in ("system",) for m in out):
        raise bad_request("messages must contain at least one user, developer, assistant or tool message",
                          "messages")
    return out


def _tools(tools: Any) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("tools must be a list", "tools")
    out = []
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{j}] must be {{'type': 'function', 'function': {{'name': str, ...}}}}",
                              "tools")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad_request(f"tools[{j}].function.parameters must be a JSON schema object", "tools")
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, tools: list[dict]) -> tuple[str, str | None]:
    """("auto" | "none" | "required" | "named", name)."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise bad_request("tool_choice 'required' needs tools", "tool_choice")
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        names = [t["function"]["name"] for t in tools]
        if name not in names:
            raise bad_request(f"tool_choice names function {name!r}, which is not among the tools {names}",
                              "tool_choice")
        return "named", name
    raise bad_request("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                      "{'name': ...}}", "tool_choice")


def _thinking(body: dict) -> bool:
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return DEFAULT_THINKING
    if not isinstance(kwargs, dict):
        raise bad_request("chat_template_kwargs must be an object", "chat_template_kwargs")
    for key in ("thinking", "enable_thinking"):  # vLLM's V4 switch and the common alias
        if key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise bad_request(f"chat_template_kwargs.{key} must be a boolean", "chat_template_kwargs")
            return kwargs[key]
    return DEFAULT_THINKING


def build_chat_prompt(body: dict, tokenizer: Tokenizer) -> tuple[list[int], ChatFormat]:
    """Prompt token ids and output format of a chat request body (APIError 400 naming the bad field)."""
    messages = chat_messages(body.get("messages"))
    tools = _tools(body.get("tools"))
    choice, name = _tool_choice(body.get("tool_choice"), tools)
    thinking = _thinking(body)
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise bad_request(f"reasoning_effort must be one of {list(EFFORTS)}, got {effort!r}", "reasoning_effort")
    if tools:
        first = next((i for i, m in enumerate(messages) if m["role"] == "system"), None)
        if first is None:
            messages.insert(0, {"role": "system", "content": ""})
            first = 0
        messages[first]["tools"] = tools
    last = messages[-1]["role"]
    if last == "assistant" and choice in ("required", "named"):
        raise bad_request("tool_choice 'required' or a named function needs a conversation that ends with a user "
                          "or tool message", "tool_choice")
    prompt = encode_messages(messages, thinking, reasoning_effort=EFFORTS[effort] if effort else None)
    if last == "assistant":  # continue the final assistant message: no eos after it
        if not prompt.pieces or not prompt.pieces[-1][1]:
            raise bad_request("cannot continue the final assistant message", "messages")
        prompt.pieces.pop()
    ids = prompt.token_ids(tokenizer)
    prefix = ""
    if choice == "named":
        prefix = f'\n\n{TOOL_CALLS_START}\n{INVOKE_START} name="{name}">\n'
    elif choice == "required":
        prefix = f'\n\n{TOOL_CALLS_START}\n{INVOKE_START} name="'
    prefix_ids: tuple[int, ...] = ()
    if prefix:
        prefix_ids = tuple(tokenizer.encode(prefix, add_special_tokens=False).ids)
    fmt = ChatFormat(thinking=thinking and last != "assistant", parse_tools=choice != "none", forced_prefix=prefix,
                     forced_prefix_ids=prefix_ids,
                     think_end_id=tokenizer.token_to_id(THINK_END) if prefix and thinking else None)
    return ids, fmt
