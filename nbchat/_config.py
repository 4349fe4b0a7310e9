"""Where the model, endpoint, key and store come from.

Order, first found wins: an explicit argument, then the kernel's defaults (set by
``%chat config`` or ``nbchat.local()``), then the environment (``NBCHAT_*``, falling
back to ``OPENAI_*``). The API key is held as a ``Secret`` so it never shows up in a
repr, a log line or an error message. Plain dataclasses, not pydantic: ``%load_ext
nbchat`` imports this module and must not pay for pydantic.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from ._exceptions import ConfigError, MissingKey

if TYPE_CHECKING:
    from ._endpoints import Endpoint

__all__ = [
    "ClientSettings",
    "Secret",
    "check_limits",
    "default_db_path",
    "default_spool_dir",
    "get_defaults",
    "is_embedded",
    "is_loopback",
    "needs_key",
    "new_sessions_base_url",
    "resolve_client",
    "set_defaults",
    "whoami",
]

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Settings a kernel may change with %chat config / nbchat.configure(), in the order
# help texts list them.
CONFIG_KEYS = (
    "model",
    "base_url",
    "api_key",
    "api",
    "endpoint",
    "db",
    "system",
    "temperature",
    "max_rounds",
    "budget_usd",
    "tags",
)
DEFAULT_KEYS = frozenset(CONFIG_KEYS)
WireAPI = Literal["chat", "responses"]
# The embedded model's names (``nbchat.local()``): priced as free, and the only names
# its server answers to.
LOCAL_PREFIX = "local/"
_defaults: dict[str, Any] = {}
# The embedded server's base URL while it runs (``nbchat.local()`` sets it).
_embedded_url: str | None = None


# Where a key came from, as error messages name it (never the key itself).
KEY_FROM_ARGUMENT = "the api_key= argument"
KEY_FROM_KERNEL = "the kernel's setting (%chat config api_key=... or nbchat.configure)"
KEY_FROM_NONE = "no key: a placeholder for a server that may need none"


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


# The numeric settings' kinds, as the %%chat options check them too (``ge=0``): a whole
# number or any number, none of them below 0. Budgets in tokens count at least 1.
_AT_LEAST: dict[str, tuple[type, int]] = {
    "temperature": (float, 0),
    "max_rounds": (int, 0),
    "budget_usd": (float, 0),
    "turn_budget_usd": (float, 0),
    "max_tokens_total": (int, 1),
    "turn_max_tokens": (int, 1),
}


def check_limits(where: str, **values: Any) -> None:
    """Refuse a numeric setting of the wrong kind or below its least value, naming it.

    ``where`` is what the user called (``Session()``, ``%chat config``): a negative
    ``max_rounds`` had ended every turn at once ("Stopped after -1 rounds"), a negative
    budget read "$-5.00 cannot be checked".
    """
    for key, value in values.items():
        if value is None or key not in _AT_LEAST:
            continue
        kind, least = _AT_LEAST[key]
        number = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, number) or value != value:
            noun = "a whole number" if kind is int else "a number"
            raise ConfigError(f"{where}: {key} must be {noun}, got {value!r}.")
        if value < least:
            raise ConfigError(f"{where}: {key} must be at least {least}, got {value!r}.")


def set_defaults(**values: Any) -> dict[str, Any]:
    """Set this process's defaults for new sessions; ``None`` removes a default."""
    unknown = set(values) - DEFAULT_KEYS
    if unknown:
        raise ConfigError(
            f"Unknown setting {', '.join(sorted(unknown))}; "
            f"known settings are {', '.join(sorted(DEFAULT_KEYS))}."
        )
    check_limits("nbchat.configure", **values)
    model = values.get("model")
    if model and "base_url" not in values and foreign_to_embedded(model, _defaults.get("base_url")):
        values = {**values, "base_url": None}  # another model leaves the embedded server
    api = values.get("api")
    if api is not None and api not in ("chat", "responses"):
        raise ConfigError(f"api must be 'chat' or 'responses', got {api!r}.")
    for key, value in values.items():
        if value is None:
            _defaults.pop(key, None)
        else:
            secret = key == "api_key" and not isinstance(value, Secret)
            _defaults[key] = Secret(value, KEY_FROM_KERNEL) if secret else value
    return get_defaults()


def serve_embedded(url: str | None) -> None:
    """Record the embedded server's base URL while it runs (``None``: it stopped)."""
    global _embedded_url
    _embedded_url = url.rstrip("/") if url else None


def is_embedded(base_url: str | None) -> bool:
    """Whether ``base_url`` is the running embedded server's (``nbchat.local()``)."""
    return _embedded_url is not None and (base_url or "").rstrip("/") == _embedded_url


def foreign_to_embedded(model: str | None, base_url: str | None) -> bool:
    """Whether ``base_url`` is the embedded server's and ``model`` not one of its names.

    The server answers any name, so such a request would get the local model's reply
    under the other model's name and price. A default base URL that ``nbchat.local()``
    set is not used for such a model, and setting such a model drops it.
    """
    return is_embedded(base_url) and not (model or "").startswith(LOCAL_PREFIX)


def get_defaults() -> dict[str, Any]:
    """A copy of this process's defaults (the API key stays a ``Secret``)."""
    return dict(_defaults)


def restore_defaults(saved: dict[str, Any]) -> None:
    """Put back defaults exactly as ``get_defaults()`` returned them."""
    _defaults.clear()
    _defaults.update(saved)


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


def needs_key(base_url: str | None) -> bool:
    """Whether an endpoint cannot work without a key: OpenAI's own API. Any other server
    (a LAN box, a proxy, a local model) may take none; it answers 401 if it wants one."""
    host = urlparse(base_url or OPENAI_BASE_URL).hostname or ""
    return host == "api.openai.com"


@dataclass(frozen=True)
class ClientSettings:
    """The resolved endpoint of a session: model, base URL and key (``api_key.source``
    says where the key came from), plus what a named endpoint adds: extra ``headers``,
    Azure's ``api_version``, the wire ``api`` (``None``: chosen from the model)."""

    model: str
    base_url: str
    api_key: Secret
    headers: tuple[tuple[str, str], ...] = ()
    api_version: str | None = None
    api: WireAPI | None = None
    endpoint: str | None = None
    api_key_env: str | None = None

    @property
    def keyless(self) -> bool:
        """Whether no key was configured (the server was sent a placeholder)."""
        return self.api_key.source == KEY_FROM_NONE

    def key_hint(self) -> str:
        """Which key was sent and how to send another, for a 401 message (never the key)."""
        how = "api_key=..., %chat config api_key=... or the NBCHAT_API_KEY environment variable"
        if self.api_key_env:
            how = (
                f"api_key=... or the {self.api_key_env} environment variable "
                f"(endpoint {self.endpoint!r})"
            )
        if self.keyless:
            return f"No key was set (the server was sent a placeholder); set one with {how}."
        return f"The key sent came from {self.api_key.source}; set another with {how}."


def resolve_client(
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | Secret | None = None,
    *,
    endpoint: str | None = None,
) -> ClientSettings:
    """Resolve model, base URL and key, or raise ``ConfigError`` saying what to set.

    ``endpoint`` names a saved endpoint (``%chat endpoint add``), as does the prefix of
    ``model="work:gpt-4o"``; its base URL, key variable, headers and options apply
    unless ``base_url`` / ``api_key`` are given. An endpoint's key comes only from its
    own variable: the general ``NBCHAT_API_KEY`` is never sent to another server, nor is
    the kernel's or the environment's key sent to the embedded model's server (it needs
    none); an ``api_key`` given here is.
    """
    model = model or _defaults.get("model") or _env("NBCHAT_MODEL")
    named = _named_endpoint(model, endpoint)
    if named is not None:
        saved, model = named
        return _from_endpoint(saved, model, base_url, api_key)
    base_url = base_url or _base_url_of(model)[0]
    key: Secret | str | None = api_key
    if not key and not is_embedded(base_url):  # it needs none: a cloud key stays home
        key = _defaults.get("api_key")
        if not key:
            found = _env_named("NBCHAT_API_KEY", "OPENAI_API_KEY")
            key = Secret(found[1], found[0]) if found else None
    if not model:
        raise ConfigError(
            "No model configured: run %chat config model=NAME (or %chat local for a free "
            "local model) in a notebook, pass model=..., or set NBCHAT_MODEL; from Python, "
            "nbchat.local() starts the local model."
        )
    if not key and needs_key(base_url):
        raise MissingKey(_no_key(base_url))
    secret = key if isinstance(key, Secret) else Secret(key) if key else _PLACEHOLDER
    return ClientSettings(
        model=model, base_url=base_url.rstrip("/"), api_key=secret, api=_defaults.get("api")
    )


def require_key(settings: ClientSettings) -> None:
    """Raise ``ConfigError`` before a request to a server that needs a key, if no key was
    configured (a stored session opened only to be read, ``%chat use``, stops here)."""
    if settings.keyless and needs_key(settings.base_url):
        raise MissingKey(_no_key(settings.base_url))


def _base_url_of(model: str | None) -> tuple[str, str]:
    """Where a request for ``model`` goes when no call names a base URL or an endpoint,
    and what set it: the kernel's setting, an environment variable, or OpenAI's default."""
    default_url = _defaults.get("base_url")
    if default_url and not foreign_to_embedded(model, default_url):
        return str(default_url), "kernel"
    found = _env_named("NBCHAT_BASE_URL", "OPENAI_BASE_URL")
    return (found[1], found[0]) if found else (OPENAI_BASE_URL, "default")


def new_sessions_base_url() -> tuple[str, str]:
    """The base URL a new session's requests go to, and what set it ("kernel", an
    environment variable, ``endpoint NAME``, or "default": OpenAI's). Needs no key."""
    model = _defaults.get("model") or _env("NBCHAT_MODEL")
    try:
        named = _named_endpoint(model, None)
    except ConfigError:  # a saved endpoint that is gone: resolve_client says so
        named = None
    if named is not None:
        return named[0].base_url, f"endpoint {named[0].name}"
    return _base_url_of(model)


def _no_key(base_url: str) -> str:
    return (
        f"No API key for {base_url}: run %chat config api_key=..., set NBCHAT_API_KEY "
        "(or OPENAI_API_KEY), or use nbchat.Session(api_key=...) (%chat local needs no key)."
    )


_PLACEHOLDER = Secret("no-key-configured", KEY_FROM_NONE)


def _named_endpoint(model: str | None, endpoint: str | None) -> tuple[Endpoint, str] | None:
    """The saved endpoint a request goes to, and the model name without its prefix."""
    name = endpoint or _defaults.get("endpoint")
    if model and ":" in model:
        from ._endpoints import split_model

        found, bare = split_model(model)
        if found is not None and not endpoint:
            return found, bare
    if not name:
        return None
    from ._endpoints import get_endpoint

    return get_endpoint(str(name)), model or ""


def _from_endpoint(
    e: Endpoint, model: str, base_url: str | None, api_key: str | Secret | None
) -> ClientSettings:
    if not model:
        raise ConfigError(
            f"No model for endpoint {e.name!r}: use model={e.name}:MODEL or pass model=..."
        )
    url = (base_url or e.base_url).rstrip("/")
    key: Secret | str | None = api_key
    if not key and e.api_key_env:
        value = os.environ.get(e.api_key_env)
        key = Secret(value, e.api_key_env) if value else None
    if not key:
        if needs_key(url):
            wanted = (
                f"set the {e.api_key_env} environment variable"
                if e.api_key_env
                else (f"save the endpoint with api_key_env=VAR (%chat endpoint add {e.name} ...)")
            )
            raise MissingKey(f"No API key for endpoint {e.name!r} ({url}): {wanted}.")
        key = _PLACEHOLDER
    return ClientSettings(
        model=model,
        base_url=url,
        api_key=key if isinstance(key, Secret) else Secret(key),
        headers=tuple(sorted(e.headers.items())),
        api_version=e.api_version,
        api=e.api or _defaults.get("api"),
        endpoint=e.name,
        api_key_env=e.api_key_env,
    )


def default_db_path() -> str:
    """The store used when no ``db=`` is given: ``NBCHAT_DB`` or ``~/.nbchat/nbchat.duckdb``."""
    configured = _defaults.get("db") or _env("NBCHAT_DB")
    if configured:
        return str(configured)
    return str(Path.home() / ".nbchat" / "nbchat.duckdb")


def default_spool_dir() -> str:
    """Where writes to a team store wait while its server is away: ``NBCHAT_SPOOL_DIR``
    or ``~/.nbchat/spool``."""
    return _env("NBCHAT_SPOOL_DIR") or str(Path.home() / ".nbchat" / "spool")


def current_notebook() -> str | None:
    """The notebook this kernel runs, when the frontend says (JupyterLab and Notebook 7
    do: ``__session__`` in the user's namespace, or ``JPY_SESSION_NAME``)."""
    shell = None
    if "IPython" in sys.modules:
        from IPython import get_ipython

        shell = get_ipython()
    found = (shell.user_ns.get("__session__") if shell is not None else None) or os.environ.get(
        "JPY_SESSION_NAME"
    )
    return str(found) if found else None


def whoami() -> tuple[str | None, str]:
    """Who runs this process and where: ``JUPYTERHUB_USER`` or the OS user, and the host.

    Stored with every session and row (``costs(by="user")``); the user is ``None`` where
    the environment has no login name (some containers).
    """
    import getpass
    import socket

    try:
        user: str | None = os.environ.get("JUPYTERHUB_USER") or getpass.getuser()
    except (KeyError, OSError):
        user = None
    return user, socket.gethostname()
