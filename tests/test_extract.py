"""nbchat.extract over a column: typed rows, bounded concurrency, a budget that stops it."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from pydantic import BaseModel

import nbchat
from nbchat._pricing import forget_price, register_price
from nbchat.testing import FakeOpenAIServer, Reply, chat_request

pytestmark = pytest.mark.usefixtures("wire")  # every test here runs on both wire formats


class Person(BaseModel):
    name: str
    age: int | None = None


def person_from(body: dict[str, Any]) -> Reply:
    """A model that reads 'NAME is AGE' from the one user message it was sent."""
    users = [m["content"] for m in chat_request(body)["messages"] if m["role"] == "user"]
    assert len(users) == 1, "each row must be sent alone"
    match = re.match(r"(\w+) is (\d+)", users[0])
    answer = {"name": match.group(1), "age": int(match.group(2))} if match else {"name": "?"}
    return Reply(text=json.dumps(answer), usage={"prompt_tokens": 40, "completion_tokens": 10})


@pytest.fixture
def priced() -> Iterator[str]:
    register_price("row-model", input_per_mtok=100, output_per_mtok=100)
    yield "row-model"
    forget_price("row-model")


def test_extract_gives_one_typed_row_per_value_in_order(
    fake: FakeOpenAIServer, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fallback = person_from
    column = pd.Series([f"P{i} is {20 + i}" for i in range(12)], index=range(100, 112))
    frame = nbchat.extract(
        column, Person, model="m", base_url=fake.url, api_key="sk-test", db=":memory:"
    )
    assert list(frame.index) == list(range(100, 112))
    assert list(frame.columns) == ["name", "age", "status", "error"]
    assert list(frame["name"]) == [f"P{i}" for i in range(12)]
    assert list(frame["age"]) == [20 + i for i in range(12)]
    assert set(frame["status"]) == {"completed"}
    assert "extract: 12/12" in capsys.readouterr().err


def test_missing_and_blank_values_are_not_sent_and_fields_keep_their_types(
    fake: FakeOpenAIServer,
) -> None:
    """A trial sent None as the text "nan" and "" as an empty message, each paid for
    twice (the retry), and got ages back as floats; gaps are now skipped."""
    fake.fallback = person_from
    column = pd.Series(["Ada is 36", None, float("nan"), "  ", "Bo is 7", pd.NA, "garbage"])
    frame = nbchat.extract(
        column, Person, model="m", base_url=fake.url, api_key="sk-test", db=":memory:",
        progress=False,
    )  # fmt: skip
    sent = [m["content"] for b in fake.chat_requests for m in b["messages"] if m["role"] == "user"]
    assert sorted(sent) == ["Ada is 36", "Bo is 7", "garbage"]
    assert list(frame["status"]) == [
        "completed", "skipped", "skipped", "skipped", "completed", "skipped", "completed",
    ]  # fmt: skip
    assert str(frame["age"].dtype) == "Int64"
    assert frame["age"].tolist()[:2] == [36, pd.NA] and frame["age"][4] == 7
    assert frame["error"][0] is None and frame["error"][1].startswith("not sent: the value")
    assert frame["name"][6] == "?"
    # A skipped row's text shows as <NA>, as its numbers do (a trial saw "NaN").
    assert str(frame["name"].dtype) == "string" and frame["name"][1] is pd.NA


def test_a_budget_stops_the_run_part_way_and_marks_the_rest(
    fake: FakeOpenAIServer, priced: str
) -> None:
    fake.fallback = person_from
    column = pd.Series([f"P{i} is {i}" for i in range(50)])
    db = nbchat.Store.open(":memory:")
    # Each row costs 50 tokens x $100/M = $0.005: $0.05 pays for about ten.
    frame = nbchat.extract(
        column,
        Person,
        model=priced,
        base_url=fake.url,
        api_key="sk-test",
        db=db,
        budget_usd=0.05,
        concurrency=3,
        progress=False,
    )
    done = frame[frame["status"] == "completed"]
    assert 5 <= len(done) < 50
    assert list(done["age"]) == [int(i) for i in done.index]  # rows done are kept
    rest = frame[frame["status"] != "completed"]
    assert set(rest["status"]) <= {"budget_exceeded", "not_run"}
    assert rest["name"].isna().all()
    assert rest["error"].str.contains("budget").all()
    spent = nbchat.sessions(db=db).set_index("id").loc[frame.attrs["session_id"], "cost_usd"]
    assert spent <= 0.05 + 1e-9
    assert len(fake.requests) == len(done)


def test_rows_run_at_once_up_to_the_concurrency(fake: FakeOpenAIServer) -> None:
    in_flight, peak = 0, 0
    lock = threading.Lock()
    # Requests answer four at a time: four must be in flight together for any to answer.
    together = threading.Barrier(4, timeout=30)

    def slow(body: dict[str, Any]) -> Reply:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        together.wait()
        with lock:
            in_flight -= 1
        return person_from(body)

    fake.fallback = slow
    frame = nbchat.extract(
        [f"P{i} is {i}" for i in range(8)],
        Person,
        model="m",
        base_url=fake.url,
        api_key="sk-test",
        db=":memory:",
        concurrency=4,
        progress=False,
    )
    assert set(frame["status"]) == {"completed"}
    assert peak == 4
