"""A stored session out as OpenAI-format JSON or Markdown, and OpenAI-format JSON back in."""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import timedelta
from typing import Any, Literal

from ._exceptions import AttachmentError, StoreError
from ._markup import safe_markdown
from ._store import Db, open_store
from ._store._records import StoredSession
from ._types import ImageDetail, ImagePart, Message, ToolCall, new_id, utcnow

__all__ = ["export_session", "import_session"]

_ROLES = ("system", "user", "assistant", "tool")


def _messages(session: StoredSession) -> list[Message]:
    messages = list(session.messages)
    # The session loop stores its system prompt as the first message; an older or
    # hand-made session may only have it on the session row.
    if session.system_prompt and not (messages and messages[0].role == "system"):
        messages.insert(0, Message(role="system", content=session.system_prompt))
    return messages


def export_session(
    session_id: str, format: Literal["openai", "markdown"] = "openai", db: Db = None
) -> str:
    """The session's live context as text.

    ``"openai"``: a JSON list of chat-completions messages (what the next request
    would send; images as ``data:`` URLs), which ``import_session`` reads back.
    ``"markdown"``: a readable transcript with tool calls and results in code blocks,
    and images as their labels (``[image: plot.png, 640×480 png]``).
    """
    if format not in ("openai", "markdown"):
        raise ValueError(f"format must be 'openai' or 'markdown', not {format!r}.")
    with open_store(db) as store:
        session = store.load_session(session_id)
    if format == "openai":
        # Reasoning in the field DeepSeek and vLLM use, which import_session reads back.
        wire = [m.to_openai(reasoning_field="reasoning_content") for m in _messages(session)]
        return json.dumps(wire, indent=2, ensure_ascii=False)
    return _markdown(session)


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


def _markdown(session: StoredSession) -> str:
    # The title comes from the user's first message: one line, its HTML shown as text.
    title = " ".join((session.title or f"Session {session.id}").split())
    lines = [f"# {safe_markdown(title)}", ""]
    lines.append(f"- session: {_code(session.id)}")
    if session.model:
        lines.append(f"- model: {_code(session.model)}")
    lines.append(f"- created: {session.created_at.isoformat(timespec='seconds')}")
    lines.append("")
    for message in _messages(session):
        content = message.content
        if message.role == "tool":
            name = message.name or "tool"
            heading = f"## Tool result: {_code(name)} ({_code(message.tool_call_id or '')})"
            lines.append(heading)
            body, language = _pretty_json(content or "")
            lines += ["", _fence(body, language), ""]
            continue
        lines += [f"## {message.role.capitalize()}", ""]
        if message.reasoning:
            lines += ["<details><summary>Thinking</summary>", ""]
            lines += [safe_markdown(message.reasoning), "", "</details>", ""]
        if content:
            # Model (and pasted) text: no live HTML, no fetched images, prices not math.
            lines += [safe_markdown(content), ""]
        for image in message.attachments or []:
            lines += [safe_markdown(image.label), ""]
        for call in message.tool_calls or []:
            lines.append(f"**Tool call** {_code(call.name)} ({_code(call.id)})")
            body, language = _pretty_json(call.arguments or "")
            lines += ["", _fence(body, language), ""]
    return "\n".join(lines).rstrip() + "\n"


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


def _parse(data: str | bytes | list[dict[str, Any]] | dict[str, Any]) -> list[Message]:
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise StoreError(f"Cannot import: the text is not JSON ({exc}).") from exc
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
    data: str | bytes | list[dict[str, Any]] | dict[str, Any],
    db: Db = None,
    title: str | None = None,
    *,
    model: str | None = None,
) -> str:
    """Store OpenAI-format messages (JSON text or a list of dicts) as a new session.

    Returns the new session's id; ``Session(session_id=..., db=...)`` continues it.
    A leading system message becomes the session's system prompt. Tool results must
    answer an earlier tool call; an assistant's tool calls left without results make
    the imported session *pending* (``resume()`` or ``abort_pending()``).
    """
    messages = _parse(data)
    system = messages[0].content if messages[0].role == "system" else None
    session_id = new_id()
    with open_store(db) as store:
        store.create_session(
            session_id=session_id,
            model=model,
            system_prompt=system,
            title=title or "Imported session",
            metadata={"imported": True},
            messages=messages,
        )
    return session_id
