"""Per-turn options leave the session as it was; new() copies a session's set-up."""

from __future__ import annotations

import re
from typing import Any

import pytest

import nbchat
from nbchat import TurnOptions
from nbchat.testing import FakeOpenAIServer

pytestmark = pytest.mark.usefixtures("wire")  # every test here runs on both wire formats


def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


def whisper(text: str) -> str:
    """Lower-case a text."""
    return text.lower()


def _session(fake: FakeOpenAIServer, **kw: Any) -> nbchat.Session:
    return nbchat.Session(
        model="base-model", base_url=fake.url, api_key="sk-test", db=":memory:", **kw
    )


def test_options_apply_to_one_turn_only(fake: FakeOpenAIServer) -> None:
    s = _session(fake, tools=[shout], temperature=0.1, max_rounds=5)
    fake.enqueue("one")
    options = TurnOptions(
        model="other-model",
        tools=[whisper],
        temperature=0.9,
        max_rounds=0,
        stream=False,
        request_params={"max_tokens": 50},
    )
    assert s.send("hi", options=options).text == "one"
    first = fake.chat_requests[0]
    assert (first["model"], first["temperature"], first["max_tokens"]) == ("other-model", 0.9, 50)
    assert "stream" not in first and "tools" not in first  # max_rounds=0 offers no tools
    fake.enqueue("two")
    assert s.send("again").text == "two"
    second = fake.chat_requests[1]
    assert (second["model"], second["temperature"], second["stream"]) == ("base-model", 0.1, True)
    assert [t["function"]["name"] for t in second["tools"]] == ["shout"]
    assert "max_tokens" not in second
    assert (s.model, s.max_rounds, s.tools.names()) == ("base-model", 5, ["shout"])


def test_a_turn_budget_option_limits_that_turn(fake: FakeOpenAIServer) -> None:
    from nbchat._pricing import forget_price, register_price

    register_price("priced", input_per_mtok=1000, output_per_mtok=1000)
    try:
        s = _session(fake)
        s.set_model("priced")
        result = s.send("a long question " * 50, options=TurnOptions(budget_usd=0.0001))
        assert result.status == "budget_exceeded" and fake.requests == []
        assert s.budgets.turn_budget_usd is None
    finally:
        forget_price("priced")


def test_new_starts_an_empty_session_set_up_the_same_way(fake: FakeOpenAIServer) -> None:
    def polite(text: str) -> str:
        return text + " please"

    s = _session(
        fake,
        system="Be brief.",
        tools=[shout],
        temperature=0.3,
        context_window=4000,
        compaction="window",
        input_guardrails=[polite],
        request_params={"seed": 7},
        budget_usd=2.0,
    )
    s.set_model("switched-model")
    fake.enqueue("first")
    s.send("hi")
    fresh = s.new()
    assert fresh.id != s.id and fresh.store is s.store
    fake.enqueue("fresh")
    assert fresh.send("hello").text == "fresh"
    body = fake.chat_requests[-1]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello please"},
    ]
    assert (body["model"], body["temperature"], body["seed"]) == ("switched-model", 0.3, 7)
    assert [t["function"]["name"] for t in body["tools"]] == ["shout"]
    assert fresh.budgets.budget_usd == 2.0
    assert fresh.compactor is not None and fresh.compactor.context_window == 4000
    assert s.new(system="Be thorough.").system == "Be thorough."


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("max_rounds", -1, "max_rounds must be at least 0, got -1"),
        ("max_rounds", 1.5, "max_rounds must be a whole number, got 1.5"),
        ("budget_usd", -5, "budget_usd must be at least 0, got -5"),
        ("temperature", -0.1, "temperature must be at least 0"),
        ("turn_max_tokens", 0, "turn_max_tokens must be at least 1"),
    ],
)
def test_a_setting_below_its_least_value_is_refused_where_it_is_given(
    fake: FakeOpenAIServer, setting: str, value: Any, says: str
) -> None:
    """Session(), nbchat.configure() and a turn's options refuse what a %%chat option
    refuses (a negative max_rounds had ended every turn at once: 'Stopped after -1
    rounds'; a negative budget read '$-5.00 cannot be checked'), and nothing is sent."""
    with pytest.raises(nbchat.ConfigError, match=r"Session\(\): " + re.escape(says)):
        _session(fake, **{setting: value})
    if setting in ("max_rounds", "budget_usd", "temperature"):
        with pytest.raises(nbchat.ConfigError, match="nbchat.configure: " + re.escape(says)):
            nbchat.configure(**{setting: value})
        assert setting not in nbchat._config.get_defaults()
        s = _session(fake)
        with pytest.raises(nbchat.ConfigError, match="the turn's options: " + re.escape(says)):
            s.send("hi", options=TurnOptions(**{setting: value}))
        assert s.messages == [] and fake.requests == []
