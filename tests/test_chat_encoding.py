"""DeepSeek-V4 chat encoding and output parsing without a server: the published test vectors (prompt text
and token ids), the parser against the official examples, and streaming = all at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.server.chat.encoding import SPECIAL_MARKERS, encode_messages
from cluster.server.chat.parser import ChatOutputParser, Piece
from engine.weights.tokenizer import CHAT_TOKENS, TEXT_MARKERS, build_tokenizer

VECTORS = json.loads((Path(__file__).parent / "data" / "dsv4_encoding_vectors.json").read_text())["cases"]
EOS = "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(512)


def _parse(text: str, thinking: bool, tools: bool = True, step: int | None = None) -> list[Piece]:
    p = ChatOutputParser(thinking, tools)
    pieces: list[Piece] = []
    chunks = [text] if step is None else [text[i:i + step] for i in range(0, len(text), step)]
    for c in chunks:
        pieces += p.push(c)
    return pieces + p.finish()


def _joined(pieces: list[Piece]) -> dict:
    """Reasoning and content text, and the complete calls (name, parsed arguments) from their deltas."""
    calls: dict[int, list] = {}
    for p in pieces:
        if p.kind == "tool_call":
            if p.call.id is not None:
                assert p.call.index == len(calls) and p.call.arguments == ""
                calls[p.call.index] = [p.call.name, "", False]
            calls[p.call.index][1] += p.call.arguments
            calls[p.call.index][2] = p.call.done
    return {"reasoning": "".join(p.text for p in pieces if p.kind == "reasoning"),
            "content": "".join(p.text for p in pieces if p.kind == "content"),
            "calls": [(name, json.loads(args)) for name, args, done in calls.values() if done]}


def test_tokenizer_has_the_chat_tokens(tok):
    assert tok.get_vocab_size() == 512
    ids = [tok.token_to_id(t) for t in CHAT_TOKENS]
    assert ids == list(range(512 - len(CHAT_TOKENS), 512))
    assert tok.token_to_id("<｜begin▁of▁sentence｜>") == 0 and tok.token_to_id(EOS) == 1  # v4-model.md's ids
    for t in CHAT_TOKENS:  # each marker is one token, and the text markers survive skip_special_tokens
        assert tok.encode(t).ids == [tok.token_to_id(t)]
        assert (tok.decode([tok.token_to_id(t)], skip_special_tokens=True) == t) == (t in TEXT_MARKERS)


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_published_vectors_text_and_ids(case, tok):
    prompt = encode_messages(case["messages"], thinking=case["thinking"])
    assert prompt.text == case["prompt"]
    ids = prompt.token_ids(tok)
    assert ids == tok.encode(case["prompt"], add_special_tokens=False).ids
    for marker in SPECIAL_MARKERS:  # every marker in the text is its one special id
        assert ids.count(tok.token_to_id(marker)) == case["prompt"].count(marker)


def test_markers_in_content_are_text(tok):
    msgs = [{"role": "user", "content": f"say {EOS} and <｜Assistant｜>"}]
    prompt = encode_messages(msgs, thinking=False)
    ids = prompt.token_ids(tok)
    assert ids.count(tok.token_to_id(EOS)) == 0 and ids.count(tok.token_to_id("<｜Assistant｜>")) == 1
    assert tok.decode(ids, skip_special_tokens=False) == prompt.text


def test_thinking_off_and_drop_rules():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r1"},
            {"role": "user", "content": "c"}]
    off = encode_messages(msgs, thinking=False).text
    assert off == f"<｜begin▁of▁sentence｜><｜User｜>a<｜Assistant｜></think>b{EOS}<｜User｜>c<｜Assistant｜></think>"
    on = encode_messages(msgs, thinking=True).text
    assert on.endswith("<｜User｜>c<｜Assistant｜><think>") and "r1" not in on
    kept = encode_messages(msgs, thinking=True, drop_thinking=False).text
    assert f"<think>r1</think>b{EOS}" in kept
    effort = encode_messages(msgs[:1], thinking=True, reasoning_effort="max").text
    assert effort.startswith("<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum")
    assert encode_messages(msgs[:1], thinking=False, reasoning_effort="max").text.find("Reasoning Effort") < 0


def test_parallel_tool_results_follow_call_order():
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"n": 2}'}}]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "b", "content": "B"},
            {"role": "tool", "tool_call_id": "a", "content": "A"}]
    text = encode_messages(msgs, thinking=False).text
    assert text.endswith("<｜User｜><tool_result>A</tool_result>\n\n<tool_result>B</tool_result>"
                         "<｜Assistant｜></think>")
    assert '<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>' in text  # no parameters: an empty line
    assert '<｜DSML｜parameter name="n" string="false">2</｜DSML｜parameter>' in text


def test_parser_reads_the_official_assistant_turns():
    quick = VECTORS[0]
    assert _joined(_parse(quick["completion"].removesuffix(EOS), True)) == {
        "reasoning": quick["parsed"]["reasoning_content"], "content": quick["parsed"]["content"], "calls": []}
    prompt = VECTORS[1]["prompt"]  # case 1: the tool-calling turn, then the final answer
    marker = "<｜Assistant｜><think>"
    first = prompt[prompt.find(marker) + len(marker):prompt.find("<｜User｜>", prompt.find(marker))]
    assert _joined(_parse(first.removesuffix(EOS), True)) == {
        "reasoning": "The user wants to know the weather in Beijing. I should use the get_weather tool.",
        "content": "", "calls": [("get_weather", {"location": "Beijing", "unit": "celsius"})]}
    last = prompt[prompt.rfind(marker) + len(marker):].removesuffix(EOS)
    got = _joined(_parse(last, True))
    assert got["reasoning"] == "Got the weather data. Let me format a nice response." and "22°C" in got["content"]


OUTPUTS = [
    "Think a bit.</think>The answer.",
    'Hmm.</think>Calling.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="x" '
    'string="true">a "quoted" value</｜DSML｜parameter>\n<｜DSML｜parameter name="n" string="false">[1, {"k": 2}]'
    '</｜DSML｜parameter>\n</｜DSML｜invoke>\n<｜DSML｜invoke name="g">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
    "no end of thinking < / think",
    "</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"n\" string=\"false\">"
    "{oops</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
    "</think>ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜param",  # cut by max_tokens
]


@pytest.mark.parametrize("text", OUTPUTS)
@pytest.mark.parametrize("step", [1, 2, 7])
def test_streaming_equals_all_at_once(text, step):
    whole, streamed = _parse(text, True), _parse(text, True, step=step)
    assert _joined(streamed)["calls"] == _joined(whole)["calls"]
    assert {k: v for k, v in _joined(streamed).items() if k != "calls"} == \
        {k: v for k, v in _joined(whole).items() if k != "calls"}
    for a, b in zip(streamed, streamed[1:]):  # the kinds never interleave back: reasoning, then the rest
        assert not (b.kind == "reasoning" and a.kind != "reasoning")


def test_parser_results():
    calls = _joined(_parse(OUTPUTS[1], True))
    assert calls == {"reasoning": "Hmm.", "content": "Calling.",
                     "calls": [("f", {"x": 'a "quoted" value', "n": [1, {"k": 2}]}), ("g", {})]}
    assert _joined(_parse(OUTPUTS[2], True)) == {"reasoning": OUTPUTS[2], "content": "", "calls": []}
    bad = _joined(_parse(OUTPUTS[3], True))  # bad JSON: the whole block is content, no call
    assert bad["calls"] == [] and bad["content"] == OUTPUTS[3].removeprefix("</think>")
    cut = _joined(_parse(OUTPUTS[4], True))
    assert cut["calls"] == [] and cut["content"] == OUTPUTS[4].removeprefix("</think>")
    plain = _joined(_parse(OUTPUTS[1], False, tools=False))  # no tools: nothing is parsed out
    assert plain["calls"] == [] and plain["content"] == OUTPUTS[1]
    # incremental: the call opens with its header, then one fragment per parameter, then the close
    deltas = [p.call for p in _parse(OUTPUTS[1], True, step=1) if p.kind == "tool_call"]
    assert [(d.index, d.name, d.arguments, d.done) for d in deltas] == [
        (0, "f", "", False), (0, None, '{"x": "a \\"quoted\\" value"', False), (0, None, ', "n": [1, {"k": 2}]', False),
        (0, None, "}", True), (1, "g", "", False), (1, None, "{}", True)]
    # a bad second call: the first stands, the second's raw text is content
    second_bad = OUTPUTS[1].replace('name="g">\n', 'name="g">\nstray')
    got = _joined(_parse(second_bad, True, step=3))
    assert [c[0] for c in got["calls"]] == ["f"]
    assert got["content"] == 'Calling.\n<｜DSML｜invoke name="g">\nstray\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
