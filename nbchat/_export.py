"""A stored session out as OpenAI-format JSON or Markdown, and OpenAI-format JSON back in."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, cast, get_args

from ._config import current_notebook
from ._events import TurnFinished, TurnStarted
from ._exceptions import AttachmentError, StoreError
from ._history import live_order
from ._markup import safe_markdown
from ._store import Db, Store, open_store, pending_tool_calls
from ._store._records import StoredSession
from ._store._rows import session_title
from ._types import (
    SUMMARY_HEADER,
    ImageDetail,
    ImagePart,
    Message,
    ToolCall,
    TurnResult,
    TurnStatus,
    new_id,
    utcnow,
)

__all__ = ["ExportFormat", "export_session", "import_session", "recorded_model"]

_ROLES = ("system", "user", "assistant", "tool")


def _messages(session: StoredSession, *, folded: bool = False) -> list[Message]:
    # The summary after the system prompt, where the live context has it (a store
    # written before summaries were numbered in place has it after newer messages);
    # with the folded messages, the order they were stored in.
    messages = list(session.messages) if folded else live_order(session.messages)
    # The session loop stores its system prompt as the first message; an older or
    # hand-made session may only have it on the session row.
    if session.system_prompt and not (messages and messages[0].role == "system"):
        messages.insert(0, Message(role="system", content=session.system_prompt))
    return messages


ExportFormat = Literal["openai", "nbchat", "markdown"]
_FORMATS: tuple[str, ...] = get_args(ExportFormat)


def export_session(
    session_id: str,
    format: ExportFormat = "openai",
    db: Db = None,
    *,
    include_compacted: bool = False,
) -> str:
    """The session's live context as text.

    ``"openai"``: a JSON list of chat-completions messages (what the next request
    would send; images as ``data:`` URLs), which ``import_session`` reads back. A list
    of messages has no room for the session's title (or turns): a key beside them would
    make it something else, and servers refuse unknown keys on a message; its import is
    titled ``title=``, else after its first user message. ``"nbchat"`` keeps the title.
    ``"nbchat"``: ``{"title", "session_id", "model", "messages", "image_names", "turns"}``
    — the same messages with what the wire has no room for (the title, the session's id
    and model; image names by SHA-256; where each turn starts, by message index, with its
    status and error), so an import keeps them.
    ``"markdown"``: a readable transcript with tool calls and results in code blocks,
    and images as their labels (``[image: plot.png, 640×480 png]``); a reply or tool
    result that did not finish says so in its heading (cut off, interrupted, not run),
    and a turn that did not complete says after it how it ended, with its error (one the
    server refused, which left the conversation, is shown where it was); with
    ``include_compacted`` the whole conversation, the messages folded into a summary
    included (marked folded) before the summary that replaced them.
    """
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, _FORMATS))}, not {format!r}.")
    if include_compacted and format != "markdown":
        raise ValueError(
            f"include_compacted=True is for format='markdown': the {format!r} format is the "
            "context a session continues from, and folded messages are not part of it."
        )
    with open_store(db) as store:
        session = store.load_session(session_id, include_compacted=include_compacted)
        ended = _turn_outcomes(store, session_id) if format != "openai" else {}
        failed = _left_out(store, session_id, session) if format == "markdown" else []
    if format == "markdown":
        return _markdown(session, ended, failed, folded=include_compacted)
    messages = _messages(session)
    # Reasoning in the field DeepSeek and vLLM use, which import_session reads back.
    wire = [m.to_openai(reasoning_field="reasoning_content") for m in messages]
    if format == "openai":
        return json.dumps(wire, indent=2, ensure_ascii=False)
    names = {i.sha256: i.name for m in messages for i in m.attachments or [] if i.name}
    kept = {
        "title": session.title,
        "session_id": session.id,
        "model": session.model,
        "messages": wire,
        "image_names": names,
        "turns": _turn_starts(messages, ended),
    }
    return json.dumps(kept, indent=2, ensure_ascii=False)


def _turn_outcomes(store: Store, session_id: str) -> dict[str, tuple[str, str | None]]:
    """Each stored turn of the session: its status and error."""
    outcomes = store.frame("turns", session_id=session_id)
    return {
        str(turn_id): (str(status), error if isinstance(error, str) else None)
        for turn_id, status, error in zip(
            outcomes["id"], outcomes["status"], outcomes["error"], strict=True
        )
    }


@dataclass
class _FailedTurn:
    """A turn that failed and left the conversation (the server refused it as sent):
    no message of it is in the context, but a readable record should show it."""

    started_at: datetime
    user_text: str
    error: str | None


def _left_out(store: Store, session_id: str, session: StoredSession) -> list[_FailedTurn]:
    """The session's failed turns none of whose messages are in ``session``, oldest first.

    Only turns that ended ``"error"``: an input a guardrail rejected stays out of an
    export, as it stays out of the conversation.
    """
    turns = store.frame("turns", session_id=session_id)
    present = {m.turn_id for m in session.messages}
    columns = ("id", "status", "user_text", "started_at", "error")
    failed = []
    for turn_id, status, text, started, error in zip(*(turns[c] for c in columns), strict=True):
        # (pandas' Timestamp is a datetime: it orders against the messages' times)
        if status != "error" or turn_id in present or not isinstance(started, datetime):
            continue
        if isinstance(text, str) and text:
            failed.append(_FailedTurn(started, text, error if isinstance(error, str) else None))
    return sorted(failed, key=lambda t: t.started_at)


def _turn_starts(
    messages: list[Message], ended: dict[str, tuple[str, str | None]]
) -> list[dict[str, Any]]:
    """Where each turn of ``messages`` starts (its first message's index), with how it
    ended; system messages (the prompt, a summary placed after it) are in no turn."""
    starts: list[dict[str, Any]] = []
    current: str | None = None
    for index, message in enumerate(messages):
        if message.role == "system" or message.turn_id is None or message.turn_id == current:
            continue
        current = message.turn_id
        status, error = ended.get(current, ("completed", None))
        starts.append({"start": index, "status": status, "error": error})
    return starts


def _fence(text: str, language: str = "") -> str:
    """``text`` in a code block whose fence is longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def _code(text: str) -> str:
    """``text`` as inline code on one line: an id or a name (a model's, so untrusted)
    cannot end the code span early and leave HTML outside it."""
    flat = " ".join(text.split())
    longest = max((len(run) for run in re.findall(r"`+", flat)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{ticks}{pad}{flat}{pad}{ticks}"


def _pretty_json(text: str) -> tuple[str, str]:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False), "json"
    except ValueError:
        return text, ""


# What the heading of a message that did not finish normally says after its name.
_UNFINISHED = {
    ("assistant", "interrupted"): "interrupted before its end",
    ("assistant", "error"): "cut off before its end",
    ("tool", "declined"): "not run: skipped by the user",
    ("tool", "not_run"): "not run: past the turn's limit on tool rounds",
    ("tool", "cancelled"): "stopped: the turn was stopped while the tool ran",
    ("tool", "aborted"): "aborted: the process stopped before the tool finished",
}
# How a turn that did not complete ended, said after its last message.
_TURN_ENDS = {
    "running": "did not finish (still running, or its process stopped)",
    "interrupted": "was interrupted",
    "max_rounds": "stopped at the limit on tool rounds",
    "budget_exceeded": "stopped at the budget",
    "error": "ended with an error",
    "rejected": "was rejected by a guardrail",
    "aborted": "was aborted: its process stopped while tools ran",
}
_ERROR_CHARS = 500  # of a turn's error in the export (a server's words: bounded)


def _turn_end(status: str, error: str | None) -> list[str]:
    """The line after a turn that did not complete: how it ended and, bounded, why."""
    said = _TURN_ENDS.get(status)
    if said is None:
        return []
    line = f"*The turn {said}.*"
    if error:
        flat = " ".join(error.split())
        flat = flat if len(flat) <= _ERROR_CHARS else flat[: _ERROR_CHARS - 1] + "…"
        line += f" {safe_markdown(flat, headings=False)}"
    return [line, ""]


def _markdown(
    session: StoredSession,
    ended: dict[str, tuple[str, str | None]],
    failed: list[_FailedTurn],
    *,
    folded: bool = False,
) -> str:
    # The title comes from the user's first message: one line, its HTML shown as text.
    title = " ".join((session.title or f"Session {session.id}").split())
    lines = [f"# {safe_markdown(title)}", ""]
    lines.append(f"- session: {_code(session.id)}")
    if session.model:
        lines.append(f"- model: {_code(session.model)}")
    lines.append(f"- created: {session.created_at.isoformat(timespec='seconds')}")
    lines.append("")
    messages = _messages(session, folded=folded)
    waiting = list(failed)
    for index, message in enumerate(messages):
        while waiting and waiting[0].started_at < message.created_at:
            lines += _failed_markdown(waiting.pop(0))
        lines += _message_markdown(message)
        turn = message.turn_id
        following = messages[index + 1].turn_id if index + 1 < len(messages) else None
        if turn is not None and following != turn and turn in ended:
            lines += _turn_end(*ended[turn])
    for left in waiting:
        lines += _failed_markdown(left)
    return "\n".join(lines).rstrip() + "\n"


def _failed_markdown(turn: _FailedTurn) -> list[str]:
    """A failed turn that left the conversation: the user's words, and how it ended."""
    heading = "## User — left out of the conversation: the request failed"
    return [heading, "", safe_markdown(turn.user_text, headings=False), "",
            *_turn_end("error", turn.error)]  # fmt: skip


def _message_markdown(message: Message) -> list[str]:
    lines: list[str] = []
    content = message.content
    mark = " (folded into a summary)" if message.state == "compacted" else ""
    unfinished = _UNFINISHED.get((message.role, message.status))
    note = f" — {unfinished}" if unfinished else ""
    if message.role == "tool":
        name = message.name or "tool"
        heading = f"## Tool result: {_code(name)} ({_code(message.tool_call_id or '')})"
        lines.append(heading + note + mark)
        body, language = _pretty_json(content or "")
        return [*lines, "", _fence(body, language), ""]
    if message.status == "summary":
        lines += [f"## Summary of the earlier conversation{mark}", ""]
        content = (content or "").removeprefix(SUMMARY_HEADER)
    else:
        lines += [f"## {message.role.capitalize()}{note}{mark}", ""]
    if message.reasoning:
        lines += ["<details><summary>Thinking</summary>", ""]
        lines += [safe_markdown(message.reasoning, headings=False), "", "</details>", ""]
    if content:
        # Model (and pasted) text: no live HTML, no fetched images, prices not math,
        # no heading of the export's own levels (a fake "## User" section).
        lines += [safe_markdown(content, headings=False), ""]
    for image in message.attachments or []:
        lines += [safe_markdown(image.label), ""]
    for call in message.tool_calls or []:
        lines.append(f"**Tool call** {_code(call.name)} ({_code(call.id)})")
        body, language = _pretty_json(call.arguments or "")
        lines += ["", _fence(body, language), ""]
    return lines


# ------------------------------------------------------------------ import


def _content(content: Any, where: str) -> tuple[str | None, list[ImagePart] | None]:
    """The text and images of chat content: a string, or text and image_url parts."""
    if content is None or isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        what = type(content).__name__
        raise StoreError(f"Cannot import {where}: content must be text or parts, not {what}.")
    texts: list[str] = []
    images: list[ImagePart] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            images.append(_image(part.get("image_url"), where))
        else:
            raise StoreError(
                f"Cannot import {where}: only text and image_url parts are supported, not {kind}."
            )
    return "".join(texts) if texts else None, images or None


def _image(spec: Any, where: str) -> ImagePart:
    from ._images import to_image

    url = spec.get("url") if isinstance(spec, dict) else spec
    asked = spec.get("detail") if isinstance(spec, dict) else None
    detail: ImageDetail = asked if asked in ("low", "high") else "auto"
    if not isinstance(url, str):
        raise StoreError(f"Cannot import {where}: an image_url part needs a url.")
    try:
        if url.startswith("data:"):
            _, _, encoded = url.partition(",")
            part = to_image(base64.b64decode(encoded, validate=True), detail=detail)
        else:
            part = to_image(url, detail=detail) if url.startswith(("http://", "https://")) else None
    except (AttachmentError, binascii.Error) as exc:
        raise StoreError(f"Cannot import {where}: its image is not readable ({exc}).") from None
    if part is None:
        raise StoreError(f"Cannot import {where}: an image must be a data: or http(s) URL.")
    return part


def _tool_calls(raw: Any, where: str) -> list[ToolCall] | None:
    if not raw:
        return None
    if not isinstance(raw, list):
        raise StoreError(f"Cannot import {where}: tool_calls must be a list.")
    calls = []
    for item in raw:
        function = item.get("function") if isinstance(item, dict) else None
        source = function if isinstance(function, dict) else item
        if not isinstance(source, dict) or not item.get("id") or not source.get("name"):
            raise StoreError(f"Cannot import {where}: each tool call needs an id and a name.")
        arguments = source.get("arguments", "")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append(ToolCall(id=str(item["id"]), name=str(source["name"]), arguments=arguments))
    return calls


def _reasoning(item: dict[str, Any], where: str) -> str | None:
    """An assistant message's reasoning, in the field export_session writes it to."""
    value = item.get("reasoning_content")
    if value is None or item.get("role") != "assistant":
        return None
    if not isinstance(value, str):
        raise StoreError(f"Cannot import {where}: its reasoning_content must be text.")
    return value


Imported = str | bytes | list[dict[str, Any]] | dict[str, Any]


def _decoded(data: Imported) -> Any:
    if isinstance(data, str | bytes):
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StoreError(f"Cannot import: the text is not JSON ({exc}).") from exc
    return data


def _kept(data: Any) -> tuple[str | None, dict[str, str]]:
    """The title and image names an ``"nbchat"`` export keeps beside its messages."""
    if not isinstance(data, dict):
        return None, {}
    title, names = data.get("title"), data.get("image_names")
    if not isinstance(names, dict):
        names = {}
    named = {str(k): v for k, v in names.items() if isinstance(v, str)}
    return (title if isinstance(title, str) and title else None), named


def recorded_model(data: Imported) -> str | None:
    """The model an ``"nbchat"`` export was recorded with (an ``"openai"`` one has none)."""
    return _kept_text(_decoded(data), "model")


def _kept_text(data: Any, key: str) -> str | None:
    """A text an ``"nbchat"`` export keeps beside its messages (its session id, model)."""
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


# The user message of a turn's own round that carries the images its tools returned
# (_turn_reply): a continuation of the turn, not a new one.
_TOOL_IMAGES = re.compile(r"Images? returned by ")

_STATUSES: tuple[str, ...] = get_args(TurnStatus)


@dataclass
class _ImportedTurn:
    """One turn of an imported conversation: its messages' span and how it ended."""

    start: int
    status: TurnStatus = "completed"
    error: str | None = None
    id: str = field(default_factory=new_id)


def _turns(data: Any, messages: list[Message]) -> list[_ImportedTurn]:
    """The turns of ``messages``: where an ``"nbchat"`` export says they start, else one
    from each user message (but the one that carries the images a turn's tools returned)."""
    kept = data.get("turns") if isinstance(data, dict) else None
    if kept is None:
        inferred = [
            _ImportedTurn(i)
            for i, m in enumerate(messages)
            if m.role == "user"
            and not (m.attachments and _TOOL_IMAGES.match(m.content or "") and i > 0)
        ]
        if inferred and pending_tool_calls(messages):
            inferred[-1].status = "running"  # as a stopped process leaves it: resume() ends it
        return inferred
    turns: list[_ImportedTurn] = []
    if not isinstance(kept, list):
        raise StoreError("Cannot import: turns must be a list.")
    for n, item in enumerate(kept):
        start = item.get("start") if isinstance(item, dict) else None
        status = item.get("status", "completed") if isinstance(item, dict) else None
        error = item.get("error") if isinstance(item, dict) else None
        after = turns[-1].start if turns else -1
        if not isinstance(start, int) or isinstance(start, bool) or not after < start:
            raise StoreError(f"Cannot import turn {n}: its start must be a later message index.")
        if start >= len(messages) or status not in _STATUSES:
            raise StoreError(
                f"Cannot import turn {n}: it must start at a message and have a turn's status."
            )
        kept_error = error if isinstance(error, str) else None
        turns.append(_ImportedTurn(start, cast(TurnStatus, status), kept_error))
    return turns


def _number(messages: list[Message], turns: list[_ImportedTurn]) -> None:
    """Put each message in its turn and round (request) as the session loop numbers them:
    a turn's first message has no round, its n-th assistant message round n - 1, and
    what follows one (tool results, their images) its round. System messages are in none."""
    bounds = [t.start for t in turns] + [len(messages)]
    for turn, start, end in zip(turns, bounds, bounds[1:], strict=False):
        round_: int | None = None
        for message in messages[start:end]:
            if message.role == "system":
                continue
            if message.role == "assistant":
                round_ = 0 if round_ is None else round_ + 1
            message.turn_id, message.round = turn.id, round_


def _turn_events(
    session_id: str, messages: list[Message], turns: list[_ImportedTurn]
) -> list[TurnStarted | TurnFinished]:
    """The events that store ``turns`` as the session loop would have (``turns`` rows)."""
    events: list[TurnStarted | TurnFinished] = []
    bounds = [t.start for t in turns] + [len(messages)]
    for turn, start, end in zip(turns, bounds, bounds[1:], strict=False):
        span = messages[start:end]
        first = span[0]
        text = (first.content or "") if first.role == "user" else ""
        events.append(
            TurnStarted(session_id=session_id, turn_id=turn.id, text=text, at=first.created_at)
        )
        if turn.status == "running":  # its tool calls are pending: resume() finishes it
            continue
        result = TurnResult(
            session_id=session_id,
            turn_id=turn.id,
            status=turn.status,
            rounds=sum(m.role == "assistant" for m in span),
            error=turn.error,
        )
        events.append(
            TurnFinished(
                session_id=session_id, turn_id=turn.id, result=result, at=span[-1].created_at
            )
        )
    return events


def _parse(data: Any) -> list[Message]:
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        data = data["messages"]
    if not isinstance(data, list) or not data:
        raise StoreError("Cannot import: expected a non-empty list of OpenAI-format messages.")
    messages: list[Message] = []
    asked: set[str] = set()
    start = utcnow()
    for seq, item in enumerate(data):
        where = f"message {seq}"
        if not isinstance(item, dict) or item.get("role") not in _ROLES:
            raise StoreError(f"Cannot import {where}: its role must be one of {', '.join(_ROLES)}.")
        calls = _tool_calls(item.get("tool_calls"), where) if item["role"] == "assistant" else None
        asked.update(call.id for call in calls or [])
        tool_call_id = item.get("tool_call_id")
        if item["role"] == "tool" and tool_call_id not in asked:
            raise StoreError(
                f"Cannot import {where}: tool result {tool_call_id!r} answers no earlier tool call."
            )
        if item["role"] != "assistant" and item.get("content") is None:
            # Only an assistant's content may be null (its tool calls are the message).
            raise StoreError(f"Cannot import {where}: a {item['role']} message needs content.")
        text, images = _content(item.get("content"), where)
        messages.append(
            Message(
                role=item["role"],
                content=text,
                reasoning=_reasoning(item, where),
                attachments=images,
                name=item.get("name"),
                tool_calls=calls,
                tool_call_id=tool_call_id if item["role"] == "tool" else None,
                seq=seq,
                # Distinct times keep the original order in every time-sorted view.
                created_at=start + timedelta(microseconds=seq),
            )
        )
    return messages


def import_session(
    data: Imported,
    db: Db = None,
    title: str | None = None,
    *,
    model: str | None = None,
    notebook: str | None = None,
) -> str:
    """Store OpenAI-format messages (JSON text or a list of dicts) as a new session.

    Returns the new session's id; ``Session(session_id=..., db=...)`` continues it.
    A leading system message becomes the session's system prompt. Tool results must
    answer an earlier tool call; an assistant's tool calls left without results make
    the imported session *pending* (``resume()`` or ``abort_pending()``). The title is
    ``title``, else the one an ``"nbchat"`` export kept, else (as for a new session) the
    first user message's (an ``"openai"`` export is messages only: a custom title is
    not in it, pass ``title=`` or export ``"nbchat"``); images take the names that
    export kept.

    The messages are stored in turns, as the session loop stores them (``turns()``,
    ``sessions()``' turn count, ``%chat cost``): those an ``"nbchat"`` export kept, with
    their statuses, else one per user message, each ``"completed"`` (the last one
    ``"running"`` while its tool calls are pending, as a stopped process leaves it).
    An ``"nbchat"`` export also gives the model (unless ``model`` is given) and the
    ``parent_id``: the id of the session it was exported from. The session belongs to
    ``notebook``, else (as a new session does) to the notebook importing it.
    """
    decoded = _decoded(data)
    kept_title, names = _kept(decoded)
    messages = _parse(decoded)
    turns = _turns(decoded, messages)
    _number(messages, turns)
    for message in messages:
        for i, image in enumerate(message.attachments or []):
            if image.sha256 in names and message.attachments is not None:
                message.attachments[i] = image.model_copy(update={"name": names[image.sha256]})
    first = next((m.content for m in messages if m.role == "user"), None)
    system = messages[0].content if messages[0].role == "system" else None
    session_id = new_id()
    with open_store(db, create=True) as store:  # an import may start a store
        store.create_session(
            session_id=session_id,
            model=model or _kept_text(decoded, "model"),
            system_prompt=system,
            title=title or kept_title or session_title(first) or "Imported session",
            parent_id=_kept_text(decoded, "session_id"),
            notebook=notebook if notebook is not None else current_notebook(),
            metadata={"imported": True},
            messages=messages,
        )
        store.write_many(_turn_events(session_id, messages, turns))
    return session_id
