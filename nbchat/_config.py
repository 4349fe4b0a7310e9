"""Where the model, endpoint, key and store come from.

Order, first found wins: an explicit argument, then the kernel's defaults (set by
``%chat config`` or ``nbchat.local()``), then the environment (``NBCHAT_*``, falling
back to ``OPENAI_*``). The API key is held as a ``SecretStr`` so it never shows up in
a repr, a log line or an error message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, SecretStr

from ._exceptions import ConfigError

__all__ = [
    "ClientSettings",
    "default_db_path",
    "get_defaults",
    "is_loopback",
    "resolve_client",
    "set_defaults",
]

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Settings a kernel may change with %chat config / nbchat.configure().
DEFAULT_KEYS = frozenset(
    {"model", "base_url", "api_key", "db", "system", "temperature", "max_rounds", "budget_usd"}
)
_defaults: dict[str, Any] = {}


def set_defaults(**values: Any) -> dict[str, Any]:
    """Set this process's defaults for new sessions; ``None`` removes a default."""
    unknown = set(values) - DEFAULT_KEYS
    if unknown:
        raise ConfigError(
            f"Unknown setting {', '.join(sorted(unknown))}; "
            f"known settings are {', '.join(sorted(DEFAULT_KEYS))}."
        )
    for key, value in values.items():
        if value is None:
            _defaults.pop(key, None)
        else:
            _defaults[key] = SecretStr(value) if key == "api_key" else value
    return get_defaults()


def get_defaults() -> dict[str, Any]:
    """A copy of this process's defaults (the API key stays a ``SecretStr``)."""
    return dict(_defaults)


def reset_defaults() -> None:
    """Forget every default set in this process (tests use this)."""
    _defaults.clear()


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def is_loopback(base_url: str | None) -> bool:
    """Whether ``base_url`` points at this machine (a local server needs no real key)."""
    if not base_url:
        return False
    host = urlparse(base_url).hostname or ""
    return host in {"localhost", "::1"} or host.startswith("127.")


class ClientSettings(BaseModel):
    """The resolved endpoint of a session: model, base URL and key."""

    model_config = ConfigDict(frozen=True)

    model: str
    base_url: str
    api_key: SecretStr


def resolve_client(
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | SecretStr | None = None,
) -> ClientSettings:
    """Resolve model, base URL and key, or raise ``ConfigError`` saying what to set."""
    model = model or _defaults.get("model") or _env("NBCHAT_MODEL")
    base_url = (
        base_url
        or _defaults.get("base_url")
        or _env("NBCHAT_BASE_URL", "OPENAI_BASE_URL")
        or OPENAI_BASE_URL
    )
    key: SecretStr | str | None = api_key or _defaults.get("api_key")
    if key is None:
        key = _env("NBCHAT_API_KEY", "OPENAI_API_KEY")
    if not model:
        raise ConfigError(
            "No model configured: pass model=..., run %chat config model=NAME, "
            "or set NBCHAT_MODEL (nbchat.local() starts a free local model)."
        )
    if not key:
        if not is_loopback(base_url):
            raise ConfigError(
                f"No API key for {base_url}: set NBCHAT_API_KEY (or OPENAI_API_KEY), "
                "or pass api_key=... (nbchat.local() needs no key)."
            )
        key = "not-needed-for-a-local-server"
    secret = key if isinstance(key, SecretStr) else SecretStr(key)
    return ClientSettings(model=model, base_url=base_url.rstrip("/"), api_key=secret)


def default_db_path() -> str:
    """The store used when no ``db=`` is given: ``NBCHAT_DB`` or ``~/.nbchat/nbchat.duckdb``."""
    configured = _defaults.get("db") or _env("NBCHAT_DB")
    if configured:
        return str(configured)
    return str(Path.home() / ".nbchat" / "nbchat.duckdb")
