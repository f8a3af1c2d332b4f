"""DeepSeek-V4's prompt encoding: chat messages -> prompt text and token ids.

Follows the encoding DeepSeek publishes with the V4 checkpoints (`encoding/encoding_dsv4.py` and its README
in the model repository); this is our own implementation of the format, checked against the published
test vectors (tests/test_chat_encoding.py). The format:

    <bos>{system}[\\n\\n## Tools ...]<｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{answer}<eos>...

- Thinking mode: the generation prompt is `<｜Assistant｜><think>`; the model writes its reasoning, then
  `</think>`, then the answer. Non-thinking ("chat") mode: the generation prompt is `<｜Assistant｜></think>`.
  In thinking mode the reasoning of assistant turns before the last user turn is dropped (the turn keeps
  its answer), unless the conversation defines tools: then every turn keeps its reasoning.
- Tool definitions go in the system message (or a developer message) as a "## Tools" section listing
  one JSON schema per line. An assistant's tool calls follow its answer as a DSML block:
  `\\n\\n<｜DSML｜tool_calls>\\n<｜DSML｜invoke name="f">\\n<｜DSML｜parameter name="k" string="true">v
  </｜DSML｜parameter>\\n</｜DSML｜invoke>\\n</｜DSML｜tool_calls>` (string values raw with string="true",
  anything else as JSON with string="false").
- There is no tool role: tool results become `<tool_result>...</tool_result>` blocks of a user turn,
  in the order of the calls they answer; consecutive user turns merge, joined by a blank line.
- `latest_reminder` messages and `task` (quick-instruction) fields are part of the format and supported.

Token ids: the special markers (bos, eos, role and task markers) are inserted as ids, and the text between
them is tokenized with special tokens matched as plain text, so message content that spells a marker
cannot forge one. For content without marker strings the ids equal tokenizing the whole prompt text.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer

from engine.weights.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    DSML_TOKEN,
    EOS_TOKEN,
    LATEST_REMINDER_TOKEN,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    USER_TOKEN,
)

TOOL_CALLS_BLOCK = "tool_calls"
TOOL_CALLS_START = f"<{DSML_TOKEN}{TOOL_CALLS_BLOCK}>"
TOOL_CALLS_END = f"</{DSML_TOKEN}{TOOL_CALLS_BLOCK}>"
INVOKE_START = f"<{DSML_TOKEN}invoke"
INVOKE_END = f"</{DSML_TOKEN}invoke>"
PARAMETER_START = f"<{DSML_TOKEN}parameter"
PARAMETER_END = f"</{DSML_TOKEN}parameter>"
REASONING_EFFORTS = (None, "high", "max")

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

_TOOLS_SECTION = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"{tc_start}" block like the following:

{tc_start}
{inv} name="$TOOL_NAME">
{par} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{par_end}
...
{inv_end}
{inv} name="$TOOL_NAME2">
...
{inv_end}
{tc_end}

String parameters should be specified as is and set `string="true"`. For all other types (numbers, \
booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {think}), you MUST output your complete reasoning inside \
{think}...{think_end} BEFORE any tool calls or final response.

Otherwise, output directly after {think_end} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

_RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
_KEEP_WHEN_DROPPING = ("user", "system", "tool", "latest_reminder", "direct_search_results")
SPECIAL_MARKERS = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, LATEST_REMINDER_TOKEN, *TASK_TOKENS.values())


def to_json(value: Any) -> str:
    """JSON as the encoding writes it: `json.dumps` defaults, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


@dataclass
class ChatPrompt:
    """A prompt as pieces: `(text, is_marker)`; markers are single special tokens."""

    pieces: list[tuple[str, bool]] = field(default_factory=list)

    def add(self, text: str) -> None:
        if text:
            self.pieces.append((text, False))

    def marker(self, token: str) -> None:
        self.pieces.append((token, True))

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)

    def token_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Markers as their ids; each run of text between markers tokenized with special tokens as text."""
        ids: list[int] = []
        run: list[str] = []
        escaped = tokenizer.encode_special_tokens
        tokenizer.encode_special_tokens = True
        try:
            for text, is_marker in [*self.pieces, ("", True)]:
                if not is_marker:
                    run.append(text)
                    continue
                if run:
                    ids += tokenizer.encode("".join(run), add_special_tokens=False).ids
                    run = []
                if text:
                    tid = tokenizer.token_to_id(text)
                    if tid is None:
                        raise ValueError(f"the tokenizer has no token {text!r}: it is not a DeepSeek-V4 tokenizer")
                    ids.append(tid)
        finally:
            tokenizer.encode_special_tokens = escaped
        return ids


def render_tools(functions: list[dict]) -> str:
    """The "## Tools" section for function schemas ({"name", "description", "parameters"})."""
    return _TOOLS_SECTION.format(
        tc_start=TOOL_CALLS_START, tc_end=TOOL_CALLS_END, inv=INVOKE_START, inv_end=INVOKE_END,
        par=PARAMETER_START, par_end=PARAMETER_END, think=THINK_START, think_end=THINK_END,
        schemas="\n".join(to_json(f) for f in functions))


def render_tool_calls(tool_calls: list[dict]) -> str:
    """An assistant's tool calls (OpenAI form: {"function": {"name", "arguments"}}) as a DSML block."""
    invokes = []
    for call in tool_calls:
        fn = call.get("function", call)
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"arguments": args}
        if not isinstance(args, dict):
            args = {"arguments": args}
        params = [f'{PARAMETER_START} name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                  f'{v if isinstance(v, str) else to_json(v)}{PARAMETER_END}' for k, v in args.items()]
        invokes.append(f'{INVOKE_START} name="{fn.get("name")}">\n' + "\n".join(params) + f"\n{INVOKE_END}")
    return f"\n\n{TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


def _functions(tools: list[dict]) -> list[dict]:
    return [t["function"] if "function" in t else t for t in tools]


def merge_tool_messages(messages: list[dict]) -> list[dict]:
    """Tool results become tool_result blocks of a user turn; a user turn right after a user turn (built
    from blocks, no task) joins it."""
    merged: list[dict] = []
    for msg in messages:
        msg = copy.deepcopy(msg)
        role = msg.get("role")
        prev = merged[-1] if merged else None
        joinable = prev is not None and prev.get("role") == "user" and "blocks" in prev
        if role == "tool":
            block = {"type": "tool_result", "id": msg.get("tool_call_id", ""), "content": msg.get("content", "")}
            if joinable:
                prev["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": msg.get("content") or ""}
            if joinable and prev.get("task") is None:
                prev["blocks"].append(block)
            else:
                merged.append({**{k: msg[k] for k in ("task", "wo_eos") if k in msg}, "role": "user",
                               "content": msg.get("content") or "", "blocks": [block]})
        else:
            merged.append(msg)
    return merged


def sort_tool_results(messages: list[dict]) -> list[dict]:
    """Within each user turn, tool results follow the order of the latest assistant's calls (by id)."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            order = {}
            for i, call in enumerate(msg["tool_calls"]):
                cid = call.get("id") or call.get("function", {}).get("id", "")
                if cid:
                    order[cid] = i
        elif msg.get("role") == "user" and msg.get("blocks") and order:
            results = [b for b in msg["blocks"] if b["type"] == "tool_result"]
            if len(results) > 1:
                ranked = iter(sorted(results, key=lambda b: order.get(b.get("id", ""), 0)))
                msg["blocks"] = [next(ranked) if b["type"] == "tool_result" else b for b in msg["blocks"]]
    return messages


def last_user_index(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)


def drop_old_reasoning(messages: list[dict]) -> list[dict]:
    """Before the last user turn: assistants lose their reasoning, developer messages go."""
    last = last_user_index(messages)
    out = []
    for i, msg in enumerate(messages):
        if msg.get("role") in _KEEP_WHEN_DROPPING or i >= last:
            out.append(msg)
        elif msg.get("role") == "assistant":
            out.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return out


def _text_of_blocks(blocks: list[dict]) -> str:
    parts = []
    for b in blocks:
        if b["type"] == "text":
            parts.append(b["text"])
        else:
            parts.append(f"<tool_result>{b['content']}</tool_result>")
    return "\n\n".join(parts)


def _system_extras(msg: dict) -> str:
    out = ""
    if msg.get("tools"):
        out += "\n\n" + render_tools(_functions(msg["tools"]))
    if msg.get("response_format"):
        out += "\n\n" + _RESPONSE_FORMAT.format(schema=to_json(msg["response_format"]))
    return out


def _render(i: int, messages: list[dict], thinking: bool, drop: bool, effort: str | None, out: ChatPrompt) -> None:
    msg, role = messages[i], messages[i].get("role")
    last_user = last_user_index(messages)
    if i == 0 and thinking and effort == "max":
        out.add(REASONING_EFFORT_MAX)
    if role == "system":
        out.add((msg.get("content") or "") + _system_extras(msg))
    elif role == "developer":
        out.marker(USER_TOKEN)
        out.add((msg.get("content") or "") + _system_extras(msg))
    elif role == "user":
        out.marker(USER_TOKEN)
        out.add(_text_of_blocks(msg["blocks"]) if msg.get("blocks") else msg.get("content") or "")
    elif role == "latest_reminder":
        out.marker(LATEST_REMINDER_TOKEN)
        out.add(msg.get("content") or "")
    elif role == "assistant":
        after_task = i > 0 and messages[i - 1].get("task") is not None
        if thinking and not after_task and (not drop or i > last_user):
            out.add((msg.get("reasoning_content") or "") + THINK_END)
        out.add(msg.get("content") or "")
        if msg.get("tool_calls"):
            out.add(render_tool_calls(msg["tool_calls"]))
        if not msg.get("wo_eos"):
            out.marker(EOS_TOKEN)
    else:
        raise ValueError(f"the V4 encoding has no role {role!r} (tool messages are merged into user turns first)")

    nxt = messages[i + 1].get("role") if i + 1 < len(messages) else None
    if nxt is not None and nxt not in ("assistant", "latest_reminder"):
        return
    task = msg.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ValueError(f"unknown task {task!r}; tasks are {sorted(TASK_TOKENS)}")
        if task == "action":
            out.marker(ASSISTANT_TOKEN)
            out.add(THINK_START if thinking else THINK_END)
        out.marker(TASK_TOKENS[task])
    elif role in ("user", "developer"):
        out.marker(ASSISTANT_TOKEN)
        out.add(THINK_START if thinking and (not drop or i >= last_user) else THINK_END)


def encode_messages(messages: list[dict], thinking: bool, *, drop_thinking: bool = True,
                    reasoning_effort: str | None = None, add_bos: bool = True) -> ChatPrompt:
    """The V4 prompt for `messages` (dicts in the OpenAI shape plus the V4 fields: `reasoning_content`,
    `tools` on a system/developer message, `latest_reminder` role, `task`). Ends with the generation
    prompt when the last message is a user/developer turn."""
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {list(REASONING_EFFORTS)}, got {reasoning_effort!r}")
    msgs = sort_tool_results(merge_tool_messages(messages))
    drop = drop_thinking and not any(m.get("tools") for m in msgs)
    if thinking and drop:
        msgs = drop_old_reasoning(msgs)
    out = ChatPrompt()
    if add_bos:
        out.marker(BOS_TOKEN)
    for i in range(len(msgs)):
        _render(i, msgs, thinking, drop, reasoning_effort, out)
    return out
