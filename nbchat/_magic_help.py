"""The words of the magics' options: flag, value name and help, written once.

``_magic_options`` builds its pydantic models' fields from these entries, and the help
that ``%%chat?`` shows is rendered from them here, without importing pydantic (so
``%load_ext nbchat`` stays cheap). A test checks every entry matches a model field.
"""

from __future__ import annotations

import shlex
import textwrap
from typing import NamedTuple

__all__ = ["CHAT_OPTIONS", "SQL_OPTIONS", "OptionDoc", "flag_of", "render_options", "split_line"]


class OptionDoc(NamedTuple):
    """One option: its field name, short flag, value name (``None``: a switch), help."""

    name: str
    short: str | None
    metavar: str | None
    help: str


CHAT_OPTIONS: tuple[OptionDoc, ...] = (
    OptionDoc("model", "-m", "NAME", "model for this cell (a session this cell starts keeps it)"),
    OptionDoc(
        "endpoint",
        "-e",
        "NAME",
        "send this cell to the saved endpoint NAME (%chat endpoint add), with -m's model "
        "or the current one",
    ),
    OptionDoc("system", "-s", "TEXT", "system prompt (a different one starts a new session)"),
    OptionDoc("new", None, None, "start a new session (it becomes the current one)"),
    OptionDoc("session", None, "ID", "continue the stored session ID (it becomes the current one)"),
    OptionDoc(
        "tools",
        None,
        "A,B",
        "tools for this cell: functions in the notebook, comma-separated; "
        "python[:ask|auto|never] runs code here; none for no tools",
    ),
    OptionDoc("budget", None, "USD", "spend at most USD on this turn"),
    OptionDoc("max_rounds", None, "N", "rounds of tool calls before a final answer (default 16)"),
    OptionDoc("no_stream", None, None, "show the reply once it is complete"),
    OptionDoc("out", None, "VAR", "also store the reply text in variable VAR"),
    OptionDoc("temperature", None, "T", "sampling temperature"),
    OptionDoc("tag", None, "A,B", "tag this cell's session (costs(by='tag') groups by tags)"),
    OptionDoc(
        "context",
        None,
        "A,B",
        "attach these notebook values below the message, each under its name "
        "(DataFrames as shape, dtypes and first rows; also In[3], Out[3], Err)",
    ),
    OptionDoc(
        "attach",
        None,
        "A,B",
        "attach images to the message: figures or images in the notebook by name, or "
        "image files by path (text files are inlined; a {fig} placeholder attaches too)",
    ),
    OptionDoc(
        "max_context_chars",
        None,
        "N",
        "at most N characters for each value a {placeholder} or --context puts in "
        "the message (default 8000; %chat config max_context_chars=N)",
    ),
    OptionDoc(
        "fix",
        None,
        None,
        "ask for a fix of the last cell that failed (its source and error are sent; "
        "the cell's text adds instructions); the corrected code goes in a new cell below",
    ),
    OptionDoc(
        "format",
        None,
        "KIND",
        "markdown (default), text, code (the reply's code goes in a new cell below) "
        "or json (parsed: --out gets the value)",
    ),
    OptionDoc(
        "schema_",
        None,
        "TYPE",
        "a typed answer: TYPE (a pydantic model or type in the notebook) validates "
        "the reply, and --out gets the validated value",
    ),
)

SQL_OPTIONS: tuple[OptionDoc, ...] = (
    OptionDoc("out", None, "VAR", "also store the DataFrame in variable VAR"),
    OptionDoc("db", None, "PATH", "store file to query (default: the kernel's store)"),
    OptionDoc("allow_files", None, None, "let the query read files (read_csv, glob, ...)"),
)


def flag_of(name: str) -> str:
    """``--max-rounds`` for ``max_rounds``; ``--schema`` for ``schema_`` (a trailing ``_``
    keeps a field clear of a pydantic ``BaseModel`` attribute)."""
    return "--" + name.rstrip("_").replace("_", "-")


def render_options(options: tuple[OptionDoc, ...]) -> str:
    """The options as the help's table: flags and value name, then the wrapped help."""
    lines = []
    for option in options:
        flag = ("" if option.short is None else f"{option.short}, ") + flag_of(option.name)
        if option.metavar is not None:
            flag += f" {option.metavar}"
        text = textwrap.wrap(option.help, 60)
        lines.append(f"  {flag:<24} {text[0]}")
        lines.extend(f"  {'':<24} {more}" for more in text[1:])
    return "\n".join(lines)


def split_line(line: str) -> list[str]:
    """A magic line's words, split as a shell does; ``ValueError`` on an unclosed quote.

    Quotes group words, and a ``#`` that starts a word outside quotes begins a comment
    to the end of the line (``%chat config endpoint=work  # the default``). A ``#``
    inside a word (``C#``) or inside quotes stays: ``shlex``'s own ``comments=True``
    would cut the word at it.
    """
    quote = ""
    escaped = False
    word_start = True
    for i, char in enumerate(line):
        literal = escaped or bool(quote)
        if escaped:
            escaped = False
        elif quote == "'":  # nothing is special inside single quotes but the closing one
            quote = "" if char == "'" else quote
        elif char == "\\":
            escaped = True
        elif quote:
            quote = "" if char == '"' else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and word_start:
            line = line[:i]
            break
        word_start = not literal and char.isspace()
    return shlex.split(line)
