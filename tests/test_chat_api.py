"""Chat over the API with the official `openai` client: thinking on/off, reasoning_content, tools,
tool_choice, malformed tool calls, batch jobs.

The model is ScriptedRankEngine (tests/scripted_rank.py, a test-only stand-in behind the real RankWorker,
wire protocol, router, OpenAI service and HTTP app): random weights never write V4's markers, so each test
queues the text the "model" answers with. tests/test_server.py runs the real engine with thinking on.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import openai
import pytest

from cluster.rank_server import RankWorker
from cluster.router import Router
from cluster.server.app import build_app, serve
from cluster.server.chat.encoding import encode_messages
from cluster.server.openai_api import ModelInfo, OpenAIService
from cluster.server.settings import ServerSettings
from engine.weights.tokenizer import build_tokenizer
from tests.scripted_rank import ScriptedRankEngine

KEY_ENV = "MEGASERVE_TEST_CHAT_KEY"
KEY = "sk-chat-test"
MODEL = "v4-scripted"
NO_THINK = {"chat_template_kwargs": {"thinking": False}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">'
        'Paris</｜DSML｜parameter>\n<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    tok = build_tokenizer(512)
    engine = ScriptedRankEngine(tok, eos_token_id=1)
    worker = RankWorker(engine, "127.0.0.1", 0).start()
    os.environ[KEY_ENV] = KEY
    settings = ServerSettings(port=0, api_key_env=KEY_ENV, state_dir=tmp_path_factory.mktemp("chat-state"))
    loop = asyncio.new_event_loop()
    started: dict = {}
    ready, stop = threading.Event(), asyncio.Event()

    async def main():
        router = await Router([worker.address], secret=worker.secret).start()
        service = OpenAIService(router, tok, ModelInfo(MODEL, 8192, 512, 0, 1))
        runner, port = await serve(build_app(service, settings), "127.0.0.1", 0)
        started["port"] = port
        ready.set()
        await stop.wait()
        await runner.cleanup()
        await router.close()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert ready.wait(60)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{started['port']}/v1", api_key=KEY, max_retries=0,
                           timeout=60)
    yield client, engine, tok
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    worker.stop()
    os.environ.pop(KEY_ENV, None)


def _create(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=256, **kw)


def _stream(client, messages, **kw) -> list:
    return list(_create(client, messages, stream=True, **kw))


def _kinds(chunks) -> list[str]:
    """The kind of each chunk's delta; asserts no delta mixes reasoning, content and tool calls."""
    out = []
    for c in chunks:
        d = c.choices[0].delta
        present = [k for k, v in (("reasoning", getattr(d, "reasoning_content", None)), ("content", d.content),
                                  ("tool_calls", d.tool_calls)) if v]
        assert len(present) <= 1, f"a delta mixes {present}"
        out += present
    return out


def _streamed_calls(chunks) -> list[tuple[str, dict]]:
    """The tool calls of a stream, assembled from their deltas (first: id and name; then fragments)."""
    calls: dict[int, list] = {}
    for c in chunks:
        for tc in c.choices[0].delta.tool_calls or []:
            if tc.id is not None:
                assert tc.index == len(calls) and tc.type == "function" and tc.id.startswith("call_")
                calls[tc.index] = [tc.function.name, ""]
            calls[tc.index][1] += tc.function.arguments
    return [(name, json.loads(args)) for name, args in calls.values()]


def test_thinking_on_splits_reasoning_and_content(chat):
    client, engine, tok = chat
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    engine.replies.append("The user greets me.</think>Hello!")
    out = _create(client, msgs)
    m = out.choices[0].message
    assert (m.reasoning_content, m.content, m.tool_calls) == ("The user greets me.", "Hello!", None)
    assert out.choices[0].finish_reason == "stop"
    assert engine.received[-1].prompt_token_ids == encode_messages(msgs, thinking=True).token_ids(tok)
    assert engine.prompt_text().endswith("<｜Assistant｜><think>")

    engine.replies.append("The user greets me.</think>Hello!")
    chunks = _stream(client, msgs)
    kinds = _kinds(chunks)
    assert kinds[0] == "reasoning" and kinds[-1] == "content" and "reasoning" not in kinds[kinds.index("content"):]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == m.reasoning_content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello!"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_thinking_off(chat):
    client, engine, tok = chat
    msgs = [{"role": "user", "content": "Hi?"}]
    engine.replies.append("Hello, no thinking.")
    out = _create(client, msgs, extra_body=NO_THINK)
    m = out.choices[0].message
    assert m.content == "Hello, no thinking." and getattr(m, "reasoning_content", None) is None
    assert engine.prompt_text().endswith("<｜Assistant｜></think>")
    assert engine.received[-1].prompt_token_ids == encode_messages(msgs, thinking=False).token_ids(tok)
    engine.replies.append("Hello, no thinking.")
    chunks = _stream(client, msgs, extra_body=NO_THINK)
    assert set(_kinds(chunks)) == {"content"}


def test_tool_call_round_trip(chat):
    client, engine, tok = chat
    msgs = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
    engine.replies.append("I should call get_weather.</think>" + CALL)
    out = _create(client, msgs, tools=[WEATHER, TIME])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == "I should call get_weather."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert "## Tools" in engine.prompt_text() and '"name": "get_time"' in engine.prompt_text()

    # the next turn: the assistant's call (with its reasoning, as DeepSeek asks clients to send it back)
    # and the tool's result
    history = msgs + [{"role": "assistant", "content": None, "reasoning_content": choice.message.reasoning_content,
                       "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    engine.replies.append("It is mild.</think>21°C in Paris.")
    final = _create(client, history, tools=[WEATHER, TIME])
    assert final.choices[0].message.content == "21°C in Paris." and final.choices[0].finish_reason == "stop"
    expected = [{"role": "system", "content": "", "tools": [WEATHER, TIME]}, *history]
    expected[2] = {**expected[2], "content": "", "tool_calls": [{"id": call.id, "type": "function", "function": {
        "name": "get_weather", "arguments": call.function.arguments}}]}
    assert engine.prompt_text() == encode_messages(expected, thinking=True).text
    assert engine.prompt_text().endswith('<｜User｜><tool_result>{"temp_c": 21}</tool_result><｜Assistant｜><think>')
    assert "I should call get_weather.</think>\n\n<｜DSML｜tool_calls>" in engine.prompt_text()  # tools: kept

    engine.replies.append("I should call get_weather.</think>" + CALL)
    chunks = _stream(client, msgs, tools=[WEATHER])
    kinds = _kinds(chunks)
    assert kinds == ["reasoning"] * kinds.count("reasoning") + ["tool_calls"] * 4  # header, 2 parameters, close
    assert _streamed_calls(chunks) == [("get_weather", {"city": "Paris", "days": 2})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_named_and_required(chat):
    client, engine, tok = chat
    msgs = [{"role": "user", "content": "Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    # non-thinking, named: the invoke header is written for the model, which continues with the parameters
    engine.replies.append(CALL[CALL.index("<｜DSML｜parameter"):])
    out = _create(client, msgs, tools=[WEATHER, TIME], tool_choice=named, extra_body=NO_THINK)
    assert engine.prompt_text().endswith('<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n'
                                         '<｜DSML｜invoke name="get_weather">\n')
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert out.choices[0].finish_reason == "tool_calls"
    assert out.usage.completion_tokens == len(tok.encode(CALL[CALL.index("<｜DSML｜parameter"):]).ids) + 1

    # thinking, required: the model reasons freely (stopped at </think>), then the block opens for it
    engine.replies.extend(["Time matters here.</think>ignored", 'get_time">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'])
    chunks = _stream(client, msgs, tools=[WEATHER, TIME], tool_choice="required")
    first, second = engine.received[-2:]
    assert first.params.stop_token_ids == (tok.token_to_id("</think>"),)
    assert engine.prompt_text(-1).endswith('<think>Time matters here.</think>\n\n<｜DSML｜tool_calls>\n'
                                           '<｜DSML｜invoke name="')
    assert second.prompt_token_ids[:len(first.prompt_token_ids)] == first.prompt_token_ids
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == \
        "Time matters here."
    assert _streamed_calls(chunks) == [("get_time", {})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "ignored" not in "".join(c.choices[0].delta.content or "" for c in chunks)

    # the reasoning used the whole budget: no second request, finish "length"
    engine.replies.append("Short.</think>")
    n_received = len(engine.received)
    budget = len(tok.encode("Short.</think>").ids)
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=budget, tools=[WEATHER],
                                         tool_choice="required")
    assert len(engine.received) == n_received + 1 and out.choices[0].finish_reason == "length"
    m = out.choices[0].message
    assert (m.reasoning_content, m.content, m.tool_calls) == ("Short.", "", None)
    assert out.usage.completion_tokens == budget

    for bad in ({"type": "function", "function": {"name": "nope"}}, "sometimes"):
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            _create(client, msgs, tools=[WEATHER], tool_choice=bad)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        _create(client, msgs, tool_choice="required")


def test_malformed_tool_call_is_content(chat):
    client, engine, tok = chat
    msgs = [{"role": "user", "content": "Paris?"}]
    broken = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="days" '
              'string="false">two</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    engine.replies.append("Hmm.</think>Let me see." + broken)
    out = _create(client, msgs, tools=[WEATHER])
    m = out.choices[0].message
    assert m.tool_calls is None and m.content == "Let me see." + broken and out.choices[0].finish_reason == "stop"
    engine.replies.append("Hmm.</think>Let me see." + broken)
    chunks = _stream(client, msgs, tools=[WEATHER])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == m.content
    # the stream had announced the call when its invoke header arrived; it never completes
    opened = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert [(tc.function.name, tc.function.arguments) for tc in opened] == [("get_weather", "")]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # tool_choice none: the block is not parsed at all
    engine.replies.append("</think>" + CALL)
    out = _create(client, msgs, tools=[WEATHER], tool_choice="none")
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content == CALL


def test_batch_jobs_carry_the_chat_fields(chat):
    client, engine, tok = chat
    engine.replies_by_prompt.update({"batch-q1": "Thinking.</think>Batch answer.", "batch-q2": CALL})
    lines = [{"custom_id": "think", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": [{"role": "user", "content": "batch-q1"}], "max_tokens": 64,
                       "min_tokens": 2, "presence_penalty": 0.5, "logit_bias": {"7": -5}}},
             {"custom_id": "tools", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": [{"role": "user", "content": "batch-q2"}], "max_tokens": 256,
                       "tools": [WEATHER], "chat_template_kwargs": {"thinking": False}}}]
    f = client.files.create(file=("in.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while (b := client.batches.retrieve(b.id)).status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b.status == "completed", b
    rows = {r["custom_id"]: r["response"]["body"] for r in
            map(json.loads, client.files.content(b.output_file_id).text.splitlines())}
    assert rows["think"]["choices"][0]["message"]["reasoning_content"] == "Thinking."
    assert rows["tools"]["choices"][0]["finish_reason"] == "tool_calls"
    params = [r.params for r in engine.received[-2:] if r.params.min_tokens]
    assert len(params) == 1 and params[0].presence_penalty == 0.5 and params[0].logit_bias == ((7, -5.0),)
