"""The storage seam: only ``nbchat/_store/`` speaks SQL or knows DuckDB, and what it owns
(the table list, the stored kinds, session titles, cells → sessions) is said once."""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import pytest

from nbchat import StoreError
from nbchat._analysis import sessions, sql, usage
from nbchat._events import MessageAdded, MessagesMarked, TurnStarted, UsageEvent
from nbchat._store import TABLES, Store, pending_tool_calls
from nbchat._store._queries import QUERIES
from nbchat._store._rows import STORED_KINDS, session_title
from nbchat._types import Message, RequestUsage, ToolCall, Usage

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nbchat"
STORE = PACKAGE / "_store"

# SQL as code writes it, not as prose mentions it ("runs SELECT queries").
_SQL = re.compile(
    r"\bSELECT\b.+\bFROM\b|\bINSERT\s+(OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b"
    r"|\bDELETE\s+FROM\b|\b(CREATE|ALTER|DROP)\s+TABLE\b|\bBEGIN\s+TRANSACTION\b",
    re.S,
)


def _outside_store() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if STORE not in p.parents]


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string constant except docstrings (and help set as ``x.__doc__ = ...``)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Attribute) and t.attr == "__doc__" for t in node.targets
        ):
            docstrings.update(id(part) for part in ast.walk(node.value))
    found = []
    for node in ast.walk(tree):
        is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
        if is_text and id(node) not in docstrings:
            found.append((node.lineno, node.value))
    return found


def test_only_the_store_package_imports_duckdb() -> None:
    offenders = []
    for path in _outside_store():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"^\s*(import duckdb|from duckdb\b)|\bduckdb\.", code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_only_the_store_package_writes_sql() -> None:
    offenders = []
    for path in _outside_store():
        tree = ast.parse(path.read_text())
        for number, text in _string_literals(tree):
            if _SQL.search(text):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {text[:60]!r}")
    assert offenders == []


def test_the_grep_would_see_sql_if_it_were_there() -> None:
    tree = ast.parse('"""SELECT x FROM docstring"""\nq = "SELECT id FROM sessions"\n')
    assert [t for _, t in _string_literals(tree) if _SQL.search(t)] == ["SELECT id FROM sessions"]


def test_nothing_outside_the_row_mapping_lists_the_stored_kinds() -> None:
    # A module that names three or more stored kinds in one place is keeping its own list.
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == STORE / "_rows.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Set | ast.List | ast.Tuple | ast.Dict):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                kinds = {
                    item.value
                    for item in items
                    if isinstance(item, ast.Constant) and item.value in STORED_KINDS
                }
                if len(kinds) >= 3:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


# --------------------------------------------------------------------------- the table list


def test_the_tables_are_the_schema_without_its_bookkeeping(store_db: str) -> None:
    with Store.open(store_db) as store:
        names = set(sql("SELECT table_name FROM information_schema.tables", db=store)["table_name"])
    # _migrations and the counters kept on write (m007) are bookkeeping, not data.
    assert set(TABLES) == {name for name in names if not name.startswith("_")}
    assert {"_migrations", "_session_counts", "_turn_counts", "_usage_by_day"} <= names


def test_the_readme_lists_the_tables() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"transaction: it cannot change the store\. Tables: (.*?)\.\n", readme, re.S)
    assert match, "the README's sql() paragraph should end with its table list"
    assert re.findall(r"`(\w+)`", match.group(1)) == list(TABLES)


def test_the_sql_help_lists_the_tables() -> None:
    from nbchat._magics import ChatMagics

    listed = ", ".join(TABLES)
    assert f"Tables: {listed}." in (sql.__doc__ or "").replace("\n    ", " ")
    assert f"Tables: {listed}." in (ChatMagics.chat_sql.__doc__ or "")


def test_every_named_query_has_a_name_in_the_interface() -> None:
    from typing import get_args

    from nbchat._store import QueryName

    assert set(get_args(QueryName)) == set(QUERIES)


# --------------------------------------------------------------------------- the interface


def test_store_open_is_the_duckdb_backend_for_a_path(db_path: Path) -> None:
    from nbchat._store._duckdb import DuckDBStore

    with Store.open(db_path) as store:
        assert isinstance(store, DuckDBStore) and isinstance(store, Store)


def test_a_postgres_url_is_the_postgresql_backend(pg_url: str) -> None:
    from nbchat._store._postgres import PostgresStore

    with Store.open(pg_url) as store:
        assert isinstance(store, PostgresStore) and isinstance(store, Store)
    with Store.open(pg_url.replace("postgresql://", "postgres://", 1)) as store:
        assert isinstance(store, PostgresStore)


def test_user_sql_errors_are_store_errors(store_db: str) -> None:
    with Store.open(store_db) as store:
        for query in ("SELEC 1", "SELECT * FROM nowhere", "SELECT 1; SELECT 2"):
            with pytest.raises(StoreError):
                sql(query, db=store)


def test_pending_tool_calls_is_one_function() -> None:
    asked = Message(
        role="assistant",
        tool_calls=[ToolCall(id="a", name="f"), ToolCall(id="b", name="f")],
    )
    answered = Message(role="tool", content="1", tool_call_id="a")
    assert [c.id for c in pending_tool_calls([asked, answered])] == ["b"]
    assert pending_tool_calls([asked, answered, Message(role="user", content="x")]) == []


def test_the_store_says_which_calls_are_pending(store_db: str) -> None:
    asked = Message(role="assistant", seq=0, tool_calls=[ToolCall(id="a", name="f")])
    with Store.open(store_db) as store:
        store.create_session(session_id="s", model="m", system_prompt=None, messages=[asked])
        assert [c.id for c in store.pending_tool_calls("s")] == ["a"]
        assert store.load_session("s").pending_tool_calls() == store.pending_tool_calls("s")


def test_session_usage_counts_unknowns_as_unknown(store_db: str) -> None:
    with Store.open(store_db) as store:
        store.create_session(session_id="s", model="m", system_prompt=None)
        assert store.session_usage("s").requests == 0
        assert store.session_usage("s").cost_usd == 0
        store.write(
            UsageEvent(
                session_id="s",
                model="m",
                usage=RequestUsage(prompt_tokens=3, completion_tokens=2),
                cost_usd=0.5,
            )
        )
        store.write(UsageEvent(session_id="s", model="m", cost_usd=None))
        store.write(
            UsageEvent(
                session_id="s",
                model="m",
                usage=RequestUsage(prompt_tokens=10, completion_tokens=None),
                cost_usd=0.25,
            )
        )
        spent = store.session_usage("s")
    assert spent.requests == 3 and spent.cost_usd is None and spent.prompt_tokens is None
    # What is known stays known: the sums of the counted requests, and how many are not.
    assert (spent.known_tokens, spent.requests_without_tokens) == (5, 2)
    assert (spent.known_cost_usd, spent.requests_without_cost) == (0.75, 1)
    # The same as a session's own sum of those requests.
    summed = (
        Usage()
        .add(RequestUsage(prompt_tokens=3, completion_tokens=2), 0.5)
        .add(None, None)
        .add(RequestUsage(prompt_tokens=10), 0.25)
    )
    assert summed == spent


# --------------------------------------------------------------------------- issue 13 items


def test_a_session_is_titled_after_its_first_message(store_db: str) -> None:
    long = "Please   explain\nthe difference between a list and a tuple in Python, with examples"
    with Store.open(store_db) as store:
        store.create_session(session_id="s", model="m", system_prompt=None)
        store.create_session(session_id="named", model="m", system_prompt=None, title="Mine")
        store.write(TurnStarted(session_id="s", turn_id="t1", text=long))
        store.write(TurnStarted(session_id="s", turn_id="t2", text="second question"))
        store.write(TurnStarted(session_id="named", turn_id="t3", text="hello"))
        titles = dict(zip(*[sessions(db=store)[c] for c in ("id", "title")], strict=True))
    assert titles["named"] == "Mine"
    assert titles["s"] == session_title(long)
    assert titles["s"].startswith("Please explain the difference") and titles["s"].endswith("…")
    assert len(titles["s"]) <= 60


def test_a_short_or_empty_first_message_gives_its_text_or_no_title() -> None:
    assert session_title("  hi\n there ") == "hi there"
    assert session_title("   ") is None


def _user(store: Store, sid: str, seq: int, cell_id: str | None) -> Message:
    message = Message(role="user", content="q", seq=seq, turn_id=f"t{seq}", cell_id=cell_id)
    store.write(MessageAdded(session_id=sid, turn_id=f"t{seq}", message=message))
    return message


def test_session_for_cell_finds_the_latest_live_use_of_the_cell(store_db: str) -> None:
    with Store.open(store_db) as store:
        store.create_session(session_id="a", model="m", system_prompt=None, notebook="n1.ipynb")
        store.create_session(session_id="b", model="m", system_prompt=None, notebook="n2.ipynb")
        _user(store, "a", 0, "cell-1")
        assert store.session_for_cell("cell-1") == "a"
        later = _user(store, "b", 0, "cell-1")
        assert store.session_for_cell("cell-1") == "b"
        assert store.session_for_cell("cell-1", "n1.ipynb") == "a"
        assert store.session_for_cell("cell-2") is None
        # A re-run that replaced the message no longer ties the cell to that session.
        store.write(MessagesMarked(session_id="b", message_ids=[later.id], state="superseded"))
        assert store.session_for_cell("cell-1") == "a"


def test_usage_shows_the_estimates_beside_the_actuals(store_db: str) -> None:
    with Store.open(store_db) as store:
        store.create_session(session_id="s", model="m", system_prompt=None)
        store.write(
            UsageEvent(
                session_id="s",
                model="m",
                usage=RequestUsage(prompt_tokens=12, completion_tokens=1),
                estimated_prompt_tokens=10,
                estimated_cost_usd=0.01,
            )
        )
        store.write(UsageEvent(session_id="s", model="m", purpose="summary"))
        frame = usage(db=store)
    assert str(frame["estimated_prompt_tokens"].dtype) == "Int64"
    assert frame["estimated_prompt_tokens"].tolist()[0] == 10
    assert frame["estimated_prompt_tokens"].isna().tolist() == [False, True]
    assert frame["estimated_cost_usd"].tolist()[0] == pytest.approx(0.01)


# --------------------------------------------------------------------------- the one cache


def test_analysis_calls_reuse_the_one_cached_connection(db_path: Path) -> None:
    from nbchat._store._leases import cached_lease

    Store.open(db_path).close()
    usage(db=db_path)
    lease = cached_lease(str(db_path.resolve()))
    assert lease is not None
    opens = lease.stats()["opens"]
    for _ in range(3):
        usage(db=db_path)
    assert lease.stats()["opens"] == opens  # still attached: no open per call
    with Store.open(db_path) as store:
        assert store._lease is lease  # type: ignore[attr-defined]
    # With nobody using it, the file is let go after the linger (0.5 s), not held.
    usage(db=db_path)
    deadline = time.monotonic() + 5
    while lease.stats()["open"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lease.stats()["open"]
