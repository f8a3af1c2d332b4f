"""The chat template: OpenAI `messages` -> prompt token ids, in DeepSeek's V3/V4 chat format.

    <bos>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<eos><｜User｜>{user}<｜Assistant｜>

- bos and eos are inserted as token ids (`bos_token_id`, `eos_token_id` of the model config), never
  parsed out of text, so a message that contains the eos string cannot end a turn early.
- System (and `developer`) messages are concatenated, separated by blank lines, right after bos.
- A user turn is the role marker `<｜User｜>` plus its content; an assistant turn is `<｜Assistant｜>`,
  its content and eos. The prompt ends with `<｜Assistant｜>` (the generation prompt) unless the last
  message is an assistant message, which is then continued (no eos after it).
- The role markers are the real DeepSeek tokenizer's special tokens; the tiny test tokenizer
  (engine/weights/tokenizer.py) knows only bos/eos, so for it they are ordinary text, encoded byte-level.
- Content is a string or a list of `{"type": "text", "text": ...}` parts (other part types are refused).
"""

from __future__ import annotations

from typing import Any, Protocol

from cluster.server.errors import bad_request

USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
ROLES = ("system", "developer", "user", "assistant")


class Encoder(Protocol):
    def __call__(self, text: str) -> list[int]: ...


def message_text(msg: Any, i: int) -> tuple[str, str]:
    """(role, text) of messages[i], validated."""
    if not isinstance(msg, dict):
        raise bad_request(f"messages[{i}] must be an object, got {type(msg).__name__}", f"messages[{i}]")
    role = msg.get("role")
    if role not in ROLES:
        raise bad_request(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}", f"messages[{i}].role")
    content = msg.get("content")
    if content is None and role == "assistant":
        return role, ""
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': str}} "
                                  f"(only text parts are supported)", f"messages[{i}].content")
            parts.append(part["text"])
        return role, "".join(parts)
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts, got "
                      f"{type(content).__name__}", f"messages[{i}].content")


def apply_chat_template(messages: Any, encode: Encoder, bos_token_id: int, eos_token_id: int) -> list[int]:
    """Prompt token ids for `messages` (see the module docstring for the format)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    turns = [message_text(m, i) for i, m in enumerate(messages)]
    system = "\n\n".join(text for role, text in turns if role in ("system", "developer"))
    ids = [bos_token_id] + (encode(system) if system else [])
    dialogue = [(role, text) for role, text in turns if role not in ("system", "developer")]
    if not dialogue:
        raise bad_request("messages must contain at least one user or assistant message", "messages")
    for k, (role, text) in enumerate(dialogue):
        if role == "user":
            ids += encode(USER + text)
        else:
            ids += encode(ASSISTANT + text)
            if k < len(dialogue) - 1:
                ids.append(eos_token_id)
    if dialogue[-1][0] == "user":
        ids += encode(ASSISTANT)
    return ids
