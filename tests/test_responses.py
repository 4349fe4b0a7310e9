"""The Responses API adapter: chat history to ``input`` items, events folded like chunks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

import nbchat
from nbchat import ModelAPIError
from nbchat._assembler import ReplyAssembler
from nbchat._client import ModelClient
from nbchat._config import resolve_client
from nbchat._events import Event
from nbchat._responses import (
    ResponsesStream,
    input_items,
    request_body,
    responses_only,
    to_input,
    to_tools,
)
from nbchat.testing import FakeOpenAIServer

HI = [{"role": "user", "content": "hi"}]


def client_for(fake: FakeOpenAIServer, model: str = "m", **kw: Any) -> ModelClient:
    return ModelClient(resolve_client(model, fake.url, "sk-test"), max_retries=0, **kw)


def run(client: ModelClient, assembler: ReplyAssembler, **kw: Any) -> list[Event]:
    async def collect() -> list[Event]:
        return [e async for e in client.astream(kw.pop("messages", HI), assembler, **kw)]

    return asyncio.run(collect())


def test_chat_history_becomes_instructions_and_input_items() -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "system", "content": "Use SI units."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "data:x"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "system", "content": "Answer now."},
    ]
    instructions, items = to_input(messages)
    assert instructions == "Be terse."
    assert items == [
        {"role": "system", "content": "Use SI units."},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Look:"},
                {"type": "input_image", "image_url": "data:x", "detail": "auto"},
            ],
        },
        {"role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
        {"role": "system", "content": "Answer now."},
    ]


def test_tools_and_options_take_their_responses_names() -> None:
    tool = {
        "type": "function",
        "function": {"name": "f", "description": "Does f.", "parameters": {"type": "object"}},
    }
    assert to_tools([tool]) == [
        {
            "type": "function",
            "name": "f",
            "description": "Does f.",
            "parameters": {"type": "object"},
            "strict": False,
        }
    ]
    schema = {"name": "Answer", "schema": {"type": "object"}, "strict": True}
    body = request_body(
        "m",
        HI,
        [tool],
        True,
        {
            "max_tokens": 50,
            "temperature": 0.2,
            "reasoning_effort": "low",
            "response_format": {"type": "json_schema", "json_schema": schema},
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
    )
    assert body["max_output_tokens"] == 50 and "max_tokens" not in body
    assert body["temperature"] == 0.2 and body["store"] is False and body["stream"] is True
    assert body["reasoning"] == {"effort": "low", "summary": "auto"}
    assert body["text"] == {"format": {"type": "json_schema", **schema}}
    assert body["tool_choice"] == {"type": "function", "name": "f"}
    assert "messages" not in body and "stream_options" not in body


def test_models_only_on_responses_are_recognised() -> None:
    assert responses_only("o3-pro") and responses_only("o1-pro-2025-03-19")
    assert responses_only("openai/o3-pro")
    assert (
        not responses_only("gpt-4o") and not responses_only("o3") and not responses_only("o3-pro-x")
    )


def test_o3_pro_goes_to_responses_by_itself(fake: FakeOpenAIServer) -> None:
    fake.enqueue("deep thoughts")
    fake.enqueue("quick")
    assembler = ReplyAssembler()
    run(client_for(fake, "o3-pro"), assembler)
    assert assembler.text == "deep thoughts"
    run(client_for(fake, "gpt-4o"), ReplyAssembler())
    assert fake.request_paths == ["/v1/responses", "/v1/chat/completions"]
    assert client_for(fake, "o3-pro", api="chat").api == "chat", "an explicit api wins"


def test_stream_folds_reasoning_text_calls_and_usage(fake: FakeOpenAIServer) -> None:
    fake.enqueue(
        text="Let me check.",
        reasoning="The user wants data.",
        tool_calls=[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": "二"}}],
        chunk_size=2,
        usage={
            "input_tokens": 12,
            "output_tokens": 7,
            "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 3},
            "output_tokens_details": {"reasoning_tokens": 5},
        },
    )
    assembler = ReplyAssembler()
    events = run(client_for(fake, api="responses"), assembler)
    assert assembler.text == "Let me check." and assembler.reasoning == "The user wants data."
    assert [(c.id, c.name, json.loads(c.arguments)) for c in assembler.tool_calls()] == [
        ("call_1_0", "a", {"x": 1}),
        ("call_1_1", "b", {"y": "二"}),
    ]
    assert assembler.finish_reason == "tool_calls"
    u = assembler.usage
    assert u is not None and (u.prompt_tokens, u.completion_tokens) == (12, 7)
    assert (u.cached_tokens, u.cache_write_tokens, u.reasoning_tokens) == (4, 3, 5)
    assert [e.kind for e in events].count("tool_call_started") == 2


def test_incomplete_response_is_a_length_finish(fake: FakeOpenAIServer) -> None:
    fake.enqueue("cut short", finish_reason="length")
    assembler = ReplyAssembler()
    run(client_for(fake, api="responses"), assembler)
    assert assembler.text == "cut short" and assembler.finish_reason == "length"


def test_non_streamed_response(fake: FakeOpenAIServer) -> None:
    fake.enqueue("whole", reasoning="mull", tool_calls=[{"name": "f", "arguments": {}}])
    assembler = ReplyAssembler()
    run(client_for(fake, api="responses"), assembler, stream=False)
    assert (assembler.text, assembler.reasoning, assembler.finish_reason) == (
        "whole",
        "mull",
        "tool_calls",
    )
    assert [c.name for c in assembler.tool_calls()] == ["f"]
    assert "stream" not in fake.requests[0]


def test_error_event_and_failed_response_raise(fake: FakeOpenAIServer) -> None:
    fake.enqueue(
        "so far",
        stream_error={"status": 429, "message": "slow down", "code": "rate_limit_exceeded"},
    )
    assembler = ReplyAssembler()
    with pytest.raises(ModelAPIError, match="slow down") as info:
        run(client_for(fake, api="responses"), assembler)
    assert info.value.code == "rate_limit_exceeded" and assembler.text == "so far"


def test_http_error_keeps_status_and_code(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(400, "maximum context length is 10", "context_length_exceeded")
    with pytest.raises(ModelAPIError) as info:
        run(client_for(fake, api="responses"), ReplyAssembler())
    assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"


def test_cut_stream_is_an_error_with_the_partial_kept(fake: FakeOpenAIServer) -> None:
    fake.enqueue("abcdefgh", chunk_size=1, cut_after=8)
    assembler = ReplyAssembler()
    with pytest.raises(ModelAPIError, match="stream"):
        run(client_for(fake, api="responses"), assembler)
    assert assembler.text and "abcdefgh".startswith(assembler.text)


def test_sse_variants_parse(fake: FakeOpenAIServer) -> None:
    fake.enqueue("one two", line_ending="\r\n", multiline_data=True)
    assembler = ReplyAssembler()
    run(client_for(fake, api="responses"), assembler)
    assert assembler.text == "one two" and assembler.finish_reason == "stop"


def _feed(stream: ResponsesStream, *events: dict[str, Any]) -> ReplyAssembler:
    assembler = ReplyAssembler()
    for event in events:
        assembler.feed(stream.feed(json.dumps(event).encode()))
    return assembler


def test_calls_and_text_sent_only_as_finished_items_arrive_once() -> None:
    call = {
        "type": "function_call",
        "id": "fc1",
        "call_id": "c9",
        "name": "f",
        "arguments": '{"k":2}',
    }
    message = {"type": "message", "id": "m1", "content": [{"type": "output_text", "text": "hi"}]}
    stream = ResponsesStream()
    assembler = _feed(
        stream,
        {"type": "response.output_item.done", "item": message},
        {"type": "response.output_item.added", "item": {**call, "arguments": ""}},
        {"type": "response.function_call_arguments.done", "item_id": "fc1", "arguments": '{"k":2}'},
        {"type": "response.output_item.done", "item": call},
        {"type": "response.completed", "response": {"status": "completed", "usage": None}},
    )
    assert assembler.text == "hi"
    assert [(c.id, c.name, c.arguments) for c in assembler.tool_calls()] == [("c9", "f", '{"k":2}')]
    assert stream.finished and assembler.finish_reason == "tool_calls"


def test_reasoning_summary_parts_are_paragraphs() -> None:
    delta = "response.reasoning_summary_text.delta"
    assembler = _feed(
        ResponsesStream(),
        {"type": delta, "item_id": "r", "summary_index": 0, "delta": "First."},
        {"type": delta, "item_id": "r", "summary_index": 1, "delta": "Second."},
    )
    assert assembler.reasoning == "First.\n\nSecond."


def test_the_real_sdk_reads_the_fakes_responses_stream(fake: FakeOpenAIServer) -> None:
    fake.enqueue("Hello", tool_calls=[{"name": "f", "arguments": {"a": 1}}])
    with openai.OpenAI(base_url=fake.url, api_key="k") as client:
        stream = client.responses.create(model="m", input="hi", stream=True)
        events = list(stream)
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.output_text == "Hello"
    [call] = [o for o in done.response.output if o.type == "function_call"]
    assert (call.name, call.arguments) == ("f", '{"a":1}')
    assert [e.sequence_number for e in events] == list(range(len(events)))


# ----------------------------------------------------------------- the Responses API's items


def lookup(key: str) -> str:
    """Look a key up."""
    return f"value of {key}"


def _reasoner(fake: FakeOpenAIServer, **kw: Any) -> nbchat.Session:
    """A session on the Responses API, by default with one of OpenAI's reasoning models."""
    kw.setdefault("model", "o4-mini")
    return nbchat.Session(
        base_url=fake.url, api_key="sk-test", db=":memory:", api="responses", **kw
    )


def _items(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(type or role, id or call id) of each input item a Responses request sent."""
    return [
        (i.get("type") or i["role"], i.get("id") or i.get("call_id") or "") for i in body["input"]
    ]


def test_responses_reasoning_items_go_back_encrypted_before_their_calls(
    fake: FakeOpenAIServer,
) -> None:
    s = _reasoner(fake, tools=[lookup])
    fake.enqueue(
        reasoning="Look it up.",
        tool_calls=[
            {"name": "lookup", "arguments": {"key": "a"}, "id": "c1"},
            {"name": "lookup", "arguments": {"key": "b"}, "id": "c2"},
        ],
    )
    fake.enqueue("a and b.")
    fake.enqueue("Next.")
    assert s.send("what are a and b?").text == "a and b."
    first, second = fake.requests[:2]
    assert first["store"] is False and first["include"] == ["reasoning.encrypted_content"]
    assert _items(second) == [
        ("user", ""),
        ("reasoning", "rs_fake1"),
        ("function_call", "c1"),
        ("function_call", "c2"),
        ("function_call_output", "c1"),
        ("function_call_output", "c2"),
    ]
    reasoning = second["input"][1]
    assert reasoning["encrypted_content"] == "gAAAA_fake_reasoning_1"
    assert reasoning["summary"] == [{"type": "summary_text", "text": "Look it up."}]
    s.send("and c?")
    # auto: a later turn sends no reasoning items (the text stays on the message).
    assert [kind for kind, _ in _items(fake.requests[2])].count("reasoning") == 0
    assert s.history[1].reasoning == "Look it up." and s.history[1].reasoning_items


def test_a_responses_model_that_wants_its_reasoning_back_gets_it(fake: FakeOpenAIServer) -> None:
    """OpenAI refuses a function call sent back without the reasoning item before it."""
    with FakeOpenAIServer(require_reasoning_replay=True) as strict:
        for mode, status in (("auto", "completed"), ("always", "completed"), ("never", "error")):
            s = _reasoner(strict, tools=[lookup], reasoning_replay=mode, max_retries=0)
            strict.enqueue(
                reasoning="Look it up.", tool_calls=[{"name": "lookup", "arguments": {"key": "a"}}]
            )
            strict.enqueue("It is a.")
            result = s.send("what is a?")
            assert result.status == status, (mode, result.error)
            if status == "error":
                assert "without its required 'reasoning' item" in (result.error or "")


def test_reasoning_without_encrypted_content_is_not_sent_back(fake: FakeOpenAIServer) -> None:
    """A model nbchat does not know reasons is not asked for encrypted reasoning (others
    refuse the include); its summary is kept, and nothing unusable is sent back (a
    stateless request's item without encrypted content is a 404 "not found")."""
    s = _reasoner(fake, model="my-deployment", tools=[lookup])
    fake.enqueue(reasoning="Hmm.", tool_calls=[{"name": "lookup", "arguments": {"key": "a"}}])
    fake.enqueue("It is a.")
    result = s.send("what is a?")
    assert (result.status, result.reasoning) == ("completed", "Hmm.")
    assert "include" not in fake.requests[0]
    assert [kind for kind, _ in _items(fake.requests[1])] == [
        "user",
        "function_call",
        "function_call_output",
    ]


def test_reasoning_effort_asks_for_encrypted_reasoning_on_any_model(fake: FakeOpenAIServer) -> None:
    s = _reasoner(fake, model="my-deployment", request_params={"reasoning_effort": "low"})
    fake.enqueue("ok", reasoning="brief")
    s.send("hi")
    body = fake.requests[0]
    assert body["reasoning"] == {"effort": "low", "summary": "auto"}
    assert body["include"] == ["reasoning.encrypted_content"]


def test_reasoning_items_reach_the_folder_and_go_back_before_the_calls(
    fake: FakeOpenAIServer,
) -> None:
    for stream in (True, False):
        fake.enqueue(reasoning="think", tool_calls=[{"name": "f", "arguments": {}, "id": "c1"}])
        assembler = ReplyAssembler()
        run(client_for(fake, "o3", api="responses"), assembler, stream=stream)
        assert assembler.reasoning == "think"
        [item] = assembler.reasoning_items
        assert item["type"] == "reasoning" and item["id"].startswith("rs_fake")
        assert item["encrypted_content"].startswith("gAAAA_fake_reasoning_")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    _, items = to_input([*HI, {**assistant, "reasoning_items": [item]}])
    assert [i.get("type") for i in items] == [None, "reasoning", "function_call"]
    _, items = to_input([*HI, assistant])
    assert [i.get("type") for i in items] == [None, "function_call"]
    # A reasoning item with nothing after it (a reply cut before its text) stays out.
    _, items = to_input([*HI, {"role": "assistant", "content": None, "reasoning_items": [item]}])
    assert [i.get("type") for i in items] == [None]


def test_a_reasoning_item_without_its_encrypted_content_is_not_kept() -> None:
    """store=false: the server kept nothing, so an id alone refers to nothing."""
    stream = ResponsesStream()
    item = {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}]}
    event = {"type": "response.output_item.done", "output_index": 0, "item": item}
    chunk = stream.feed(json.dumps(event).encode())
    assert chunk == {"choices": [{"delta": {"reasoning": "s"}, "finish_reason": None}]}


def test_the_fake_refuses_what_openai_refuses_in_input(fake: FakeOpenAIServer) -> None:
    bad_inputs = {
        "without encrypted content": (
            404,
            [{"type": "reasoning", "id": "rs_fake1", "summary": []}],
            "not found",
        ),
        "an output without its call": (
            400,
            [{"type": "function_call_output", "call_id": "c9", "output": "x"}],
            "No tool call found",
        ),
        "a call without its output": (
            400,
            [{"type": "function_call", "call_id": "c9", "name": "f", "arguments": "{}"}],
            "No tool output found",
        ),
        "null content": (400, [{"role": "assistant", "content": None}], "content"),
    }
    with openai.OpenAI(base_url=fake.url, api_key="k", max_retries=0) as client:
        for status, items, words in bad_inputs.values():
            with pytest.raises(openai.APIStatusError) as info:
                client.post(
                    "/responses",
                    body={"model": "m", "input": [*items], "store": False},
                    cast_to=object,
                )
            assert info.value.status_code == status and words in str(info.value)
    assert fake.pending == 0


def test_input_items_are_made_once_per_message_and_let_go_after() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    known = input_items()
    _, first = to_input(history, known)
    _, again = to_input([*history, {"role": "user", "content": "more"}], known)
    assert again[:3] == first and all(a is b for a, b in zip(first, again, strict=False))
    assert to_input(history) == to_input(history, input_items())  # the same items either way
    _, short = to_input(history[:2], known)
    assert short == [{"role": "user", "content": "hi"}] and len(known) == 1
    # A message replaced in the middle (a compaction, a re-run cell): made again from it.
    edited = [history[0], {"role": "user", "content": "hello"}, *history[2:]]
    _, rebuilt = to_input(edited, known)
    assert rebuilt[0] == {"role": "user", "content": "hello"} and len(rebuilt) == 3
