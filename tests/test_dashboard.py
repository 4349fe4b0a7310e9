"""``nbchat.dashboard()`` without a browser: built on a store real sessions filled, driven
through its widgets (clicks, date pickers), checked on the data it shows.

What only a browser shows (that it renders and clicks in JupyterLab) is in
test_dashboard_browser.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import ipywidgets as widgets
import pytest
from test_plot import CHEAP, MYSTERY, PRICED, Filled, fill_store, prices

import nbchat
from nbchat import Session
from nbchat._dashboard import Dashboard
from nbchat._pricing import forget_price, register_price
from nbchat.testing import FakeOpenAIServer


def stored_day(db: str) -> dt.date:
    """The UTC day of the newest stored request: the day a range must name to hold the
    test's requests (today's date, read after they were stored, may be the next day)."""
    newest: dt.datetime = nbchat.usage(db=db)["created_at"].max()
    return newest.astimezone(dt.UTC).date()


@pytest.fixture
def filled(tmp_path: Path, fake: FakeOpenAIServer) -> Iterator[Filled]:
    with prices():
        yield fill_store(str(tmp_path / "chats.duckdb"), fake)


def ticks(ax: object) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]  # type: ignore[attr-defined]


def test_the_dashboard_shows_spend_models_sessions_tools_and_latency(filled: Filled) -> None:
    board = nbchat.dashboard(db=filled.db)
    assert isinstance(board, widgets.VBox) and isinstance(board, Dashboard)
    assert "5 requests in 3 sessions, $0.00634 known cost" in board.summary.value
    assert "plus 1 request of unknown cost" in board.summary.value
    # the charts: PNG images, and the Axes they were drawn from
    for image in (board.spend, board.by_model, board.latency):
        assert image.value[:4] == b"\x89PNG"
    assert ticks(board.axes["spend"]) == [str(stored_day(filled.db))]
    assert ticks(board.axes["by_model"]) == [PRICED, CHEAP, MYSTERY]
    assert ticks(board.axes["latency"]) == sorted([PRICED, CHEAP, MYSTERY])
    spent = sum(p.get_height() for c in board.axes["spend"].containers for p in c)
    assert spent == pytest.approx(0.006 + 0.00034)
    # top sessions, most expensive first; unknown spend is said, not shown as $0
    assert [b.description for b in board.session_buttons] == [
        f"Priced work · {filled.priced[:8]} — $0.006 · 2 req",
        f"Cheap tools · {filled.cheap[:8]} — $0.00034 · 2 req",
        f"third · {filled.mystery[:8]} — cost unknown · 1 req (1 of unknown cost)",  # its question
    ]
    # tools: one of the two flaky calls failed
    assert board.tool_errors is not None
    assert board.tool_errors[["tool", "calls", "errors", "error_rate"]].to_dict("records") == [
        {"tool": "flaky", "calls": 2, "errors": 1, "error_rate": 0.5}
    ]
    assert "<td>flaky</td><td>2</td><td>1</td><td>50%</td>" in board.tools.value
    assert board.transcript.value == ""


def test_clicking_a_session_shows_its_transcript_below(filled: Filled) -> None:
    board = nbchat.dashboard(db=filled.db)
    cheap, mystery = board.session_buttons[1], board.session_buttons[2]
    cheap.click()
    assert board.selected == filled.cheap
    shown = board.transcript.value
    assert filled.cheap in shown
    assert shown.index("use the tool") < shown.index("asks for") < shown.index("done")
    assert "<b>tool flaky</b><pre>{&quot;ok&quot;: false" in shown  # the failed call's result
    assert "ValueError: odd" in shown
    assert cheap.button_style == "info" and mystery.button_style == ""
    mystery.click()
    assert "three &lt;b&gt;bold&lt;/b&gt;" in board.transcript.value  # raw HTML escaped
    assert "<b>bold</b>" not in board.transcript.value
    assert (cheap.button_style, mystery.button_style) == ("", "info")


def test_picking_dates_filters_and_refresh_reads_new_requests(
    filled: Filled, fake: FakeOpenAIServer
) -> None:
    board = nbchat.dashboard(db=filled.db)
    board.session_buttons[0].click()
    day = stored_day(filled.db)
    board.since.value = day + dt.timedelta(days=1)  # picking a date redraws at once
    assert "0 requests in 0 sessions, $0.00 known cost" in board.summary.value  # not "$?"
    assert board.session_buttons == [] and board.transcript.value == ""
    assert "no sessions in this range" in board.sessions_list.children[-1].value
    assert "no tool calls in this range" in board.tools.value
    assert [t.get_gid() for t in board.axes["spend"].texts] == ["empty"]

    board.since.value, board.until.value = day, day  # both days included
    assert "5 requests in 3 sessions" in board.summary.value

    late = Session(model=PRICED, base_url=fake.url, api_key="sk-test", db=filled.db)
    fake.enqueue("late", usage={"prompt_tokens": 10_000, "completion_tokens": 0})
    with prices():
        late.send("one more")
    assert "5 requests" in board.summary.value  # nothing changes until asked
    board.refresh_button.click()
    assert "6 requests in 4 sessions, $0.0163 known cost" in board.summary.value
    assert board.session_buttons[0].description.startswith(f"one more · {late.id[:8]} — $0.01 ")


def test_a_small_session_cost_shows_its_significant_digits(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    db = str(tmp_path / "tiny.duckdb")
    register_price("tiny-model", input_per_mtok=3.93, output_per_mtok=0.0)
    try:
        fake.enqueue("small", usage={"prompt_tokens": 10, "completion_tokens": 0})
        Session(model="tiny-model", base_url=fake.url, api_key="k", db=db).send("a small one")
    finally:
        forget_price("tiny-model")
    board = nbchat.dashboard(db=db)
    (button,) = board.session_buttons
    assert " — $0.0000393 · 1 req" in button.description  # was "$0.0000"
    assert "1 request in 1 session, $0.0000393 known cost" in board.summary.value


def test_a_store_that_cannot_be_read_is_said_in_the_dashboard(tmp_path: Path) -> None:
    broken = tmp_path / "not-a-store.duckdb"
    broken.write_text("this is not a DuckDB file")
    board = nbchat.dashboard(db=str(broken))
    assert board.summary.value.startswith("<b>Could not read the store:</b>")
    assert board.session_buttons == []


def test_a_range_covering_everything_shows_what_all_time_shows(filled: Filled) -> None:
    # All time reads the per-session counters; a range, the per-day ones: they agree.
    all_time = nbchat.dashboard(db=filled.db)
    day = stored_day(filled.db)
    ranged = nbchat.dashboard(db=filled.db, since=day, until=day)
    assert [b.description for b in ranged.session_buttons] == [
        b.description for b in all_time.session_buttons
    ]
    assert ranged.summary.value.split(":", 1)[1] == all_time.summary.value.split(":", 1)[1]
    assert ranged.tool_errors is not None and all_time.tool_errors is not None
    assert ranged.tool_errors.equals(all_time.tool_errors)


def test_a_refresh_draws_again_only_the_charts_whose_figures_changed(
    filled: Filled, fake: FakeOpenAIServer
) -> None:
    board = nbchat.dashboard(db=filled.db)
    drawn = {name: getattr(board, name).value for name in board.axes}
    charted = dict(board._charted)
    board.refresh()  # nothing new: the same pictures, not drawn again
    assert {name: getattr(board, name).value for name in board.axes} == drawn
    assert all(board._charted[name] is charted[name] for name in charted)

    def spent(ax: object) -> float:
        return sum(p.get_height() for c in ax.containers for p in c)  # type: ignore[attr-defined]

    before = spent(board.axes["by_model"])
    late = Session(model=CHEAP, base_url=fake.url, api_key="sk-test", db=filled.db)
    fake.enqueue("late", usage={"prompt_tokens": 20_000, "completion_tokens": 0})
    with prices():
        late.send("one more")
    board.refresh()
    # a new request: every chart drawn again, from the new figures
    for name, png in drawn.items():
        assert board._charted[name] is not charted[name] and getattr(board, name).value != png
    assert spent(board.axes["by_model"]) == pytest.approx(before + 0.01)
    assert spent(board.axes["spend"]) == pytest.approx(before + 0.01)
    cheap = next(
        line for line in board.axes["latency"].lines if line.get_gid() == f"median:ttft_ms:{CHEAP}"
    )
    ttfts = nbchat.usage(db=filled.db).query("model == @CHEAP")["ttft_ms"].astype(float)
    assert cheap.get_ydata()[0] == pytest.approx(ttfts.median() / 1000)


def test_a_sampled_latency_is_kept_until_a_request_is_added(
    filled: Filled, fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbchat import _analysis

    monkeypatch.setattr(_analysis, "LATENCY_SAMPLE_ABOVE", 0)  # this small store is "large"
    first = _analysis.overview(db=filled.db)
    assert first.latency_sampled
    again = _analysis.overview(db=filled.db, previous=first)
    assert again.latency is first.latency  # the same requests: not sampled again
    other_days = _analysis.overview(db=filled.db, since=stored_day(filled.db), previous=first)
    assert other_days.latency is not first.latency  # another range: read
    late = Session(model=CHEAP, base_url=fake.url, api_key="sk-test", db=filled.db)
    fake.enqueue("late")
    late.send("one more")
    after = _analysis.overview(db=filled.db, previous=again)
    assert after.latency is not first.latency  # a request was added: sampled again
    assert int(after.spend["requests"].sum()) == int(first.spend["requests"].sum()) + 1


def test_sums_that_differ_in_their_last_bits_are_the_same_figures() -> None:
    import pandas as pd

    from nbchat._dashboard import _same_figures

    def spend(cost: float, requests: int) -> pd.DataFrame:
        return pd.DataFrame(
            {"model": ["a", "b"], "requests": [requests, 1], "cost_usd": [cost, float("nan")]}
        )

    total = 0.1 + 0.2 + 0.3  # the same sum in another order: 0.6 vs 0.6000000000000001
    assert total != 0.3 + 0.2 + 0.1
    assert _same_figures(spend(total, 3), spend(0.3 + 0.2 + 0.1, 3))
    assert not _same_figures(spend(total, 3), spend(total, 4))  # one more request
    assert not _same_figures(spend(total, 3), spend(total + 0.0001, 3))
    assert not _same_figures(spend(total, 3), spend(total, 3).iloc[:1])


def test_a_refresh_relabels_the_session_buttons_it_has(
    filled: Filled, fake: FakeOpenAIServer
) -> None:
    board = nbchat.dashboard(db=filled.db)
    buttons = list(board.session_buttons)
    board.session_buttons[1].click()
    late = Session(model=PRICED, base_url=fake.url, api_key="sk-test", db=filled.db)
    fake.enqueue("late", usage={"prompt_tokens": 10_000, "completion_tokens": 0})
    with prices():
        late.send("one more")
    board.refresh()  # a new most expensive session: four buttons, the first three kept
    assert board.session_buttons[:3] == buttons and len(board.session_buttons) == 4
    assert board.session_buttons[0].description.startswith(f"one more · {late.id[:8]}")
    assert [b.button_style for b in board.session_buttons] == ["", "", "info", ""]
    board.session_buttons[0].click()  # a kept button shows the session it now names
    assert board.selected == late.id and late.id in board.transcript.value
    board.since.value = stored_day(filled.db) + dt.timedelta(days=1)
    assert board.session_buttons == []
    assert "no sessions in this range" in board.sessions_list.children[-1].value


def test_a_session_whose_price_is_partly_unknown_never_reads_as_free() -> None:
    from nbchat._dashboard import _session_cost

    # Its failed requests cost $0 and the rest has no price: not "$0.00".
    some = {"requests": 5, "unknown": 4, "cost_usd": 0.0}
    assert _session_cost(some) == "≥ $0.00 · 5 req (4 of unknown cost)"
    known = {"requests": 3, "unknown": 0, "cost_usd": 0.0}
    assert _session_cost(known) == "$0.00 · 3 req"


def test_a_session_of_unknown_price_ranks_above_failed_requests_and_latency_leaves_them_out(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    # A trial's dashboard listed a session whose requests had all failed ($0) above one
    # whose model has no price, and drew the failures' millisecond replies as latency.
    db = str(tmp_path / "chats.duckdb")
    failing = Session(model="failing-model", base_url=fake.url, db=db, max_retries=0)
    fake.enqueue_error(500)
    assert failing.send("hello").status == "error"
    mystery = Session(model=MYSTERY, base_url=fake.url, db=db, max_retries=0)
    fake.enqueue("an answer")
    assert mystery.send("hello").status == "completed"
    for days in ({}, {"since": stored_day(db), "until": stored_day(db)}):
        board = nbchat.dashboard(db=db, **days)
        assert [b.description.split(" · ")[1][:8] for b in board.session_buttons] == [
            mystery.id[:8],
            failing.id[:8],
        ], days
        assert ticks(board.axes["latency"]) == [MYSTERY], days
