"""Text that is safe to show, store and send: secrets redacted, valid UTF-8.

Ground floor, standard library only: the client cleans what comes off the wire with
these, and the session can clean what it stores with the same two functions.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["REDACTED", "counted", "money", "redact", "redact_data", "valid_data", "valid_text"]

REDACTED = "[redacted]"
# Shapes of credentials worth hiding even when nbchat does not know the value: OpenAI-style
# keys (sk-..., sk-proj-..., also half-masked "sk-abc***xyz") and bearer tokens (RFC 6750).
_KEY_SHAPES = re.compile(r"\bsk-[A-Za-z0-9_*\-]{8,}|(?<=\bBearer )[A-Za-z0-9\-._~+/*]{8,}=*", re.I)
# Shorter "secrets" are placeholders or test values; replacing them everywhere would
# mangle the text around them more than it protects.
_MIN_SECRET = 4
_SURROGATE = re.compile("[\ud800-\udfff]")


def redact(text: str, *secrets: str) -> str:
    """``text`` with each of ``secrets`` and anything shaped like a key replaced by [redacted].

    A key shape is ``sk-`` or ``Bearer `` followed by eight or more token characters.
    Secrets shorter than four characters are left alone (they are not secrets, and
    would match everywhere).
    """
    for secret in secrets:
        if len(secret) >= _MIN_SECRET and secret in text:
            text = text.replace(secret, REDACTED)
    return _KEY_SHAPES.sub(_mask, text)


def _mask(match: re.Match[str]) -> str:
    found = match.group(0)
    return "sk-" + REDACTED if found[:3].lower() == "sk-" else REDACTED


def redact_data(data: Any, *secrets: str) -> Any:
    """A copy of a JSON-like value (an error body) with every string passed through ``redact``."""
    if isinstance(data, str):
        return redact(data, *secrets)
    if isinstance(data, dict):
        return {redact_data(k, *secrets): redact_data(v, *secrets) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact_data(v, *secrets) for v in data]
    return data


def valid_text(s: str) -> str:
    """``s`` as valid Unicode: lone surrogates become U+FFFD, paired ones are joined.

    Text is usually valid already: that case costs one scan and returns ``s`` itself.
    """
    if s.isascii() or _SURROGATE.search(s) is None:
        return s
    # Through UTF-16, a high+low surrogate pair becomes the character it encodes and a
    # lone surrogate becomes one replacement character.
    return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def valid_data(data: Any) -> Any:
    """A JSON-like value with every string (keys too) passed through ``valid_text``."""
    if isinstance(data, str):
        return valid_text(data)
    if isinstance(data, dict):
        return {valid_data(k): valid_data(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [valid_data(v) for v in data]
    return data


def money(usd: float) -> str:
    """Dollars in one fixed style: ``$1.50``, ``$0.0012``, ``$0.00001`` (never ``1e-05``).

    Three significant digits below a dollar, trailing zeros dropped, at least cents.
    """
    if usd == 0:
        return "$0.00"
    if abs(usd) >= 1:
        return f"${usd:,.2f}"
    digits = max(2, 2 - math.floor(math.log10(abs(usd))))
    shown = f"{usd:.{digits}f}".rstrip("0")
    whole, _, fraction = shown.partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def counted(n: int, noun: str) -> str:
    """``1 request``, ``3 requests``: a count and its noun, in the number it takes."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
