"""What the model reads of a tool's call: its return value as text (JSON, a DataFrame's
head, a ``repr``; images apart), cut to a length, or an error payload."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Final

import pydantic_core
from pydantic import BaseModel

from ._text import valid_text
from ._types import ImagePart

__all__ = [
    "DECLINED",
    "DEFAULT_MAX_RESULT_CHARS",
    "NOT_RUN",
    "CallError",
    "describe_exception",
    "error_payload",
    "images_of",
    "serialise_result",
    "truncate",
]

DEFAULT_MAX_RESULT_CHARS = 8000
"""Results longer than this many characters are cut (with a marker) before the model sees them."""

_HEAD_ROWS = 10

DECLINED = "declined"
"""The ``error_kind`` of a call the user chose not to run: the model hears why, but the
call did not fail (``is_error`` is false, its tool message's status ``"declined"``)."""
NOT_RUN: Final = "not_run"
"""The ``error_kind`` of a call made in a turn's last, tool-less round (past
``max_rounds``): answered without running, not failed (its message's status ``"not_run"``)."""


class CallError(ValueError):
    """A call failed in a way the model should hear about (never leaves the tools' modules)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def error_payload(kind: str, message: str) -> str:
    """The JSON text a model receives when a tool call fails."""
    payload = {"ok": False, "error_kind": kind, "message": valid_text(message)}
    return json.dumps(payload, ensure_ascii=False)


def truncate(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    keep = max(max_chars, 0)
    return f"{text[:keep]}\n... [truncated: {keep} of {len(text)} characters shown]"


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` of an exception, even when its ``str()`` itself raises."""
    try:
        text = str(exc)
    except BaseException:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _safe_repr(value: Any) -> str:
    # BaseException too: a __repr__ raising SystemExit or KeyboardInterrupt inside a tool's
    # task would otherwise stop nbchat's event loop.
    try:
        return repr(value)
    except BaseException as exc:
        return f"<{type(value).__name__} object; repr() failed: {type(exc).__name__}>"


def _pandas_text(value: Any) -> str | None:
    import pandas as pd  # only reached for pandas objects, so pandas is already loaded

    if isinstance(value, pd.DataFrame | pd.Series):
        kind = type(value).__name__
        named = isinstance(value, pd.Series) and value.name is not None
        label = f" {value.name!r}" if named else ""
        first = f" (first {_HEAD_ROWS} rows)" if len(value) > _HEAD_ROWS else ""
        head = value.head(_HEAD_ROWS).to_string()
        return f"{kind}{label} with shape {value.shape}{first}:\n{head}"
    return None


def _json_fallback(value: Any) -> Any:
    module = type(value).__module__
    if module.startswith("numpy") and hasattr(value, "tolist"):
        return value.tolist()
    if module.startswith("pandas") and (text := _pandas_text(value)) is not None:
        return text
    return _safe_repr(value)


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    module = type(value).__module__
    if isinstance(value, BaseModel):
        try:
            return value.model_dump_json()
        except BaseException:
            return _safe_repr(value)
    if module.startswith("pandas") and (text := _pandas_text(value)) is not None:
        return text
    jsonable = (
        value is None
        or isinstance(value, bool | int | float | dict | list | tuple | set | frozenset)
        or (module.startswith("numpy") and hasattr(value, "tolist"))
        or (dataclasses.is_dataclass(value) and not isinstance(value, type))
    )
    if jsonable:
        try:
            # NaN and infinities as null: JSON has no word for them, and a model (or the
            # code it writes) that reads "NaN" reads invalid JSON.
            encoded = pydantic_core.to_json(value, fallback=_json_fallback, inf_nan_mode="null")
            return encoded.decode()
        except BaseException:  # circular references, lone surrogates, hostile reprs...
            pass
        try:  # the standard library's encoder takes lone surrogates (made valid later)
            return json.dumps(value, ensure_ascii=False, default=_json_fallback)
        except BaseException:
            return _safe_repr(value)
    return _safe_repr(value)


def images_of(value: Any) -> tuple[Any, list[ImagePart]]:
    """What the model reads as text, and the images a tool returned (an image, or a list
    mixing text and images); a figure that cannot be drawn is the tool's error."""
    from ._images import MAX_TOOL_IMAGES, is_image, to_image

    items = list(value) if isinstance(value, list | tuple) else [value]
    pictures = [item for item in items if is_image(item)]
    if not pictures:
        return value, []
    try:
        images = [part for item in pictures[:MAX_TOOL_IMAGES] if (part := to_image(item))]
    except Exception as exc:
        raise CallError("tool_error", f"its image could not be converted: {exc}") from None
    texts = [item if isinstance(item, str) else serialise_result(item) for item in items
             if not is_image(item)]  # fmt: skip
    labels = ", ".join(image.label for image in images)
    which = "the images follow" if len(images) > 1 else "the image follows"
    note = f"(Returned {labels}; {which} in the next message.)"
    if len(pictures) > len(images):
        note += (
            f" {len(pictures) - len(images)} more images were not sent (at most {MAX_TOOL_IMAGES})."
        )
    return "\n\n".join([*texts, note]), images


def serialise_result(value: Any, max_chars: int | None = DEFAULT_MAX_RESULT_CHARS) -> str:
    """A tool's return value as the text the model reads, cut past ``max_chars``.

    ``str`` as is; pydantic models, dicts, lists, numbers, ``None`` as JSON (NaN and
    infinities as ``null``, ``repr`` for what JSON cannot hold); DataFrames and Series as
    shape plus the first rows; others ``repr``. A cut result ends with
    ``... [truncated: N of M characters shown]``. Never raises.
    """
    try:
        text = _to_text(value)
    except BaseException:  # e.g. a DataFrame subclass whose to_string() fails, or exits
        text = _safe_repr(value)
    # Text from the file system may hold lone surrogates; made valid once, here.
    return truncate(valid_text(text), max_chars)
