"""A team store's URL, and the driver's errors as a user may read them.

``postgresql://user@host:5432/db`` is libpq's URL, any of its parameters allowed. A
password in it is refused: libpq reads it from ``~/.pgpass`` or ``PGPASSWORD``, so it is
never stored in a notebook, a config file or a repr. ``shown_url`` is what messages
print (any password replaced by ``[redacted]``), and ``describe`` redacts ``PGPASSWORD``
from a driver's error.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._exceptions import StoreError
from .._text import REDACTED, redact

__all__ = ["cannot_connect", "check_url", "describe", "psycopg_module", "shown_url"]


def psycopg_module() -> Any:
    """psycopg, or a ``StoreError`` saying how to install it."""
    try:
        import psycopg
    except ImportError as exc:
        raise StoreError(
            "A PostgreSQL store needs psycopg: pip install 'nbchat[postgres]'."
        ) from exc
    return psycopg


def shown_url(raw: str) -> str:
    """``raw`` as it may be shown: a password (in the URL or a parameter) redacted."""
    try:
        parts = urlsplit(raw)
        netloc = parts.netloc
        if "@" in netloc:
            credentials, host = netloc.rsplit("@", 1)
            if ":" in credentials:
                credentials = credentials.split(":", 1)[0] + ":" + REDACTED
            netloc = f"{credentials}@{host}"
        query = [(k, REDACTED if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)]
        return urlunsplit(
            (parts.scheme, netloc, parts.path, urlencode(query, safe="[]/"), parts.fragment)
        )
    except ValueError:
        return re.sub(r"(?<=:)[^:@/]*(?=@)", REDACTED, raw)


def check_url(raw: str) -> str:
    """The URL to connect with; ``StoreError`` if it is malformed or holds a password."""
    psycopg = psycopg_module()
    shown = shown_url(raw)
    try:
        urlsplit(raw).port  # noqa: B018  # a port that is not a number
    except ValueError as exc:
        raise StoreError(f"Not a valid PostgreSQL URL: {shown} ({exc}).") from None
    try:
        params = psycopg.conninfo.conninfo_to_dict(raw)
    except psycopg.ProgrammingError as exc:
        detail = redact(str(exc).strip().splitlines()[0], *_password_in(raw))
        raise StoreError(f"Not a valid PostgreSQL URL: {shown} ({detail}).") from None
    if params.get("password"):
        raise StoreError(
            f"The store URL {shown} has a password in it; nbchat does not keep passwords. "
            "Put it in ~/.pgpass (or PGPASSWORD) and use the URL without it."
        )
    return raw


def _password_in(raw: str) -> list[str]:
    found = re.findall(r"://[^:/@]*:([^@/]*)@", raw) + re.findall(r"password=([^&\s]*)", raw)
    return [p for p in found if p]


def _secrets() -> tuple[str, ...]:
    value = os.environ.get("PGPASSWORD")
    return (value,) if value else ()


def cannot_connect(shown: str, exc: BaseException) -> str:
    """Why a connection to the store ``shown`` failed: the server was not reached, or it
    answered and refused (a role, database or password it does not accept).

    libpq gives no SQLSTATE for a refused connection; the server's words come after its
    severity, ``FATAL:``, which libpq's own messages (refused, timed out) never carry.
    """
    said = describe(exc)
    if "FATAL:" in said:
        return f"The server of the store {shown} refused the connection: {said}"
    return f"Cannot reach the store {shown}: {said}"


def describe(exc: BaseException) -> str:
    """A driver error in one or two lines, with any known password redacted."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = "; ".join(lines[:2]) or type(exc).__name__
    return redact(text, *_secrets())
