"""Where the model, endpoint, key and store come from.

Order, first found wins: an explicit argument, then the kernel's defaults (set by
``%chat config`` or ``nbchat.local()``), then the environment (``NBCHAT_*``, falling
back to ``OPENAI_*``). The API key is held as a ``Secret`` so it never shows up in a
repr, a log line or an error message. Plain dataclasses, not pydantic: ``%load_ext
nbchat`` imports this module and must not pay for pydantic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ._exceptions import ConfigError

__all__ = [
    "ClientSettings",
    "Secret",
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


# Where a key came from, as error messages name it (never the key itself).
KEY_FROM_ARGUMENT = "the api_key= argument"
KEY_FROM_KERNEL = "the kernel's setting (%chat config api_key=... or nbchat.configure)"
KEY_FROM_NONE = "no key: a placeholder for a local server"


class Secret:
    """A string that never shows itself: its repr and str are masked.

    ``source`` says where it came from (an environment variable's name, ``%chat config``,
    an argument), so an error about a rejected key can say which one was used.
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = KEY_FROM_ARGUMENT) -> None:
        self._value = value
        self.source = source

    def get_secret_value(self) -> str:
        """The real value (to hand to the HTTP client, nowhere else)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


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
            _defaults[key] = Secret(value, KEY_FROM_KERNEL) if key == "api_key" else value
    return get_defaults()


def get_defaults() -> dict[str, Any]:
    """A copy of this process's defaults (the API key stays a ``Secret``)."""
    return dict(_defaults)


def reset_defaults() -> None:
    """Forget every default set in this process (tests use this)."""
    _defaults.clear()


def _env(*names: str) -> str | None:
    found = _env_named(*names)
    return found[1] if found else None


def _env_named(*names: str) -> tuple[str, str] | None:
    """(name, value) of the first of ``names`` set in the environment."""
    for name in names:
        value = os.environ.get(name)
        if value:
            return name, value
    return None


def is_loopback(base_url: str | None) -> bool:
    """Whether ``base_url`` points at this machine (a local server needs no real key)."""
    if not base_url:
        return False
    host = urlparse(base_url).hostname or ""
    return host in {"localhost", "::1"} or host.startswith("127.")


@dataclass(frozen=True)
class ClientSettings:
    """The resolved endpoint of a session: model, base URL and key (``api_key.source``
    says where the key came from)."""

    model: str
    base_url: str
    api_key: Secret

    def key_hint(self) -> str:
        """Which key was sent and how to send another, for a 401 message (never the key)."""
        how = "%chat config api_key=..., the NBCHAT_API_KEY environment variable, or api_key=..."
        if self.api_key.source == KEY_FROM_NONE:
            return f"No key was set (this local server was sent a placeholder); set one with {how}."
        return f"The key sent came from {self.api_key.source}; set another with {how}."


def resolve_client(
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | Secret | None = None,
) -> ClientSettings:
    """Resolve model, base URL and key, or raise ``ConfigError`` saying what to set."""
    model = model or _defaults.get("model") or _env("NBCHAT_MODEL")
    base_url = (
        base_url
        or _defaults.get("base_url")
        or _env("NBCHAT_BASE_URL", "OPENAI_BASE_URL")
        or OPENAI_BASE_URL
    )
    key: Secret | str | None = api_key or _defaults.get("api_key")
    if not key:
        found = _env_named("NBCHAT_API_KEY", "OPENAI_API_KEY")
        key = Secret(found[1], found[0]) if found else None
    if not model:
        raise ConfigError(
            "No model configured: run %chat config model=NAME (or %chat local for a free "
            "local model) in a notebook, pass model=..., or set NBCHAT_MODEL; from Python, "
            "nbchat.local() starts the local model."
        )
    if not key:
        if not is_loopback(base_url):
            raise ConfigError(
                f"No API key for {base_url}: run %chat config api_key=..., set NBCHAT_API_KEY "
                "(or OPENAI_API_KEY), or pass api_key=... (%chat local needs no key)."
            )
        key = Secret("not-needed-for-a-local-server", KEY_FROM_NONE)
    secret = key if isinstance(key, Secret) else Secret(key)
    return ClientSettings(model=model, base_url=base_url.rstrip("/"), api_key=secret)


def default_db_path() -> str:
    """The store used when no ``db=`` is given: ``NBCHAT_DB`` or ``~/.nbchat/nbchat.duckdb``."""
    configured = _defaults.get("db") or _env("NBCHAT_DB")
    if configured:
        return str(configured)
    return str(Path.home() / ".nbchat" / "nbchat.duckdb")
