"""The Responses API adapter: chat history to ``input`` items, events folded like chunks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from nbchat import ModelAPIError
from nbchat._client import ModelClient, RoundFolder
from nbchat._config import resolve_client
from nbchat._responses import ResponsesStream, request_body, responses_only, to_input, to_tools
from nbchat._types import Event
from nbchat.testing import FakeOpenAIServer

HI = [{"role": "user", "content": "hi"}]


def client_for(fake: FakeOpenAIServer, model: str = "m", **kw: Any) -> ModelClient:
    return ModelClient(resolve_client(model, fake.url, "sk-test"), max_retries=0, **kw)


def run(client: ModelClient, folder: RoundFolder, **kw: Any) -> list[Event]:
    async def collect() -> list[Event]:
        return [e async for e in client.astream(kw.pop("messages", HI), folder, **kw)]

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
    assert instructions == "Be terse.\n\nUse SI units."
    assert items == [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Look:"},
                {"type": "input_image", "image_url": "data:x"},
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
    folder = RoundFolder()
    run(client_for(fake, "o3-pro"), folder)
    assert folder.text == "deep thoughts"
    run(client_for(fake, "gpt-4o"), RoundFolder())
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
    folder = RoundFolder()
    events = run(client_for(fake, api="responses"), folder)
    assert folder.text == "Let me check." and folder.reasoning == "The user wants data."
    assert [(c.id, c.name, json.loads(c.arguments)) for c in folder.tool_calls()] == [
        ("call_1_0", "a", {"x": 1}),
        ("call_1_1", "b", {"y": "二"}),
    ]
    assert folder.finish_reason == "tool_calls"
    u = folder.usage
    assert u is not None and (u.prompt_tokens, u.completion_tokens) == (12, 7)
    assert (u.cached_tokens, u.cache_write_tokens, u.reasoning_tokens) == (4, 3, 5)
    assert [e.kind for e in events].count("tool_call_started") == 2


def test_incomplete_response_is_a_length_finish(fake: FakeOpenAIServer) -> None:
    fake.enqueue("cut short", finish_reason="length")
    folder = RoundFolder()
    run(client_for(fake, api="responses"), folder)
    assert folder.text == "cut short" and folder.finish_reason == "length"


def test_non_streamed_response(fake: FakeOpenAIServer) -> None:
    fake.enqueue("whole", reasoning="mull", tool_calls=[{"name": "f", "arguments": {}}])
    folder = RoundFolder()
    run(client_for(fake, api="responses"), folder, stream=False)
    assert (folder.text, folder.reasoning, folder.finish_reason) == ("whole", "mull", "tool_calls")
    assert [c.name for c in folder.tool_calls()] == ["f"]
    assert "stream" not in fake.requests[0]


def test_error_event_and_failed_response_raise(fake: FakeOpenAIServer) -> None:
    fake.enqueue(
        "so far",
        stream_error={"status": 429, "message": "slow down", "code": "rate_limit_exceeded"},
    )
    folder = RoundFolder()
    with pytest.raises(ModelAPIError, match="slow down") as info:
        run(client_for(fake, api="responses"), folder)
    assert info.value.code == "rate_limit_exceeded" and folder.text == "so far"


def test_http_error_keeps_status_and_code(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(400, "maximum context length is 10", "context_length_exceeded")
    with pytest.raises(ModelAPIError) as info:
        run(client_for(fake, api="responses"), RoundFolder())
    assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"


def test_cut_stream_is_an_error_with_the_partial_kept(fake: FakeOpenAIServer) -> None:
    fake.enqueue("abcdefgh", chunk_size=1, cut_after=8)
    folder = RoundFolder()
    with pytest.raises(ModelAPIError, match="stream"):
        run(client_for(fake, api="responses"), folder)
    assert folder.text and "abcdefgh".startswith(folder.text)


def test_sse_variants_parse(fake: FakeOpenAIServer) -> None:
    fake.enqueue("one two", line_ending="\r\n", multiline_data=True)
    folder = RoundFolder()
    run(client_for(fake, api="responses"), folder)
    assert folder.text == "one two" and folder.finish_reason == "stop"


def _feed(stream: ResponsesStream, *events: dict[str, Any]) -> RoundFolder:
    folder = RoundFolder()
    for event in events:
        folder.feed(stream.feed(json.dumps(event).encode()))
    return folder


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
    folder = _feed(
        stream,
        {"type": "response.output_item.done", "item": message},
        {"type": "response.output_item.added", "item": {**call, "arguments": ""}},
        {"type": "response.function_call_arguments.done", "item_id": "fc1", "arguments": '{"k":2}'},
        {"type": "response.output_item.done", "item": call},
        {"type": "response.completed", "response": {"status": "completed", "usage": None}},
    )
    assert folder.text == "hi"
    assert [(c.id, c.name, c.arguments) for c in folder.tool_calls()] == [("c9", "f", '{"k":2}')]
    assert stream.finished and folder.finish_reason == "tool_calls"


def test_reasoning_summary_parts_are_paragraphs() -> None:
    delta = "response.reasoning_summary_text.delta"
    folder = _feed(
        ResponsesStream(),
        {"type": delta, "item_id": "r", "summary_index": 0, "delta": "First."},
        {"type": delta, "item_id": "r", "summary_index": 1, "delta": "Second."},
    )
    assert folder.reasoning == "First.\n\nSecond."


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
