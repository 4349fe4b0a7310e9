"""``%%chat``, ``%chat`` and ``%%chat_sql``: parse the magic line, hand off, return displays.

The magic line is parsed into one pydantic model per magic (``_magic_options``; the
same model writes the help that ``%%chat?`` shows). Everything else is
handed off: turns to ``Session.send`` (the cell renderer consumes its events),
queries to the analysis functions. Heavy modules (openai, pandas, duckdb) are imported
on first use, so ``%load_ext nbchat`` stays fast.

Notebook semantics live here because only the magic sees cells:

- the kernel keeps one *current session* per notebook; ``--new``, ``--session ID``,
  ``%chat new`` and ``%chat use ID`` switch it, and so does re-running a cell whose
  earlier turn is in another session (the cell goes back to its conversation);
- a ``pre_run_cell`` handler records the cell id JupyterLab / Notebook 7 send, and the
  turn is sent with it, so re-running a cell replaces that cell's earlier turn;
- options on a cell apply to that cell's turn only (model, tools, budget, ...).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, magics_class

from ._cell_message import CellMessage
from ._cell_sessions import CellSessions
from ._cell_turns import CellTurns
from ._config import get_defaults
from ._display import one_line, raise_for
from ._exceptions import (
    NbchatError,
    SessionPendingError,
    TurnFailed,
    TurnInterrupted,
)
from ._magic_commands import SUBCOMMANDS_HELP, Subcommands
from ._magic_help import CHAT_OPTIONS, SQL_OPTIONS, render_options
from ._notebook import NotebookCells
from ._store import TABLES

if TYPE_CHECKING:
    from ._display import CellRenderer
    from ._magic_options import ChatOptions
    from ._pytool import Approval
    from ._session import Session
    from ._tools import Tool
    from ._types import TurnResult

__all__ = ["ChatMagics", "load_ipython_extension", "magics_of", "unload_ipython_extension"]


# ---------------------------------------------------------------------- cells


class _Cells:
    """The ids of the cells running now (a ``%%capture`` cell runs its body as a nested cell)."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []

    def pre_run_cell(self, info: Any) -> None:
        self.stack.append([getattr(info, "cell_id", None), 0])

    def post_run_cell(self, result: Any) -> None:
        if self.stack:
            self.stack.pop()

    def cell_key_for_turn(self) -> str | None:
        """The cell id for the next turn; a second turn in one run gets ``id#2``, ..."""
        for frame in reversed(self.stack):
            if frame[0]:
                frame[1] += 1
                return str(frame[0]) if frame[1] == 1 else f"{frame[0]}#{frame[1]}"
        return None


def _replaced_cells(session: Session, cell_id: str | None) -> list[str]:
    """The cells whose turns a re-run of ``cell_id`` will replace (those after its own)."""
    if cell_id is None:
        return []
    history = session.history
    start = next(
        (i for i, m in enumerate(history) if m.role == "user" and m.cell_id == cell_id), None
    )
    if start is None:
        return []
    later = [m.cell_id for m in history[start + 1 :] if m.role == "user"]
    return list(dict.fromkeys(c for c in later if c is not None and c != cell_id))


def _replaces_notice(replaced: list[str]) -> str | None:
    """What a re-run cell says when it replaces later turns too."""
    if not replaced:
        return None
    n = len(replaced)
    later = "1 later turn" if n == 1 else f"{n} later turns"
    return f"This re-run replaces this cell's earlier turn and {later} of the conversation."


# ---------------------------------------------------------------------- the magics


@magics_class
class ChatMagics(Subcommands, CellSessions, CellMessage, Magics):
    """The nbchat magics of one IPython shell, and the notebook's current session."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.session: Session | None = None
        self.cells = _Cells()
        self.default_tools: list[str] = []
        # The session each cell's last turn went to, by cell id.
        self.cell_sessions: dict[str, Session] = {}
        self.cell_turns = CellTurns(shell)  # shows turns, keeps the latest displays
        self.notebook = NotebookCells(shell)
        # Kept with this kernel's defaults (%chat config shows them): model aliases
        # (%chat alias fast=gpt-4o-mini) and the size of values put in a message.
        self.aliases: dict[str, str] = {}
        self.max_context_chars: int | None = None

    def _help(self) -> str:
        """What ``%chat help`` and ``%%chat?`` show."""
        return ChatMagics.chat.__doc__ or ""

    @property
    def user_ns(self) -> dict[str, Any]:
        """The notebook's namespace."""
        assert self.shell is not None
        return cast(dict[str, Any], self.shell.user_ns)

    @line_cell_magic
    def chat(self, line: str, cell: str | None = None) -> Any:
        try:
            if cell is None:
                return self._subcommand(line)
            self._chat_cell(line, cell)
            return None
        except (TurnFailed, TurnInterrupted, UsageError):
            raise
        except SessionPendingError as exc:
            hint = " In a notebook: %chat resume, or %chat abort."
            raise one_line(SessionPendingError(f"{exc}{hint}")) from None
        except NbchatError as exc:
            raise one_line(exc) from None

    @cell_magic
    def chat_sql(self, line: str, cell: str) -> Any:
        from ._magic_options import SqlOptions, parse_options

        opts = parse_options(SqlOptions, line, "%%chat_sql")
        from ._analysis import sql

        try:
            frame = sql(cell, db=opts.db, allow_files=opts.allow_files)
        except NbchatError as exc:  # the store turns every database error into StoreError
            raise one_line(exc) from None
        if opts.out:
            self.user_ns[opts.out] = frame
        return frame

    # -------------------------------------------------------------- %%chat

    def _chat_cell(self, line: str, cell: str) -> None:
        from ._magic_options import ChatOptions, parse_options

        opts = parse_options(ChatOptions, line)
        if opts.model in self.aliases:
            opts = opts.model_copy(update={"model": self.aliases[opts.model]})
        if opts.endpoint:
            opts = opts.model_copy(update={"model": self._on_endpoint(opts)})
        text, attachments = self._message(opts, cell)
        output_type = self._schema(opts)
        tools = self._tools(opts.tools if opts.tools is not None else self.default_tools)
        cell_id = self.cells.cell_key_for_turn()
        # The "⏳" line first: on a first turn the store is opened (and the session
        # made) after it. Should that fail, the line goes and the cell's error says why.
        guess = opts.model or (self.session.model if self.session is not None else None)
        guess = guess or get_defaults().get("model") or os.environ.get("NBCHAT_MODEL", "")
        renderer = self.cell_turns.begin(opts, guess)
        try:
            resumed = self._stored_session_of(opts, cell_id)
            session = self._ready_to_send(self._session_for(opts, cell_id))
            replaced = _replaced_cells(session, cell_id)
            if opts.tag:
                session.tag(*opts.tag)
        except BaseException:
            renderer.withdraw()
            raise
        said = [n for n in (resumed, _replaces_notice(replaced)) if n]
        if cell_id is not None:
            self.cell_sessions[cell_id] = session
        result = self.cell_turns.show(
            session,
            opts,
            tools,
            lambda on_event, options: session.send(
                text,
                attachments=attachments,
                cell_id=cell_id,
                on_event=on_event,
                options=options,
                output_type=output_type,
            ),
            notice=" ".join(said) or None,
            cell_id=cell_id,
            renderer=renderer,
        )
        self.cell_turns.mark_superseded(replaced)  # their outputs stay on screen
        self._take_answer(opts, result, renderer)
        raise_for(result)

    def _on_endpoint(self, opts: ChatOptions) -> str:
        """``-e NAME``: the cell's model on the saved endpoint NAME (``NAME:model``)."""
        from ._endpoints import find_endpoint

        assert opts.endpoint is not None
        if find_endpoint(opts.endpoint) is None:
            raise UsageError(
                f"%%chat: -e {opts.endpoint}: no saved endpoint of that name "
                "(%chat endpoint lists them; %chat endpoint add NAME base_url=... saves one)"
            )
        model = (
            opts.model
            or (self.session.model if self.session else None)
            or get_defaults().get("model")
            or os.environ.get("NBCHAT_MODEL")
        )
        if not model:
            raise UsageError(f"%%chat: -e {opts.endpoint}: which model? Give -m MODEL.")
        prefix, colon, bare = model.partition(":")
        if colon and find_endpoint(prefix) is not None:
            model = bare  # -m other:model with -e: the endpoint named by -e wins
        return f"{opts.endpoint}:{model}"

    def _schema(self, opts: ChatOptions) -> Any:
        """The type ``--schema NAME`` names in the notebook, checked before anything is sent."""
        if opts.schema_ is None:
            return None
        value = self._lookup(opts.schema_)
        if value is None:
            raise UsageError(f"%%chat: --schema {opts.schema_}: no such type in the notebook")
        from pydantic import TypeAdapter

        try:
            TypeAdapter(value)
        except Exception as exc:  # what pydantic cannot validate, said in one line
            raise UsageError(
                f"%%chat: --schema {opts.schema_}: not a type pydantic can validate ({exc})"
            ) from None
        return value

    def _take_answer(self, opts: ChatOptions, result: TurnResult, shown: CellRenderer) -> None:
        """Put the answer where the cell asked: ``--out``, and the next cell for code."""
        completed = result.status == "completed"
        value: Any = result.text
        if opts.schema_ is not None:
            if not completed:
                return  # the cell ends with why; --out is left as it was
            value = result.output
        elif opts.format == "code" or opts.fix:
            from ._context import fix_candidates, reply_code

            value = reply_code(result.text, last_only=opts.fix)
            if completed and value:
                assert self.shell is not None
                self.shell.set_next_input(value, replace=False)
                several = len(fix_candidates(result.text)) if opts.fix else 0
                if several > 1:  # a trial wondered where the other blocks went
                    shown.note(
                        f"The next cell holds the last of the reply's {several} Python "
                        "blocks, as the corrected cell; the others stay in the reply."
                    )
        elif opts.format == "json" and completed:
            value = self._json_answer(opts, result.text, shown)
        if opts.out:
            self.user_ns[opts.out] = value

    def _json_answer(self, opts: ChatOptions, text: str, shown: CellRenderer) -> Any:
        """The reply parsed as JSON, shown pretty-printed in the reply's place (a trial
        saw it twice, as sent and again below); one line when it is not JSON."""
        import json

        from ._context import reply_code

        try:
            fenced = text.lstrip().startswith(("```", "~~~"))
            value = json.loads(reply_code(text) if fenced else text)
        except json.JSONDecodeError as exc:
            if opts.out:
                self.user_ns[opts.out] = text
            kept = f"; --out {opts.out} holds the text" if opts.out else ""
            raise NbchatError(
                f"The reply is not valid JSON ({exc.msg} at line {exc.lineno}){kept}"
            ) from None
        pretty = json.dumps(value, indent=2, ensure_ascii=False)
        shown.show_answer(f"```json\n{pretty}\n```")
        return value

    def _tools(self, specs: list[str], said: str = "%%chat: --tools") -> list[Tool]:
        """The tools ``specs`` name; ``said`` is how an error names the command."""
        from ._pytool import APPROVALS, python_tool
        from ._tools import as_tool

        tools = []
        for spec in specs:
            name, colon, mode = spec.partition(":")
            if name == "python":
                if colon and mode not in APPROVALS:
                    raise UsageError(
                        f"{said} python:{mode}: the python tool's approval is one of "
                        f"{', '.join(APPROVALS)}"
                    )
                tools.append(python_tool(self.user_ns, approval=cast("Approval", mode or "ask")))
                continue
            value = self._lookup(name)
            if value is None or not callable(value):
                raise UsageError(f"{said} {spec}: no function called {name!r} in the notebook")
            if colon:
                raise UsageError(
                    f"{said} {spec}: only the python tool takes an approval "
                    f"(python:{'|'.join(APPROVALS)}); {name} runs when the model calls it: "
                    f"write --tools {name}"
                )
            tools.append(as_tool(value))
        return tools

    def _lookup(self, dotted: str) -> Any:
        head, *attrs = dotted.split(".")
        value = self.user_ns.get(head)
        for attr in attrs:
            value = getattr(value, attr, None)
        return value


# The option tables of the help text, rendered from the one description of the options
# (the options models read it too) without importing pydantic.
CHAT_OPTIONS_HELP = render_options(CHAT_OPTIONS)
SQL_OPTIONS_HELP = render_options(SQL_OPTIONS)

ChatMagics.chat.__doc__ = f"""Chat with a model from a notebook cell.

%%chat [options]
Your message; {{name}} is replaced by the value of `name` in the notebook
({{{{name}}}} keeps the braces; other text in braces, such as JSON, is left alone).
{{In[3]}}, {{Out[3]}} and {{Err[3]}} are cell 3's source, result and error; {{Err}} is
the last error. DataFrames and other values are written for the model: shape,
dtypes and the first rows as a table, bounded by --max-context-chars.

The reply streams into the cell as Markdown; the next %%chat cell continues the
same conversation, and re-running a cell replaces its earlier turn. A kernel
interrupt stops the reply and keeps what arrived.

Options (model, tools, budget, max-rounds, temperature, no-stream apply to this
cell's turn only; new, session and system choose the conversation):
{CHAT_OPTIONS_HELP}

{SUBCOMMANDS_HELP}"""
ChatMagics.chat_sql.__doc__ = f"""Run SQL on the nbchat store; shows the result as a DataFrame.

%%chat_sql [--out VAR] [--db PATH] [--allow-files]
SELECT model, sum(cost_usd) FROM requests GROUP BY model

Tables: {", ".join(TABLES)}.

Options:
{SQL_OPTIONS_HELP}
"""


# ---------------------------------------------------------------------- extension

_loaded: weakref.WeakKeyDictionary[Any, ChatMagics] = weakref.WeakKeyDictionary()


def load_ipython_extension(shell: Any) -> None:
    """Register the magics and the cell-id handler on ``shell`` (idempotent)."""
    if shell in _loaded:
        return
    magics = ChatMagics(shell)
    shell.register_magics(magics)
    shell.events.register("pre_run_cell", magics.cells.pre_run_cell)
    shell.events.register("post_run_cell", magics.cells.post_run_cell)
    shell.events.register("post_run_cell", magics.notebook.post_run_cell)
    _loaded[shell] = magics
    if getattr(shell, "kernel", None) is not None and os.environ.get("NBCHAT_WARMUP") != "0":
        # In a notebook the first %%chat would pay ~1 s of imports; they happen now, on
        # a thread, while the user types (%load_ext itself stays as fast).
        threading.Thread(target=_warm_up, args=(shell,), name="nbchat-warm-up", daemon=True).start()


# What a first %%chat imports up to its placeholder, and after it (tests/test_warm_up.py
# checks none is left).
_PLACEHOLDER_MODULES = (
    *("_magic_options", "_cell_turns", "_context", "_images", "_pytool"),
    *("_display", "_render", "_throttle"),
)
_FIRST_TURN_MODULES = ("_session",)


def _warm_up(shell: Any = None) -> None:
    """Import and load what the first turn needs, in the order it needs it: the magic's
    options and the renderer, the shell's display formatters (the placeholder's first
    display builds them), the store (DuckDB, the file opened and migrated), openai, the
    loop, the HTTP client's SSL context, a trial Markdown render, nbchat's background
    event loop, and last genai-prices' data (wanted only once the text is shown). A
    failure here is not reported: the first turn meets it again and says it where the
    user looks."""
    with contextlib.suppress(Exception):
        for module in _PLACEHOLDER_MODULES:  # first: a slow machine may not get further
            importlib.import_module(f"{__package__}.{module}")
        if shell is not None:
            from ._display import render_mode

            render_mode(shell, stream=True)
        from ._store import warm_up as warm_store

        warm_store()
        import openai

        from . import _markup, _runner
        from ._http import http_client
        from ._pricing import provider_for

        for module in _FIRST_TURN_MODULES:
            importlib.import_module(f"{__package__}.{module}")
        openai.AsyncOpenAI  # noqa: B018 -- the SDK resolves its client class lazily
        http_client(timeout=60.0)  # builds the shared SSL context (~80 ms) and client class
        _markup.to_html("A *first* reply, $5 and `code`.")  # mistune's first parse is slow
        _runner.background_loop()
        provider_for("gpt-4o-mini")  # loads the price data


def unload_ipython_extension(shell: Any) -> None:
    """Remove what ``load_ipython_extension`` registered."""
    magics = _loaded.pop(shell, None)
    if magics is None:
        return
    shell.events.unregister("pre_run_cell", magics.cells.pre_run_cell)
    shell.events.unregister("post_run_cell", magics.cells.post_run_cell)
    shell.events.unregister("post_run_cell", magics.notebook.post_run_cell)
    _forget_magics(shell.magics_manager, magics, line=["chat"], cell=["chat", "chat_sql"])


def _forget_magics(manager: Any, magics: ChatMagics, *, line: list[str], cell: list[str]) -> None:
    """Take our magics out of IPython's ``MagicsManager``.

    IPython has ``register_magics`` but no public way to unregister them, so this edits
    its tables (``magics`` by kind, ``registry`` by class name) — the one place that
    does; tests/test_magics.py checks that the magics are really gone afterwards.
    """
    for kind, names in (("line", line), ("cell", cell)):
        for name in names:
            manager.magics[kind].pop(name, None)
    manager.registry.pop(type(magics).__name__, None)


def magics_of(shell: Any) -> ChatMagics | None:
    """The ``ChatMagics`` registered on ``shell``, if the extension is loaded."""
    return _loaded.get(shell)
