"""Typed answers: send(output_type=...) validates the model's answer (issue 16.4)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import pytest
from pydantic import BaseModel

import nbchat
from nbchat.testing import FakeOpenAIServer

pytestmark = pytest.mark.usefixtures("wire")  # every test here runs on both wire formats


class City(BaseModel):
    name: str
    population: int
    country: str = "NO"


@dataclass
class Point:
    x: float
    y: float


def _session(fake: FakeOpenAIServer, **kw: Any) -> nbchat.Session:
    return nbchat.Session(
        model="any-model", base_url=fake.url, api_key="sk-test", db=":memory:", **kw
    )


def test_a_valid_json_answer_becomes_the_output(fake: FakeOpenAIServer) -> None:
    fake.enqueue(json.dumps({"name": "Oslo", "population": 709000, "country": None}))
    r = _session(fake).send("Largest city in Norway?", output_type=City)
    assert r.status == "completed"
    assert r.output == City(name="Oslo", population=709000)
    body = fake.chat_requests[0]
    schema = body["response_format"]["json_schema"]
    assert (schema["name"], schema["strict"]) == ("City", True)
    assert schema["schema"]["additionalProperties"] is False
    assert sorted(schema["schema"]["required"]) == ["country", "name", "population"]


@pytest.mark.parametrize(
    ("output_type", "reply", "expected"),
    [
        (list[City], {"result": [{"name": "a", "population": 1, "country": "x"}]}, "list"),
        (Literal["yes", "no"], {"result": "yes"}, "yes"),
        (dict[str, int], {"result": {"a": 1}}, {"a": 1}),
        (Point, {"x": 1, "y": 2.5}, Point(1, 2.5)),
        # A bare answer that fits is taken as it is (small models often skip the wrapper).
        (Literal["yes", "no"], "yes", "yes"),
        (list[City], [{"name": "a", "population": 1, "country": "x"}], "list"),
        (int, 42, 42),
    ],
)
def test_other_types_are_wrapped_and_unwrapped(
    fake: FakeOpenAIServer, output_type: Any, reply: Any, expected: Any
) -> None:
    fake.enqueue(json.dumps(reply))
    r = _session(fake).send("go", output_type=output_type)
    assert r.status == "completed", r.error
    if expected == "list":
        assert r.output == [City(name="a", population=1, country="x")]
    else:
        assert r.output == expected


def test_an_invalid_answer_is_explained_and_tried_again(fake: FakeOpenAIServer) -> None:
    fake.enqueue('{"name": "Oslo", "population": "lots"}')
    fake.enqueue('{"name": "Oslo", "population": 709000, "country": "NO"}')
    s = _session(fake)
    r = s.send("go", output_type=City)
    assert r.status == "completed" and r.output.population == 709000
    correction = fake.chat_requests[1]["messages"][-2]  # the last is the format instruction
    assert correction["role"] == "user"
    assert "population" in correction["content"] and "integer" in correction["content"]


def test_two_invalid_answers_end_the_turn_with_the_reason(fake: FakeOpenAIServer) -> None:
    fake.enqueue("not json at all")
    fake.enqueue('{"name": 3}')
    r = _session(fake).send("go", output_type=City)
    assert r.status == "error" and r.output is None
    assert r.error is not None and "did not fit City after 2 tries" in r.error
    assert len(fake.requests) == 2


def test_retries_are_configurable(fake: FakeOpenAIServer) -> None:
    for _ in range(3):
        fake.enqueue("nope")
    fake.enqueue('{"name": "Oslo", "population": 1, "country": "NO"}')
    r = _session(fake, output_retries=3).send("go", output_type=City)
    assert r.status == "completed" and len(fake.requests) == 4


def test_an_endpoint_without_json_schema_gets_a_final_answer_tool(
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue_error(400, "Unsupported parameter: 'response_format' is not supported")
    fake.enqueue(
        tool_calls=[
            {
                "name": "final_answer",
                "arguments": {"name": "Oslo", "population": 5, "country": "NO"},
            }
        ]
    )
    s = nbchat.Session(
        model="m", base_url=fake.url + "/", api_key="sk-test", db=":memory:", max_retries=0
    )
    r = s.send("go", output_type=City)
    assert r.status == "completed", r.error
    assert r.output == City(name="Oslo", population=5)
    assert "response_format" not in fake.chat_requests[1]
    assert [t["function"]["name"] for t in fake.chat_requests[1]["tools"]] == ["final_answer"]
    # The history stays valid: the tool call has its answer.
    assert s.messages[-1]["role"] == "tool" and s.messages[-1]["content"] == "ok"
    assert r.rounds == 1


def test_tool_mode_can_be_chosen_and_other_tools_still_run(fake: FakeOpenAIServer) -> None:
    def population(city: str) -> int:
        """Population of a city."""
        return 709000

    fake.enqueue(tool_calls=[{"name": "population", "arguments": {"city": "Oslo"}}])
    fake.enqueue(
        tool_calls=[
            {
                "name": "final_answer",
                "arguments": {"name": "Oslo", "population": 709000, "country": "NO"},
            }
        ]
    )
    s = _session(fake, tools=[population], output_mode="tool")
    r = s.send("go", output_type=City)
    assert r.status == "completed" and r.output.population == 709000
    assert [c.name for c in r.tool_calls] == ["population"]
    assert "response_format" not in fake.chat_requests[0]


def test_a_bare_answer_that_does_not_fit_asks_for_the_wrapper(fake: FakeOpenAIServer) -> None:
    fake.enqueue('"maybe"', repeat=2)
    r = _session(fake).send("go", output_type=Literal["yes", "no"])
    assert r.status == "error"
    assert 'the answer must be a JSON object {"result": ...}' in (r.error or "")
