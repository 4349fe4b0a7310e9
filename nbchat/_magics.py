"""``%%chat``, ``%chat`` and ``%%chat_sql``: parse the magic line, hand off, return displays.

The magic line is split with ``shlex`` (so quotes work) into one pydantic model per
magic; the same model writes the help that ``%%chat?`` shows. Everything else is
handed off: turns to ``Session.send`` (the cell renderer consumes its events),
queries to the analysis functions. Heavy modules (openai, pandas, duckdb) are imported
on first use, so ``%load_ext nbchat`` stays fast.

Notebook semantics live here because only the magic sees cells:

- the kernel keeps one *current session* per notebook; ``--new``, ``--session ID``,
  ``%chat new`` and ``%chat use ID`` switch it;
- a ``pre_run_cell`` handler records the cell id JupyterLab / Notebook 7 send, and the
  turn is sent with it, so re-running a cell replaces that cell's earlier turn;
- options on a cell apply to that cell's turn only (model, tools, budget, ...).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import textwrap
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, magics_class
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._config import DEFAULT_KEYS, default_db_path, get_defaults, set_defaults
from ._display import CellRenderer, Info, TurnFailed, TurnInterrupted, one_line, render_mode
from ._exceptions import NbchatError

if TYPE_CHECKING:
    from ._pytool import Approval
    from ._session import Session
    from ._tools import Tool
    from ._types import Event

__all__ = [
    "ChatMagics",
    "ChatOptions",
    "SqlOptions",
    "interpolate",
    "load_ipython_extension",
    "parse_options",
    "unload_ipython_extension",
]

M = TypeVar("M", bound=BaseModel)
_IDENT = r"[A-Za-z_]\w*"


# ---------------------------------------------------------------------- options


def _flag(short: str | None = None, metavar: str | None = None) -> dict[str, Any]:
    return {"short": short, "metavar": metavar}


class ChatOptions(BaseModel):
    """The options of a ``%%chat`` cell; each applies to that cell's turn only."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        description="model for this cell (a session this cell starts keeps it)",
        json_schema_extra=_flag("-m", "NAME"),
    )
    system: str | None = Field(
        None,
        description="system prompt (a different one starts a new session)",
        json_schema_extra=_flag("-s", "TEXT"),
    )
    new: bool = Field(False, description="start a new session (it becomes the current one)")
    session: str | None = Field(
        None,
        description="continue the stored session ID (it becomes the current one)",
        json_schema_extra=_flag(metavar="ID"),
    )
    tools: list[str] | None = Field(
        None,
        description="tools for this cell: functions in the notebook, comma-separated; "
        "python[:ask|auto|never] runs code here; none for no tools",
        json_schema_extra=_flag(metavar="A,B"),
    )
    budget: float | None = Field(
        None,
        ge=0,
        description="spend at most USD on this turn",
        json_schema_extra=_flag(None, "USD"),
    )
    max_rounds: int | None = Field(
        None,
        ge=0,
        description="rounds of tool calls before a final answer (default 16)",
        json_schema_extra=_flag(metavar="N"),
    )
    no_stream: bool = Field(False, description="show the reply once it is complete")
    out: str | None = Field(
        None,
        description="also store the reply text in variable VAR",
        json_schema_extra=_flag(metavar="VAR"),
    )
    temperature: float | None = Field(
        None, ge=0, description="sampling temperature", json_schema_extra=_flag(metavar="T")
    )

    @field_validator("tools", mode="before")
    @classmethod
    def _split_tools(cls, value: Any) -> Any:
        if isinstance(value, str):
            names = [n.strip() for n in value.split(",") if n.strip()]
            return [] if names == ["none"] else names
        return value

    @field_validator("out")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(_IDENT, value):
            raise ValueError(f"{value!r} is not a valid variable name")
        return value


class SqlOptions(BaseModel):
    """The options of a ``%%chat_sql`` cell."""

    model_config = ConfigDict(extra="forbid")

    out: str | None = Field(
        None,
        description="also store the DataFrame in variable VAR",
        json_schema_extra=_flag(metavar="VAR"),
    )
    db: str | None = Field(
        None,
        description="store file to query (default: the kernel's store)",
        json_schema_extra=_flag(metavar="PATH"),
    )


def _flags(model: type[BaseModel]) -> dict[str, str]:
    flags = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flags["--" + name.replace("_", "-")] = name
        short = extra.get("short")
        if isinstance(short, str):
            flags[short] = name
    return flags


def _is_switch(model: type[BaseModel], name: str) -> bool:
    return model.model_fields[name].annotation is bool


def parse_options(model: type[M], line: str, magic: str = "%%chat") -> M:
    """Parse a magic line (shell-like quoting) into ``model``; ``UsageError`` on bad input."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{magic}: cannot read the options ({exc}): {line}") from None
    flags = _flags(model)
    raw: dict[str, Any] = {}
    given: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        flag, eq, value = word.partition("=") if word.startswith("--") else (word, "", "")
        name = flags.get(flag)
        if name is None:
            if word.startswith("-"):
                raise UsageError(f"{magic}: unknown option {flag} (see {magic}? for the options)")
            raise UsageError(
                f"{magic}: unexpected {word!r} on the magic line; "
                "the message goes in the cell, below the magic line"
            )
        if _is_switch(model, name):
            if eq:
                raise UsageError(f"{magic}: {flag} takes no value")
            raw[name] = True
        else:
            if not eq:
                if i >= len(words):
                    raise UsageError(f"{magic}: {flag} needs a value")
                value = words[i]
                i += 1
            raw[name] = value
        given[name] = flag
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        raise UsageError(f"{magic}: {given.get(name, name)}: {err['msg']}") from None


def _options_help(model: type[BaseModel]) -> str:
    lines = []
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        short = extra.get("short")
        flag = ("" if short is None else f"{short}, ") + "--" + name.replace("_", "-")
        if not _is_switch(model, name):
            flag += f" {extra.get('metavar') or name.upper()}"
        text = textwrap.wrap(field.description or "", 60)
        lines.append(f"  {flag:<24} {text[0]}")
        lines.extend(f"  {'':<24} {more}" for more in text[1:])
    return "\n".join(lines)


# ---------------------------------------------------------------------- {var} in the cell

_PLACEHOLDER = re.compile(
    r"\{\{(" + _IDENT + r"(?:\." + _IDENT + r")*)\}\}|\{(" + _IDENT + r"(?:\." + _IDENT + r")*)\}"
)
_MISSING = object()


def interpolate(text: str, namespace: dict[str, Any]) -> str:
    """Replace ``{name}`` and ``{name.attr}`` with values from ``namespace``.

    Anything else in braces is left alone (JSON in prompts is common), and so is a name
    the namespace does not have. ``{{name}}`` gives a literal ``{name}``.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return "{" + match.group(1) + "}"
        head, *attrs = match.group(2).split(".")
        value = namespace.get(head, _MISSING)
        for attr in attrs:
            if value is _MISSING:
                break
            value = getattr(value, attr, _MISSING)
        return match.group(0) if value is _MISSING else str(value)

    return _PLACEHOLDER.sub(replace, text)


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

    def next_turn_id(self) -> str | None:
        """The cell id for the next turn; a second turn in one run gets ``id#2``, ..."""
        for frame in reversed(self.stack):
            if frame[0]:
                frame[1] += 1
                return str(frame[0]) if frame[1] == 1 else f"{frame[0]}#{frame[1]}"
        return None


@contextlib.contextmanager
def _cell_overrides(session: Session, opts: ChatOptions, tools: list[Tool]) -> Iterator[None]:
    """Apply a cell's options to the session for one turn, then put everything back."""
    from ._tools import ToolSet

    model = session.model
    saved = (
        session.tools,
        session.max_rounds,
        session.streaming,
        dict(session.request_params),
        session.budgets,
    )
    try:
        if opts.model and opts.model != model:
            session.set_model(opts.model)
        session.tools = ToolSet(tools, max_result_chars=session.tools.max_result_chars)
        if opts.max_rounds is not None:
            session.max_rounds = opts.max_rounds
        if opts.no_stream:
            session.streaming = False
        if opts.temperature is not None:
            session.request_params["temperature"] = opts.temperature
        if opts.budget is not None:
            session.budgets = session.budgets.model_copy(update={"turn_budget_usd": opts.budget})
        yield
    finally:
        (
            session.tools,
            session.max_rounds,
            session.streaming,
            session.request_params,
            session.budgets,
        ) = saved
        if session.model != model:
            session.set_model(model)


@contextlib.contextmanager
def _interrupt_cancels(session: Session) -> Iterator[list[int]]:
    """While a turn runs, a kernel interrupt cancels it instead of raising KeyboardInterrupt.

    A KeyboardInterrupt can land between taking an event off the queue and showing it,
    and that event would be lost from the display; cancelling keeps every event. A
    second interrupt raises KeyboardInterrupt as usual, in case the turn is stuck.
    """
    if threading.current_thread() is not threading.main_thread():
        yield []  # signal handlers can only be set from the main thread
        return
    presses: list[int] = []

    def on_sigint(signum: int, frame: Any) -> None:
        presses.append(signum)
        if len(presses) > 1:
            raise KeyboardInterrupt
        session.cancel()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield presses
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------- the magics

_COST_COLUMNS = [
    "started_at",
    "user_text",
    "status",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "duration_ms",
]
_SUBCOMMANDS = """\
%chat subcommands:
  %chat config [key=value ...]    show or set this kernel's defaults for sessions
                                  (model, base_url, api_key, db, system, temperature,
                                  max_rounds, budget_usd; key=none removes one)
  %chat new                       the next %%chat cell starts a new session
  %chat use ID                    continue the stored session ID
  %chat session                   the current Session object
  %chat sessions                  every stored session (DataFrame)
  %chat history                   the current session's transcript (DataFrame)
  %chat cost                      tokens, cost and time of each turn of the current session
  %chat cost model|day|session    the whole store's spend, grouped (DataFrame)
  %chat tools [a,b | none]        show or set the tools of later %%chat cells
  %chat local [GGUF]              start (or reuse) the embedded local model and use it
"""


@magics_class
class ChatMagics(Magics):
    """The nbchat magics of one IPython shell, and the notebook's current session."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.session: Session | None = None
        self.cells = _Cells()
        self.default_tools: list[str] = []

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
        except NbchatError as exc:
            raise one_line(exc) from None

    @cell_magic
    def chat_sql(self, line: str, cell: str) -> Any:
        opts = parse_options(SqlOptions, line, "%%chat_sql")
        from ._analysis import sql

        try:
            frame = sql(cell, db=opts.db)
        except Exception as exc:
            if isinstance(exc, NbchatError) or type(exc).__module__.startswith("duckdb"):
                raise one_line(exc) from None
            raise
        if opts.out:
            self.user_ns[opts.out] = frame
        return frame

    # -------------------------------------------------------------- %%chat

    def _chat_cell(self, line: str, cell: str) -> None:
        opts = parse_options(ChatOptions, line)
        text = interpolate(cell, self.user_ns).strip()
        if not text:
            raise UsageError("%%chat: the cell is empty; write your message below the magic line")
        tools = self._tools(opts.tools if opts.tools is not None else self.default_tools)
        session = self._session_for(opts)
        mode = render_mode(self.shell, stream=not opts.no_stream)
        cell_id = self.cells.next_turn_id()
        with _cell_overrides(session, opts, tools), _interrupt_cancels(session) as presses:
            renderer = CellRenderer(session.model, mode)

            def on_event(event: Event) -> None:
                if presses:  # pressed before the turn's task existed: cancel it now
                    session.cancel()
                renderer(event)

            result = session.send(text, cell_id=cell_id, on_event=on_event)
        renderer.finish()
        if opts.out:
            self.user_ns[opts.out] = result.text
        if result.status == "interrupted":
            raise TurnInterrupted(result)
        if result.status in ("error", "budget_exceeded", "rejected"):
            raise TurnFailed(result)

    def _session_for(self, opts: ChatOptions) -> Session:
        if opts.new and opts.session:
            raise UsageError("%%chat: use either --new or --session, not both")
        current = self.session
        if opts.session:
            if current is None or current.id != opts.session:
                current = self._use(opts.session, model=opts.model)
        elif (
            opts.new
            or current is None
            # A conversation has one system prompt: a different one starts another.
            or (opts.system is not None and opts.system != current.system)
        ):
            current = self._open(system=opts.system, model=opts.model)
        self.session = current
        return current

    def _open(self, **kwargs: Any) -> Session:
        """A new (or reopened) session with this kernel's defaults."""
        from ._session import Session

        defaults = get_defaults()
        for key in ("system", "temperature", "max_rounds", "budget_usd"):
            if kwargs.get(key) is None and key in defaults:
                kwargs[key] = defaults[key]
        notebook = self.user_ns.get("__session__") or os.environ.get("JPY_SESSION_NAME")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return Session(notebook=notebook, **kwargs)

    def _use(self, session_id: str, model: str | None = None) -> Session:
        # An unknown id is a StoreError naming the store file: shown as one line.
        return self._open(session_id=session_id, model=model)

    def _tools(self, specs: list[str]) -> list[Tool]:
        from ._pytool import APPROVALS, python_tool
        from ._tools import as_tool

        tools = []
        for spec in specs:
            name, colon, mode = spec.partition(":")
            if name == "python":
                if colon and mode not in APPROVALS:
                    raise UsageError(
                        f"%%chat: python:{mode}: the python tool's approval is one of "
                        f"{', '.join(APPROVALS)}"
                    )
                tools.append(python_tool(self.user_ns, approval=cast("Approval", mode or "ask")))
                continue
            value = self._lookup(name)
            if colon or value is None or not callable(value):
                raise UsageError(
                    f"%%chat: --tools {spec}: no function called {name!r} in the notebook"
                )
            tools.append(as_tool(value))
        return tools

    def _lookup(self, dotted: str) -> Any:
        head, *attrs = dotted.split(".")
        value = self.user_ns.get(head)
        for attr in attrs:
            value = getattr(value, attr, None)
        return value

    # -------------------------------------------------------------- %chat ...

    def _subcommand(self, line: str) -> Any:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%chat: cannot read {line!r} ({exc})") from None
        if not words or words[0] in ("help", "-h", "--help"):
            return Info(f"```\n{ChatMagics.chat.__doc__}\n```")
        command, args = words[0], words[1:]
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            raise UsageError(f"%chat: unknown subcommand {command!r} (%chat help lists them)")
        return handler(args)

    def _cmd_config(self, args: list[str]) -> Info:
        if args:
            updates: dict[str, Any] = {}
            for arg in args:
                key, eq, value = arg.partition("=")
                if not eq:
                    raise UsageError(f"%chat config: write key=value, not {arg!r}")
                updates[key] = _config_value(key, value)
            before = get_defaults()
            set_defaults(**updates)
            self._settings_changed(before, get_defaults())
        return _config_info(self.session)

    def _cmd_new(self, args: list[str]) -> Info:
        self.session = None
        return Info("The next `%%chat` cell starts a new session.")

    def _cmd_use(self, args: list[str]) -> Info:
        if len(args) != 1:
            raise UsageError("%chat use: give one session id (%chat sessions lists them)")
        self.session = self._use(args[0])
        return Info(
            f"Continuing session `{self.session.id}` ({len(self.session.history)} messages)."
        )

    def _cmd_session(self, args: list[str]) -> Session | None:
        return self.session

    def _cmd_sessions(self, args: list[str]) -> Any:
        from ._analysis import sessions

        return sessions()

    def _cmd_history(self, args: list[str]) -> Any:
        from ._analysis import transcript

        return transcript(self._current().id)

    def _cmd_cost(self, args: list[str]) -> Any:
        from ._analysis import costs, turns

        if not args:
            frame = turns(session_id=self._current().id)
            return frame[_COST_COLUMNS]
        if args[0] not in ("model", "day", "session"):
            raise UsageError("%chat cost: give model, day or session (or nothing)")
        return costs(by=args[0])  # type: ignore[arg-type]

    def _cmd_tools(self, args: list[str]) -> Info:
        if args:
            specs = ChatOptions.model_validate({"tools": ",".join(args)}).tools or []
            self._tools(specs)  # fail now, not at the next cell
            self.default_tools = specs
        rows = [(t.name, t.description) for t in self._tools(self.default_tools)]
        if not rows:
            return Info("No tools: `%chat tools a,b` or `%%chat --tools a,b` adds some.")
        return Info("Tools of the next `%%chat` cells", rows)

    def _cmd_local(self, args: list[str]) -> Info:
        from ._local import local

        if len(args) > 1:
            raise UsageError("%chat local: give at most one GGUF model path")
        before = get_defaults()
        url = local(args[0] if args else None)
        self._settings_changed(before, get_defaults())
        model = get_defaults().get("model", "")
        return Info(f"Local model `{model}` at {url}; `%%chat` cells use it now.")

    def _current(self) -> Session:
        if self.session is None:
            raise UsageError("%chat: no current session yet; run a %%chat cell first")
        return self.session

    def _settings_changed(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        """Carry the current conversation over to a new model / endpoint / store."""
        session = self.session
        if session is None:
            return

        def changed(key: str) -> bool:
            return before.get(key) != after.get(key)

        if changed("db"):
            self.session = None  # it lives in the other store
        elif changed("base_url") or changed("api_key"):
            self.session = self._open(session_id=session.id, model=after.get("model"))
        elif changed("model") and after.get("model"):
            session.set_model(after["model"])


ChatMagics.chat.__doc__ = f"""Chat with a model from a notebook cell.

%%chat [options]
Your message; {{name}} is replaced by the value of `name` in the notebook
({{{{name}}}} keeps the braces; other text in braces, such as JSON, is left alone).

The reply streams into the cell as Markdown; the next %%chat cell continues the
same conversation, and re-running a cell replaces its earlier turn. A kernel
interrupt stops the reply and keeps what arrived.

Options (model, tools, budget, max-rounds, temperature, no-stream apply to this
cell's turn only; new, session and system choose the conversation):
{_options_help(ChatOptions)}

{_SUBCOMMANDS}"""
ChatMagics.chat_sql.__doc__ = f"""Run SQL on the nbchat store; shows the result as a DataFrame.

%%chat_sql [--out VAR] [--db PATH]
SELECT model, sum(cost_usd) FROM requests GROUP BY model

Tables: sessions, messages, requests, tool_calls, compactions.

Options:
{_options_help(SqlOptions)}
"""


def _config_value(key: str, value: str) -> Any:
    if key not in DEFAULT_KEYS:
        return value  # set_defaults names the known keys
    if value.lower() in ("", "none", "null"):
        return None
    try:
        if key in ("temperature", "budget_usd"):
            return float(value)
        if key == "max_rounds":
            return int(value)
    except ValueError:
        raise UsageError(f"%chat config: {key} must be a number, not {value!r}") from None
    return value


def _config_info(session: Session | None) -> Info:
    defaults = get_defaults()
    env = os.environ

    def source(key: str, *names: str) -> str:
        if key in defaults:
            return f"{defaults[key]} (kernel)"
        for name in names:
            if env.get(name):
                return f"{env[name]} ({name})"
        return "—"

    if "api_key" in defaults:
        key = "set (kernel)"
    else:
        found = next((n for n in ("NBCHAT_API_KEY", "OPENAI_API_KEY") if env.get(n)), None)
        key = f"set ({found})" if found else "not set"
    rows = [
        ("model", source("model", "NBCHAT_MODEL")),
        ("base_url", source("base_url", "NBCHAT_BASE_URL", "OPENAI_BASE_URL")),
        ("api_key", key),
        ("db", default_db_path()),
    ]
    rows += [
        (k, str(defaults[k]))
        for k in ("system", "temperature", "max_rounds", "budget_usd")
        if k in defaults
    ]
    if session is not None:
        rows.append(("current session", f"{session.id} ({session.model})"))
    return Info("nbchat settings for new sessions in this kernel", rows)


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
    _loaded[shell] = magics


def unload_ipython_extension(shell: Any) -> None:
    """Remove what ``load_ipython_extension`` registered."""
    magics = _loaded.pop(shell, None)
    if magics is None:
        return
    shell.events.unregister("pre_run_cell", magics.cells.pre_run_cell)
    shell.events.unregister("post_run_cell", magics.cells.post_run_cell)
    table = shell.magics_manager.magics
    table["line"].pop("chat", None)
    table["cell"].pop("chat", None)
    table["cell"].pop("chat_sql", None)
    shell.magics_manager.registry.pop(type(magics).__name__, None)


def magics_of(shell: Any) -> ChatMagics | None:
    """The ``ChatMagics`` registered on ``shell``, if the extension is loaded."""
    return _loaded.get(shell)
