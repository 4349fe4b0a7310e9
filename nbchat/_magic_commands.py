"""The ``%chat`` subcommands (config, new, use, resume, cost, models, ...).

``Subcommands`` is mixed into ``ChatMagics``: each ``_cmd_NAME(args)`` answers
``%chat NAME args`` and returns what the cell shows, working on the magics' state
(the current session, aliases, default tools) declared below.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shlex
import textwrap
from typing import TYPE_CHECKING, Any, Literal

from IPython.core.error import UsageError

from ._config import (
    CONFIG_KEYS,
    DEFAULT_KEYS,
    LOCAL_PREFIX,
    check_limits,
    default_db_path,
    get_defaults,
    is_embedded,
    needs_key,
    new_sessions_base_url,
    resolve_client,
    restore_defaults,
    set_defaults,
)
from ._display import raise_for
from ._exceptions import ConfigError, MissingKey, NbchatError, UnknownSession
from ._magic_displays import Found, Info
from ._magic_help import split_line
from ._text import counted

if TYPE_CHECKING:
    from ._cell_turns import CellTurns
    from ._session import Session
    from ._tools import Tool

__all__ = ["SUBCOMMANDS_HELP", "Subcommands"]

# The subcommands that take no words: any given were a mistake, not ignored.
_NO_ARGUMENTS = frozenset({"new", "abort", "session", "sessions", "history"})

# The magics' own setting, beside the sessions' defaults.
_CONFIG_NAMES = (*CONFIG_KEYS, "max_context_chars")
_CONFIG_HELP = textwrap.fill(
    f"({', '.join(_CONFIG_NAMES)}; key=none removes one; prefer NBCHAT_API_KEY: a key "
    "typed here is saved with the notebook's source)",
    width=86,
    initial_indent=" " * 34,
    subsequent_indent=" " * 34,
)
SUBCOMMANDS_HELP = f"""\
%chat subcommands:
  %chat config [key=value ...]    show or set this kernel's defaults for sessions
{_CONFIG_HELP}
  %chat new                       the next %%chat cell starts a new session
  %chat use ID                    continue the stored session ID
  %chat session                   the current Session object
  %chat resume [a,b]              run the tool calls a stopped process left pending,
                                  then continue (tools: these, or those of %chat tools)
  %chat abort                     close pending tool calls as aborted instead
  %chat sessions                  every stored session (DataFrame)
  %chat history                   the current session's conversation, as cells show it
                                  (nbchat.transcript(id) gives the DataFrame)
  %chat cost                      tokens, cost and time of each turn of the current session
  %chat cost model|day|session|notebook|user|tag
                                  the whole store's spend, grouped (DataFrame)
  %chat cost [day|model|session|notebook] --plot [--tokens] [--since D] [--until D]
                                  the same as a chart
  %chat endpoint add NAME base_url=URL [api_key_env=VAR] [headers=JSON] [api_version=V]
                  [api=chat|responses] | remove NAME | list
                                  named endpoints (-m NAME:model, config endpoint=NAME);
                                  keys only by environment variable name
  %chat search WORDS              stored messages with these words, best matches first
  %chat export [PATH] [--format markdown|openai|nbchat] [--id ID] [--all] [--force]
                                  the current (or ID's) conversation: shown as Markdown,
                                  or written to PATH (.md: markdown, .json: nbchat);
                                  --all includes what compaction folded (markdown)
  %chat import PATH [--title T]   store an exported conversation (openai or nbchat JSON)
                                  as a new session, and continue it
  %chat tools [a,b | none]        show or set the tools of later %%chat cells
  %chat local [GGUF]              start (or reuse) the embedded local model and use it
  %chat fix [options]             send the last failing cell and its error; the
                                  corrected code comes back as a new cell below (not run)
  %chat models                    the endpoint's models, context windows and prices
  %chat alias [name=model ...]    show or set model aliases (-m name, config model=name;
                                  name=none removes one)

%%chat_sql [--out VAR] [--db PATH] [--allow-files]
  a read-only SQL query on the store, shown as a DataFrame; %%chat_sql? shows its
  help and the tables
"""


class Subcommands:
    """The ``%chat NAME`` subcommands, as methods of the magics that hold the state."""

    session: Session | None
    aliases: dict[str, str]
    default_tools: list[str]
    max_context_chars: int | None
    cell_sessions: dict[str, Session]
    cell_turns: CellTurns

    if TYPE_CHECKING:  # what ChatMagics provides

        def _help(self) -> str: ...
        def _tools(self, specs: list[str], said: str = ...) -> list[Tool]: ...
        def _use(self, session_id: str, model: str | None = None) -> Session: ...
        def _open(self, **kwargs: Any) -> Session: ...
        def _ready_to_send(self, session: Session) -> Session: ...
        def _replace_session(self, old: Session, new: Session) -> None: ...
        def _chat_cell(self, line: str, cell: str) -> None: ...

    def _subcommand(self, line: str) -> Any:
        try:
            words = split_line(line)
        except ValueError as exc:
            first, _, rest = line.strip().partition(" ")
            if first == "search":  # its words are text to find: "don't" is one of them
                return self._cmd_search(rest.split())
            raise UsageError(f"%chat: cannot read {line!r} ({exc})") from None
        if not words or words[0] in ("help", "-h", "--help"):
            return Info(f"```\n{self._help()}\n```")
        command, args = words[0], words[1:]
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            known = [name[len("_cmd_") :] for name in dir(self) if name.startswith("_cmd_")]
            close = difflib.get_close_matches(command, known, n=1)
            hint = f"did you mean %chat {close[0]}? " if close else ""
            raise UsageError(f"%chat: unknown subcommand {command!r} ({hint}%chat help lists them)")
        if command in _NO_ARGUMENTS and args:
            raise UsageError(f"%chat {command} takes nothing, not {' '.join(args)!r}")
        return handler(args)

    def _cmd_config(self, args: list[str]) -> Info:
        if args:
            updates: dict[str, Any] = {}
            for arg in args:
                key, eq, value = arg.partition("=")
                if not eq:
                    raise UsageError(f"%chat config: write key=value, not {arg!r}")
                if key == "max_context_chars":  # a setting of the magics, not of sessions
                    self.max_context_chars = _context_chars(value)
                    continue
                if key == "model":
                    value = self.aliases.get(value, value)
                updates[key] = _config_value(key, value)
            if not updates:
                return self._config_info()
            before = get_defaults()
            unknown = sorted(set(updates) - DEFAULT_KEYS)
            if unknown:  # the magics' own setting is one of the known ones here
                known = ", ".join(sorted({*DEFAULT_KEYS, "max_context_chars"}))
                close = difflib.get_close_matches(unknown[0], _CONFIG_NAMES, 1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UsageError(
                    f"%chat config: unknown setting {', '.join(unknown)}{hint}; known: {known}"
                )
            try:
                check_limits("%chat config", **updates)
            except ConfigError as exc:
                raise UsageError(str(exc)) from None
            set_defaults(**updates)  # unknown keys are refused before anything is saved
            try:
                applied, lacking = self._settings_changed(before, get_defaults())
            except MissingKey as exc:
                restore_defaults(before)  # all or nothing: a refused change leaves no trace
                raise MissingKey(
                    f"{str(exc).rstrip('.')}. Nothing was changed: the current conversation "
                    "would fail at its next turn. Set the key in the same line, or run "
                    "%chat new first (new sessions can take the model, and the key next)."
                ) from None
            except BaseException:
                restore_defaults(before)  # all or nothing: a refused change leaves no trace
                raise
            info = self._config_info()
            if "base_url" in before and "base_url" not in {**updates, **get_defaults()}:
                info.rows.append(
                    (
                        "left the local model",
                        f"{updates['model']} is not a local/ model, so it goes to the "
                        "endpoint configured without %chat local; `%chat local` goes back",
                    )
                )
            info.rows.append(("this change applies to", applied))
            if updates.get("api_key"):  # the help says so too; a trial set one unwarned
                info.rows.append(
                    (
                        "careful",
                        "the key typed in this cell is saved with the notebook's source "
                        "(and its history); NBCHAT_API_KEY in the environment keeps it out",
                    )
                )
            if lacking:
                info.rows.append(("still needed", lacking))
            return info
        return self._config_info()

    def _config_info(self) -> Info:
        """The kernel's settings, with the magics' own (aliases, max_context_chars)."""
        info = _config_info(self.session)
        if self.max_context_chars is not None:
            info.rows.append(("max_context_chars", f"{self.max_context_chars} (kernel)"))
        info.rows += [(f"alias {name}", model) for name, model in sorted(self.aliases.items())]
        return info

    def _cmd_new(self, args: list[str]) -> Info:
        self.session = None
        return Info("The next `%%chat` cell starts a new session.")

    def _cmd_use(self, args: list[str]) -> Info:
        if len(args) != 1:
            raise UsageError("%chat use: give one session id (%chat sessions lists them)")
        try:
            self.session = self._use(args[0])
        except UnknownSession as exc:
            raise UsageError(f"%chat use: {exc} (%chat sessions lists them)") from None
        message = f"Continuing session `{self.session.id}` ({len(self.session.history)} messages)."
        if read_only(self.session):
            message += (
                " No API key is configured: `%chat history` shows it; sending a turn needs "
                "one (`%chat config api_key=...` or NBCHAT_API_KEY)."
            )
        pending = self.session.pending_tool_calls
        if pending:
            names = ", ".join(c.name for c in pending)
            message += (
                f" It has {counted(len(pending), 'pending tool call')} ({names}) left by a process "
                "that stopped: `%chat resume` runs them, `%chat abort` closes them."
            )
        return Info(message)

    def _cmd_resume(self, args: list[str]) -> Info | None:
        from ._magic_options import ChatOptions

        session = self._current()
        if not session.pending_tool_calls:
            return Info("Nothing to resume: the current session has no pending tool calls.")
        session = self._ready_to_send(session)  # the tools' results go to the model
        specs = ChatOptions.model_validate({"tools": ",".join(args)}).tools if args else None
        tools = self._tools(specs if specs is not None else self.default_tools, "%chat resume")
        raise_for(
            self.cell_turns.show(
                session,
                ChatOptions(),
                tools,
                lambda on_event, options: session.resume(on_event=on_event, options=options),
            )
        )
        return None

    def _cmd_abort(self, args: list[str]) -> Info:
        closed = self._current().abort_pending()
        return Info(f"Closed {counted(len(closed), 'pending tool call')} as aborted.")

    def _cmd_session(self, args: list[str]) -> Session | None:
        return self.session

    def _cmd_sessions(self, args: list[str]) -> Any:
        from ._tables import sessions_table

        return sessions_table()

    def _cmd_history(self, args: list[str]) -> Any:
        from ._magic_displays import Conversation

        # Shown like the cells it came from (escaped, prices kept as prices); the
        # DataFrame is nbchat.transcript(id).
        session = self._current()
        return Conversation(session.history, session.turn_outcomes())

    def _cmd_cost(self, args: list[str]) -> Any:
        from ._tables import costs_table, turn_costs_table

        if "--plot" in args:
            from ._plot import plot_for_magic

            return plot_for_magic(args)
        if not args:
            return turn_costs_table(self._current().id)
        if args[0] not in ("model", "day", "session", "notebook", "user", "tag"):
            raise UsageError(
                "%chat cost: give model, day, session, notebook, user or tag (or nothing)"
            )
        return costs_table(args[0])  # type: ignore[arg-type]

    def _cmd_search(self, args: list[str]) -> Any:
        from ._analysis import highlights, search

        if not args:
            raise UsageError("%chat search: give the words to look for")
        words = " ".join(args)
        found = search(words)
        return Found(found, highlights(found["content"], words))

    def _cmd_export(self, args: list[str]) -> Any:
        from ._export import export_session

        wanted = _export_options(args)
        session_id = wanted.session_id or self._current().id
        known = next((s for s in (self.session, *self.cell_sessions.values())
                      if s is not None and s.id == session_id), None)  # fmt: skip
        db = known.store if known is not None and known.store is not None else None
        try:
            text = export_session(
                session_id, wanted.format, db=db, include_compacted=wanted.everything
            )
        except UnknownSession as exc:
            said = str(exc).rstrip(".")
            raise UsageError(f"%chat export: {said} (%chat sessions lists them)") from None
        if wanted.path is None:
            from IPython.display import Markdown

            # Escaped for Jupyter's Markdown (model text shown as text, inert).
            return Markdown(text)  # type: ignore[no-untyped-call]
        try:
            with open(wanted.path, "w" if wanted.force else "x", encoding="utf-8") as out:
                out.write(text)
        except FileExistsError:
            raise UsageError(
                f"%chat export: {wanted.path} exists already (--force replaces it)"
            ) from None
        except OSError as exc:
            raise UsageError(f"%chat export: cannot write {wanted.path} ({exc})") from None
        return Info(f"Wrote session `{session_id}` to `{wanted.path}` as {wanted.format}.")

    def _cmd_import(self, args: list[str]) -> Info:
        from ._export import import_session, recorded_model

        path, title = _import_options(args)
        try:
            with open(path, encoding="utf-8") as source:
                text = source.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"%chat import: cannot read {path} ({exc})") from None
        if path.lower().endswith((".md", ".markdown")) or text.lstrip().startswith("# "):
            raise UsageError(
                f"%chat import: {path} is a Markdown export, for reading; import takes a "
                "JSON export (%chat export NAME.json, or --format openai)"
            )
        try:
            session_id = import_session(text, title=title)
            recorded = recorded_model(text)
        except (ValueError, NbchatError) as exc:  # not JSON, or not a conversation
            raise UsageError(f"%chat import: {path}: {exc}") from None
        # It continues on this kernel's endpoint, so with this kernel's model: the file's
        # may not exist here (a local/ name sent to OpenAI, priced as free).
        model = get_defaults().get("model") or os.environ.get("NBCHAT_MODEL")
        try:
            if model is None and recorded and recorded.startswith(LOCAL_PREFIX):
                raise ConfigError(
                    f"it was recorded with the embedded model {recorded}: run %chat local "
                    "(or %chat config model=NAME) first"
                )
            self.session = self._use(session_id, model=model)
        except NbchatError as exc:  # stored, but this kernel cannot open it yet (no model)
            raise UsageError(
                f"%chat import: stored {path} as session {session_id}, but it cannot be "
                f"continued yet: {str(exc).rstrip('.')}. Then %chat use {session_id} "
                "continues it (importing again would store a second copy)."
            ) from None
        count = len(self.session.history)
        said = f"Imported {count} messages from `{path}` as session `{session_id}`"
        if recorded and recorded != self.session.model:
            said += f" (recorded with `{recorded}`)"
        return Info(
            f"{said}, now the current one: the next `%%chat` cell continues it with "
            f"`{self.session.model}`."
        )

    def _cmd_endpoint(self, args: list[str]) -> Info:
        from ._endpoints import endpoint_command

        return endpoint_command(args)

    def _cmd_tools(self, args: list[str]) -> Info:
        from ._magic_options import ChatOptions

        if args:
            names = [n.strip() for arg in args for n in arg.split(",") if n.strip()]
            if "none" in names and len(names) > 1:
                raise UsageError("%chat tools: 'none' clears the tools and stands alone")
            specs = ChatOptions.model_validate({"tools": ",".join(args)}).tools or []
            self._tools(specs, "%chat tools")  # fail now, not at the next cell
            self.default_tools = specs
        rows = [
            (_tool_label(spec), t.description)
            for spec, t in zip(self.default_tools, self._tools(self.default_tools), strict=True)
        ]
        if not rows:
            return Info("No tools: `%chat tools a,b` or `%%chat --tools a,b` adds some.")
        return Info("Tools of the next `%%chat` cells", rows)

    def _cmd_local(self, args: list[str]) -> Info:
        from ._local import local

        if len(args) > 1:
            raise UsageError("%chat local: give at most one GGUF model path")
        if args and args[0].startswith("-"):
            raise UsageError(
                "%chat local [PATH]: serve the embedded model (or the GGUF file at PATH) "
                f"on this machine and make it the kernel's model; {args[0]!r} is not a path"
            )
        before = get_defaults()
        url = local(args[0] if args else None)
        self._settings_changed(before, get_defaults())
        model = get_defaults().get("model", "")
        return Info(f"Local model `{model}` at {url}; `%%chat` cells use it now.")

    def _cmd_fix(self, args: list[str]) -> None:
        """``%chat fix [options]``: ``%%chat --fix`` without further instructions."""
        from ._magic_options import ChatOptions, parse_options

        line = shlex.join(["--fix", *args])
        try:
            parse_options(ChatOptions, line, "%chat fix")
        except UsageError as exc:
            if "unexpected" not in str(exc):
                raise
            raise UsageError(
                f"%chat fix takes options only, not {' '.join(args)!r}; to add instructions, "
                "write them below %%chat --fix in a cell"
            ) from None
        self._chat_cell(line, "")

    def _cmd_models(self, args: list[str]) -> Any:
        """The endpoint's models, with context windows and prices where known."""
        import pandas as pd

        from ._client import ModelClient
        from ._pricing import context_window, request_cost
        from ._runner import run_sync
        from ._types import RequestUsage

        if args:
            raise UsageError("%chat models: takes no arguments")
        session = self.session
        # Listing needs no model: a placeholder when none is configured.
        keyed = session if session is not None and not read_only(session) else None
        client = keyed.client if keyed is not None else ModelClient(_listing_settings())
        base_url = client.settings.base_url
        per_input = RequestUsage(prompt_tokens=1_000_000, completion_tokens=0)
        per_output = RequestUsage(prompt_tokens=0, completion_tokens=1_000_000)
        models = run_sync(client.list_models())
        # The price table's window first (as compaction reads it), else the server's own.
        served = run_sync(client.listed_windows(models))
        rows = []
        for model in models:
            cost_in, _ = request_cost(model, base_url, per_input)
            cost_out, _ = request_cost(model, base_url, per_output)
            aliases = ", ".join(a for a, m in self.aliases.items() if m == model)
            rows.append(
                {
                    "model": model,
                    "context_window": context_window(model, base_url) or served.get(model),
                    "input_usd_per_mtok": cost_in,
                    "output_usd_per_mtok": cost_out,
                    "aliases": aliases,
                }
            )
        frame = pd.DataFrame(
            rows,
            columns=[
                "model",
                "context_window",
                "input_usd_per_mtok",
                "output_usd_per_mtok",
                "aliases",
            ],
        )
        frame["context_window"] = frame["context_window"].astype("Int64")
        frame[["input_usd_per_mtok", "output_usd_per_mtok"]] = frame[
            ["input_usd_per_mtok", "output_usd_per_mtok"]
        ].astype(float)
        frame.attrs["base_url"] = base_url
        return frame

    def _cmd_alias(self, args: list[str]) -> Info:
        """``%chat alias fast=gpt-4o-mini`` (``fast=none`` removes it); none: list them.

        All of the line is checked before any of it is kept: an alias naming itself, or
        through another (``a=b b=a``), is refused, and so is removing one there is not.
        """
        aliases = dict(self.aliases)
        removed = []
        for arg in args:
            name, eq, model = arg.partition("=")
            if not eq or not name or not model or any(c.isspace() for c in name):
                raise UsageError(
                    f"%chat alias: write name=model (or name=none to remove it), not {arg!r}"
                )
            if model.lower() == "none":
                if aliases.pop(name, None) is None:
                    raise UsageError(f"%chat alias: there is no alias {name!r} to remove")
                removed.append(name)
                continue
            target = aliases.get(model, model)
            if target == name:
                raise UsageError(f"%chat alias: {name}={model} would make {name!r} name itself")
            aliases[name] = target
        self.aliases = aliases
        if not self.aliases:
            gone = f"Removed {', '.join(removed)}. " if removed else ""
            return Info(f"{gone}No model aliases: `%chat alias fast=gpt-4o-mini` adds one.")
        rows = [(name, model) for name, model in sorted(self.aliases.items())]
        title = "Model aliases (`-m NAME` in `%%chat`, `%chat config model=NAME`)"
        if removed:
            title = f"Removed {', '.join(removed)}. {title}"
        return Info(title, rows, columns=("alias", "model"))

    def _current(self) -> Session:
        if self.session is None:
            raise UsageError("%chat: no current session yet; run a %%chat cell first")
        return self.session

    def _settings_changed(
        self, before: dict[str, Any], after: dict[str, Any]
    ) -> tuple[str, str | None]:
        """Check a config change as a whole, carry the current conversation over to it.

        Raises (``ConfigError``) before changing anything when the new endpoint cannot
        be used. Returns which sessions the change affects, and what the endpoint still
        lacks: with no conversation going on, a missing key may be set next (a newcomer
        sets the model first), so it is said, not refused.
        """
        session = self.session

        def changed(key: str) -> bool:
            return before.get(key) != after.get(key)

        endpoint = changed("model") or changed("base_url") or changed("api_key")
        lacking: str | None = None
        if endpoint and (
            session is not None or after.get("model") or os.environ.get("NBCHAT_MODEL")
        ):
            try:
                resolve_client(after.get("model") or (session.model if session else None))
            except MissingKey as exc:
                if session is not None:  # its next turn would fail: keep it as it was
                    raise
                lacking = f"{exc} The next `%%chat` cell needs it."
        if session is None:
            return "new sessions", lacking
        if changed("db"):
            # Its conversations live in the other store: cells start over in the new one.
            self.session = None
            self.cell_sessions.clear()
        elif changed("base_url") or changed("api_key"):
            # The user moved it on purpose: to the new endpoint, named, without a warning.
            where = resolve_client(after.get("model") or session.model).base_url
            reopened = self._open(session_id=session.id, model=after.get("model"), base_url=where)
            self._replace_session(session, reopened)
        elif changed("model") and after.get("model"):
            session.set_model(after["model"])
        if changed("api") and self.session is not None:  # the next request speaks it
            client = self.session.client
            client.settings = dataclasses.replace(client.settings, api=after.get("api"))
        # Limits and sampling follow the change in the conversation going on, too.
        if changed("budget_usd"):
            session.budgets = session.budgets.model_copy(
                update={"budget_usd": after.get("budget_usd")}
            )
        if changed("max_rounds"):
            from ._session import DEFAULT_MAX_ROUNDS

            session.max_rounds = after.get("max_rounds") or DEFAULT_MAX_ROUNDS
        if changed("temperature"):
            if after.get("temperature") is None:
                session.request_params.pop("temperature", None)
            else:
                session.request_params["temperature"] = after["temperature"]
        if changed("db"):
            return "new sessions (the current conversation stays in the old store)", None
        applied = f"the current session {session.id} and new sessions"
        if changed("system"):
            applied += " (the system prompt: new sessions only)"
        return applied, None


def read_only(session: Session) -> bool:
    """Whether ``session`` was opened without the key its endpoint needs (``%chat use``
    reads a stored session without one)."""
    settings = session.client.settings
    return settings.keyless and needs_key(settings.base_url)


@dataclasses.dataclass
class _ExportOptions:
    path: str | None = None
    format: Literal["markdown", "openai", "nbchat"] = "markdown"
    session_id: str | None = None
    everything: bool = False
    force: bool = False


_EXPORT_FORMATS = ("markdown", "openai", "nbchat")
_BY_SUFFIX = {".md": "markdown", ".markdown": "markdown", ".json": "nbchat"}


def _export_options(args: list[str]) -> _ExportOptions:
    """``%chat export``'s words: a path, --format, --id, --all, --force."""
    wanted, given = _ExportOptions(), None
    words = iter(args)
    for word in words:
        if word in ("--format", "--id"):
            value = next(words, None)
            if value is None or value.startswith("-"):
                raise UsageError(f"%chat export: {word} takes a value")
            if word == "--id":
                wanted.session_id = value
            elif value not in _EXPORT_FORMATS:
                raise UsageError(
                    f"%chat export: --format is markdown, openai or nbchat, not {value!r}"
                )
            else:
                given = value
        elif word in ("--all", "--force"):
            setattr(wanted, "everything" if word == "--all" else "force", True)
        elif word.startswith("-"):
            raise UsageError(f"%chat export: unknown option {word!r} (%chat help shows them)")
        elif wanted.path is None:
            wanted.path = os.path.expanduser(word)
        else:
            raise UsageError(f"%chat export: one path, not {word!r} as well")
    suffix = os.path.splitext(wanted.path or "")[1].lower()
    chosen = given or _BY_SUFFIX.get(suffix)
    if chosen is None:
        if wanted.path is not None:
            raise UsageError(
                f"%chat export: which format for {wanted.path}? Name it .md or .json, or "
                "give --format markdown, openai or nbchat"
            )
        chosen = "markdown"
    if wanted.path is None and chosen != "markdown":
        raise UsageError(f"%chat export: the {chosen} format goes to a file: give a path")
    if wanted.everything and chosen != "markdown":
        raise UsageError("%chat export: --all is for markdown (a JSON export is the context)")
    wanted.format = chosen  # type: ignore[assignment]  # one of _EXPORT_FORMATS
    return wanted


def _import_options(args: list[str]) -> tuple[str, str | None]:
    """``%chat import``'s words: a path and an optional --title."""
    path: str | None = None
    title: str | None = None
    words = iter(args)
    for word in words:
        if word == "--title":
            title = next(words, None)
            if not title:
                raise UsageError("%chat import: --title takes a value")
        elif word.startswith("-"):
            raise UsageError(f"%chat import: unknown option {word!r} (%chat help shows them)")
        elif path is None:
            path = os.path.expanduser(word)
        else:
            raise UsageError(f"%chat import: one path, not {word!r} as well")
    if path is None:
        raise UsageError("%chat import: give the path of an exported conversation (.json)")
    return path, title


def _tool_label(spec: str) -> str:
    """``python (ask: asks before running code)`` for the python tool, else the name."""
    name, _, mode = spec.partition(":")
    if name != "python":
        return name
    meaning = {
        "ask": "asks before running code",
        "auto": "runs code without asking",
        "never": "never runs code",
    }
    mode = mode or "ask"
    return f"python ({mode}: {meaning[mode]})"


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


def _context_chars(value: str) -> int | None:
    """``%chat config max_context_chars=N`` (``none``: back to the default)."""
    if value.lower() in ("", "none", "null"):
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UsageError(f"%chat config: max_context_chars must be a positive int, not {value!r}")
    return number


def _listing_settings() -> Any:
    """The endpoint of new sessions, for listing its models (no model needed for that)."""
    try:
        return resolve_client()
    except NbchatError:
        if get_defaults().get("model") or os.environ.get("NBCHAT_MODEL"):
            raise  # a real problem (no key, ...): say it
        return resolve_client("(listing models)")


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
    base_url, set_by = new_sessions_base_url()
    if key != "not set" and is_embedded(base_url):  # a trial saw it kept and wondered
        key += "; not sent to the local model, kept for when you leave it"
    rows = [
        ("model", source("model", "NBCHAT_MODEL")),
        ("base_url", f"{base_url} ({set_by})"),
        ("api_key", key),
        ("db", default_db_path()),
    ]
    listed = ("model", "base_url", "api_key", "db", "system", "temperature", "max_rounds")
    rows += [(k, str(defaults[k])) for k in listed[4:] if k in defaults]
    # Every other setting the kernel has (budget_usd, api, endpoint...), from the one list.
    rows += [(k, str(defaults[k])) for k in sorted(DEFAULT_KEYS - set(listed)) if k in defaults]
    if session is not None:
        rows.append(("current session", f"{session.id} ({session.model})"))
    return Info("nbchat settings in this kernel", rows)
