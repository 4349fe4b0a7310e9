"""Sessions, transcripts, usage and costs as pandas DataFrames.

Every function takes ``db=``: a path, ``":memory:"``, an open ``Store``, or ``None``
for the default store (``NBCHAT_DB`` or ``~/.nbchat/nbchat.duckdb``). Timestamps are
timezone-aware UTC; token counts are nullable integers (``<NA>`` when the server did
not report them); costs are floats with ``NaN`` where the price is unknown — an
unknown cost is never counted as 0, and the aggregates say how many requests had one.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ._exceptions import UnknownSession
from ._store import TABLES, Db, QueryName, open_store

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "attachments",
    "compactions",
    "costs",
    "highlights",
    "reprice",
    "search",
    "sessions",
    "sql",
    "tool_calls",
    "transcript",
    "turns",
    "usage",
]

# The named query of each costs(by=...) view.
_COST_VIEWS: dict[str, QueryName] = {
    "model": "costs_by_model",
    "day": "costs_by_day",
    "session": "costs_by_session",
    "notebook": "costs_by_notebook",
    "user": "costs_by_user",
    "tag": "costs_by_tag",
}
CostGrouping = Literal["model", "day", "session", "notebook", "user", "tag"]


def sessions(db: Db = None) -> pd.DataFrame:
    """One row per session, oldest first.

    Columns: ``id``, ``title``, ``model``, ``created_at``, ``last_active`` (latest
    message or request), ``turns`` (live ones), ``superseded_turns`` (replaced by a
    cell re-run), ``messages`` (active ones), ``requests``, ``prompt_tokens``,
    ``completion_tokens`` (sums of reported counts), ``cost_usd`` (sum of known costs;
    NaN if no answered request's price is known), ``unknown_cost_requests`` (requests
    whose price is unknown: when > 0 the true spend is higher than ``cost_usd``),
    ``system_prompt``, ``parent_id``, ``notebook``, ``metadata`` (dict).
    """
    with open_store(db) as store:
        return store.frame("sessions")


def transcript(
    session_id: str,
    db: Db = None,
    include_compacted: bool = False,
    include_superseded: bool = False,
) -> pd.DataFrame:
    """The messages of one session in conversation order (``seq``).

    By default only the live context (state ``active``); ``include_compacted`` adds
    messages folded into a summary, ``include_superseded`` those replaced by a cell
    re-run. Columns: ``seq``, ``role``, ``content``, ``name``, ``tool_calls`` (list of
    dicts with id, name, arguments), ``tool_call_id``, ``status`` (ok, interrupted,
    error, cancelled, aborted, ...), ``state``, ``turn_id``, ``round``, ``cell_id``,
    ``created_at``, ``id``, ``attachments`` (list of dicts: sha256, mime, size, width,
    height, detail, name, url; the bytes stay in the store, see ``attachments()``).
    """
    with open_store(db) as store:
        frame = store.frame(
            "transcript",
            session_id=session_id,
            include_compacted=include_compacted,
            include_superseded=include_superseded,
        )
        # Asked only when nothing came back: a stored session has messages, mostly.
        if frame.empty and not store.has_session(session_id):
            raise UnknownSession(f"No session {session_id} in {store.path}.")
    if include_compacted or include_superseded:
        return frame
    return _summary_in_place(frame)


def _summary_in_place(frame: pd.DataFrame) -> pd.DataFrame:
    """The live summary right after the system prompt, as in the context: a store
    written before summaries were numbered in place has it after newer messages."""
    summary = (frame["status"] == "summary").to_numpy().nonzero()[0]
    if len(summary) == 0:
        return frame
    at = 1 if frame["role"].iloc[0] == "system" and frame["status"].iloc[0] != "summary" else 0
    where = int(summary[-1])
    if where == at:
        return frame
    order = [i for i in range(len(frame)) if i != where]
    order.insert(at, where)
    return frame.iloc[order].reset_index(drop=True)


def attachments(
    db: Db = None, session_id: str | None = None, *, with_data: bool = False
) -> pd.DataFrame:
    """One row per image a message carried, oldest first.

    Columns: ``created_at``, ``session_id``, ``message_id``, ``seq``, ``role``, ``name``,
    ``sha256`` (an image sent twice is stored once), ``mime``, ``size`` (bytes),
    ``width``, ``height``, ``detail``, ``url`` (for images sent by URL), and ``data``:
    the bytes only with ``with_data=True`` (a store full of screenshots stays fast).
    """
    with open_store(db) as store:
        return store.frame("attachments", with_data=with_data, session_id=session_id)


def usage(db: Db = None, session_id: str | None = None) -> pd.DataFrame:
    """One row per model request (chat and summary requests), oldest first.

    Columns: ``created_at``, ``session_id``, ``turn_id``, ``round``, ``model``,
    ``provider``, ``purpose`` (chat or summary), ``prompt_tokens``,
    ``completion_tokens``, ``cached_tokens``, ``reasoning_tokens``,
    ``cache_write_tokens``, ``total_tokens`` (``<NA>`` when unreported), ``cost_usd``
    (NaN = unknown price), ``cost_source``, ``ttft_ms`` (time to the first token),
    ``first_text_ms`` (to the first token of the answer), ``duration_ms``,
    ``finish_reason``, ``error``, ``estimated_prompt_tokens`` and
    ``estimated_cost_usd`` (what the budget check estimated before sending a chat
    request; ``<NA>``/NaN for others), ``suspected_truncation``, ``attempts`` (HTTP
    attempts: above 1 when the client retried a 429, a 5xx or a lost connection;
    ``<NA>`` on rows stored before nbchat counted them), ``retried_after`` (what the
    retried attempts got: "HTTP 429"), ``id``.
    """
    with open_store(db) as store:
        return store.frame("usage", session_id=session_id)


def tool_calls(db: Db = None, session_id: str | None = None) -> pd.DataFrame:
    """One row per tool call that ran (or failed), oldest first.

    Columns: ``created_at``, ``session_id``, ``turn_id``, ``round``, ``call_id``,
    ``name``, ``arguments`` (the model's raw JSON text), ``result`` (what the model
    saw), ``is_error``, ``error_kind``, ``duration_ms``, ``id``.
    """
    with open_store(db) as store:
        return store.frame("tool_calls", session_id=session_id)


def compactions(db: Db = None, session_id: str | None = None) -> pd.DataFrame:
    """One row per compaction of a session's history (failed attempts too), oldest first.

    Columns: ``created_at``, ``session_id``, ``turn_id``, ``strategy``, ``from_seq``,
    ``to_seq`` (the folded message range), ``tokens_before``, ``tokens_after``,
    ``model``, ``cost_usd``, ``summary``, ``error`` (set when the attempt failed and
    the history stayed as it was), ``id``.
    """
    with open_store(db) as store:
        return store.frame("compactions", session_id=session_id)


def turns(db: Db = None, session_id: str | None = None) -> pd.DataFrame:
    """One row per turn (one ``send()`` or ``%%chat`` cell), oldest first.

    Columns: ``started_at``, ``finished_at`` (NaT while running or if the process
    died), ``session_id``, ``status`` (how it ended), ``state`` (``active``, or
    ``superseded`` once a cell re-run replaced it, or ``compacted``), ``user_text``,
    ``rounds``, ``requests``, ``prompt_tokens``, ``completion_tokens``, ``cost_usd``
    (NaN = unknown), ``duration_ms``, ``error``, ``cell_id``, ``id``.
    """
    with open_store(db) as store:
        return store.frame("turns", session_id=session_id)


def costs(by: CostGrouping = "model", db: Db = None) -> pd.DataFrame:
    """Requests, tokens and dollars grouped by model, UTC day, session, notebook, user or tag.

    Key columns: ``model`` and ``provider`` (sorted by cost, highest first), ``day``
    (the UTC calendar day, a ``datetime.date``, oldest first), ``session_id``,
    ``title``, ``first_request_at``, ``notebook``, ``user`` (``JUPYTERHUB_USER`` or the
    OS user who ran the session), or ``tag`` (``Session(tags=...)``; a session with
    several tags counts in each). Then ``requests``, ``prompt_tokens``,
    ``completion_tokens``, ``cached_tokens``, ``cost_usd`` (sum of known costs; NaN
    when no answered request's cost is known; a request refused before any token
    costs 0) and
    ``unknown_cost_requests`` — requests whose price is unknown, never counted as 0:
    when it is above 0 the real spend is higher than ``cost_usd``.
    """
    if by not in _COST_VIEWS:
        raise ValueError(f"costs(by=...) must be one of {', '.join(_COST_VIEWS)}, not {by!r}.")
    with open_store(db) as store:
        return store.frame(_COST_VIEWS[by])


def sql(
    query: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
    db: Db = None,
    *,
    allow_files: bool = False,
) -> pd.DataFrame:
    """Run one read-only SELECT against the store and return its rows.

    Use ``?`` placeholders with a list of ``params`` (or ``$name`` ones with a dict)
    rather than formatting values into the text. Anything but a SELECT (INSERT,
    UPDATE, DROP, ATTACH, SET, ...) is refused, and the query runs sandboxed on the
    store opened read-only: it cannot change the store, load extensions, or read other
    files (``read_csv``, ``glob``...) unless ``allow_files=True``.

    Tables: {tables}.
    """
    with open_store(db) as store:
        return store.sql(query, params, allow_files=allow_files)


sql.__doc__ = (sql.__doc__ or "").format(tables=", ".join(TABLES))


def reprice(model: str | None = None, db: Db = None) -> pd.DataFrame:
    """``usage()`` with every request's cost computed again from today's prices.

    For "what would this traffic have cost": after ``register_price()`` (or a newer
    genai-prices), requests stored before it show their cost from their token counts.
    ``cost_usd`` is the new figure (NaN where tokens or a price are still missing) and
    ``stored_cost_usd`` what was stored then; the store itself is not changed. ``model``
    keeps only that model's requests.
    """
    from ._pricing import request_cost
    from ._types import RequestUsage

    frame = usage(db=db)
    if model is not None:
        frame = frame[frame["model"] == model].reset_index(drop=True)
    frame = frame.rename(columns={"cost_usd": "stored_cost_usd"})

    import pandas as pd

    def count(value: Any) -> int | None:
        return None if pd.isna(value) else int(value)

    # Requests with the same model and token counts cost the same: priced once.
    prices: dict[tuple[Any, ...], float | None] = {}
    new_costs = []
    columns = ["model", "prompt_tokens", "completion_tokens", "cached_tokens"]
    for name, prompt, completion, cached in frame[columns].itertuples(index=False):
        key = (name, count(prompt), count(completion), count(cached))
        if key not in prices:
            tokens = RequestUsage(
                prompt_tokens=key[1], completion_tokens=key[2], cached_tokens=key[3]
            )
            prices[key] = request_cost(str(name), None, tokens)[0]
        new_costs.append(prices[key])
    position = list(frame.columns).index("stored_cost_usd")
    frame.insert(position, "cost_usd", [float("nan") if c is None else c for c in new_costs])
    return frame


def search(
    text: str, db: Db = None, *, session_id: str | None = None, limit: int = 50
) -> pd.DataFrame:
    """Messages that contain the words of ``text`` (case-insensitive), best matches first.

    Ranked by how many of the words a message has, then how often, then how recent. One
    row per message: ``session_id``, ``title``, ``seq``, ``role``, ``snippet`` (the text
    around the first match, the matches in ``**bold**``), ``state`` (superseded and
    compacted messages are found too), ``created_at``, ``matched`` (words found),
    ``content``, ``id``.
    """
    terms = _terms(text)
    with open_store(db) as store:
        frame = store.frame("search", terms=terms, session_id=session_id, limit=max(1, int(limit)))
    pattern = _pattern(terms)

    def snippet(content: str) -> str:
        return "".join(f"**{p}**" if hit else p for p, hit in snippet_pieces(content, pattern))

    frame.insert(4, "snippet", [snippet(c) for c in frame["content"]])
    columns = ["session_id", "title", "seq", "role", "snippet", "state", "created_at"]
    return frame[[*columns, "matched", "content", "id"]]


def highlights(contents: Iterable[str], text: str) -> list[list[tuple[str, bool]]]:
    """Each content's snippet as in ``search(text)``, as (piece, is_match) pairs, unmarked.

    For displays that mark the matches their own way (``%chat search``'s HTML table):
    a snippet's ``**`` cannot be told from the ``**`` of the message's own Markdown.
    """
    pattern = _pattern(_terms(text))
    return [snippet_pieces(c, pattern) for c in contents]


# A Markdown code fence's own line (```python, ~~~): in a one-line snippet it is noise.
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*$", re.M)


def snippet_pieces(content: str, pattern: re.Pattern[str]) -> list[tuple[str, bool]]:
    """The text around the first match (160 characters, "…" where cut), split at matches;
    code fences' lines left out (the code inside stays), white space run together."""
    content = " ".join(_FENCE.sub("", content).split())
    found = pattern.search(content)
    start = max(0, (found.start() if found else 0) - 60)
    piece = content[start : start + 160]
    pieces: list[tuple[str, bool]] = [("…", False)] if start else []
    at = 0
    for m in pattern.finditer(piece):
        pieces += [(piece[at : m.start()], False), (m.group(0), True)]
        at = m.end()
    pieces.append((piece[at:], False))
    if start + 160 < len(content):
        pieces.append(("…", False))
    return [(p, hit) for p, hit in pieces if p]


def _terms(text: str) -> list[str]:
    terms = sorted({t.lower() for t in text.split() if t.strip()})
    if not terms:
        raise ValueError("search() needs at least one word to look for.")
    return terms


def _pattern(terms: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)), re.I)


# ------------------------------------------------------------------ the dashboard's reads


@dataclass(frozen=True)
class Overview:
    """What the dashboard shows for a range of UTC days, read from the store's counters.

    ``spend``: day, model, requests, cost_usd (known; NaN if none), unknown.
    ``top_sessions``: the most expensive sessions (session_id, title, the same sums,
    ``sessions_in_range`` on every row). ``latency``: per model and metric (ttft_ms,
    duration_ms) the count and the 5th/25th/50th/75th/95th percentiles, from a sample when
    ``latency_sampled``. ``tools``: per tool, calls, errors and the median duration
    (from duration bins, within ~2%). ``days``: the range read (``since``, ``until``).
    """

    spend: pd.DataFrame
    top_sessions: pd.DataFrame
    latency: pd.DataFrame
    latency_sampled: bool
    tools: pd.DataFrame
    days: tuple[dt.date | None, dt.date | None] = (None, None)
    # The requests per model in the range when ``latency`` was read (a kept sample's).
    latency_requests: Mapping[str, int] = field(default_factory=dict)


# Past this many requests in the range the latency figures come from a ~2% sample,
# drawn again when a model's requests in the range changed by more than
# ``LATENCY_RESAMPLE_AFTER`` (a fraction) since it was drawn.
LATENCY_SAMPLE_ABOVE = 200_000
LATENCY_RESAMPLE_AFTER = 0.01


def overview(
    db: Db = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    top: int = 10,
    *,
    previous: Overview | None = None,
) -> Overview:
    """The dashboard's figures for the UTC days ``since`` to ``until`` (both included).

    ``previous`` is an overview read before: if it is of the same days, its latency came
    from a sample, and each model's requests in the range changed by at most
    ``LATENCY_RESAMPLE_AFTER`` since that sample was drawn, its latency figures are kept
    rather than sampled again. A sample of ~2% of the rows says nothing a handful of
    requests more would change (a new one would only move the boxes by chance), and on
    a large store it was the costliest read of a refresh after every request.
    """
    days = {"since": since, "until": until}
    start = None if since is None else dt.datetime.combine(since, dt.time(), dt.UTC)
    end = None if until is None else dt.datetime.combine(until, dt.time(), dt.UTC)
    instants = {"since": start, "until": None if end is None else end + dt.timedelta(days=1)}
    with open_store(db) as store:
        spend = store.frame("spend_by_day_model", **days)
        sampled = int(spend["requests"].sum()) > LATENCY_SAMPLE_ABOVE
        requests = _requests_per_model(spend)
        unchanged = (
            previous is not None
            and previous.days == (since, until)
            and previous.latency_sampled
            and sampled
            and nearly_the_same(previous.latency_requests, requests)
        )
        if unchanged:
            assert previous is not None
            latency, requests = previous.latency, dict(previous.latency_requests)
        else:
            latency = store.frame(
                "latency_by_model_sampled" if sampled else "latency_by_model", **instants
            )
        return Overview(
            spend=spend,
            top_sessions=(
                store.frame("spend_by_session_all", limit=max(1, int(top)))
                if since is None and until is None
                else store.frame("spend_by_session", **days, limit=max(1, int(top)))
            ),
            latency=latency,
            latency_sampled=sampled,
            tools=store.frame("tool_stats", **days),
            days=(since, until),
            latency_requests=requests,
        )


def _requests_per_model(spend: pd.DataFrame) -> dict[str, int]:
    sums = spend.groupby(spend["model"].fillna(""), sort=True)["requests"].sum()
    return {str(model): int(n) for model, n in sums.items()}


def nearly_the_same(before: Mapping[str, int], now: Mapping[str, int]) -> bool:
    """Whether requests per model ``now`` are those of ``before`` give or take
    ``LATENCY_RESAMPLE_AFTER`` of each (the same models, none new, none gone)."""
    if before.keys() != now.keys():
        return False
    return all(abs(now[m] - n) <= LATENCY_RESAMPLE_AFTER * n for m, n in before.items())
