"""Named endpoints: where a model server lives and how to talk to it, saved in a file.

``~/.nbchat/config.json`` (or the file ``NBCHAT_CONFIG`` names) holds
``{"endpoints": {name: {base_url, api_key_env, headers, api_version, api}}}``. A key is
kept only as the *name* of the environment variable holding it, never its value:
the file can be shared, committed or shown on screen. ``api_version`` makes the
endpoint Azure OpenAI's; ``api`` picks the wire format (``chat`` or ``responses``).

``model="work:gpt-4o"`` is shorthand for ``endpoint="work", model="gpt-4o"`` (only
when ``work`` is a saved endpoint: ``llama3:8b`` stays a model name).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlparse

from ._exceptions import ConfigError

if TYPE_CHECKING:
    from ._magic_displays import Info

__all__ = [
    "CONFIG_ENV",
    "Endpoint",
    "add_endpoint",
    "config_path",
    "endpoint_command",
    "find_endpoint",
    "get_endpoint",
    "list_endpoints",
    "remove_endpoint",
    "split_model",
]

CONFIG_ENV = "NBCHAT_CONFIG"
WireAPI = Literal["chat", "responses"]
_APIS = ("chat", "responses")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Headers that carry credentials: a key belongs in an environment variable, not the file.
_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"}
)
_FIELDS = ("base_url", "api_key_env", "headers", "api_version", "api")


@dataclass(frozen=True)
class Endpoint:
    """A saved endpoint: base URL, the env var holding its key, extra headers, options."""

    name: str
    base_url: str
    api_key_env: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    api_version: str | None = None
    api: WireAPI | None = None

    def to_json(self) -> dict[str, Any]:
        """The endpoint as stored in the config file (unset options left out)."""
        out: dict[str, Any] = {"base_url": self.base_url}
        if self.api_key_env:
            out["api_key_env"] = self.api_key_env
        if self.headers:
            out["headers"] = dict(self.headers)
        if self.api_version:
            out["api_version"] = self.api_version
        if self.api:
            out["api"] = self.api
        return out


def config_path() -> Path:
    """The config file: ``NBCHAT_CONFIG`` or ``~/.nbchat/config.json``."""
    configured = os.environ.get(CONFIG_ENV)
    return Path(configured) if configured else Path.home() / ".nbchat" / "config.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"Cannot read the nbchat config file {path}: {exc}") from exc
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ConfigError(f"The nbchat config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"The nbchat config file {path} should hold a JSON object.")
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside it and renamed: a crash never leaves half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _endpoint(name: str, raw: Any, path: Path) -> Endpoint:
    if not isinstance(raw, dict) or not isinstance(raw.get("base_url"), str):
        raise ConfigError(f"Endpoint {name!r} in {path} needs a base_url.")
    return _checked(name, **{k: raw.get(k) for k in _FIELDS})


def _checked(
    name: str,
    base_url: Any = None,
    api_key_env: Any = None,
    headers: Any = None,
    api_version: Any = None,
    api: Any = None,
) -> Endpoint:
    """An ``Endpoint`` from user input, or ``ConfigError`` saying what is wrong."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"Endpoint name {name!r}: use letters, digits, '_', '.' or '-' (no ':').")
    url = urlparse(str(base_url or ""))
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"Endpoint {name!r} needs base_url=http(s)://host/..., got {base_url!r}.")
    if api_key_env is not None and not _ENV_NAME.fullmatch(str(api_key_env)):
        raise ConfigError(
            f"api_key_env is the NAME of an environment variable holding the key (like "
            f"WORK_KEY), not the key itself; {_shown(str(api_key_env))} is not a variable name."
        )
    headers = _headers(headers)
    if api is not None and api not in _APIS:
        raise ConfigError(f"api must be 'chat' or 'responses', got {api!r}.")
    return Endpoint(
        name=name,
        base_url=str(base_url).rstrip("/"),
        api_key_env=str(api_key_env) if api_key_env else None,
        headers=headers,
        api_version=str(api_version) if api_version else None,
        api=cast(WireAPI | None, api),
    )


def _shown(value: str) -> str:
    """A value that may be a key, as an error message may show it: its first characters."""
    return repr(value[:4] + "…") if len(value) > 6 else repr(value)


def _headers(headers: Any) -> dict[str, str]:
    if headers is None or headers == "":
        return {}
    if isinstance(headers, str):
        try:
            headers = json.loads(headers)
        except ValueError as exc:
            raise ConfigError(
                f'headers must be a JSON object, like \'{{"X-Title": "nbchat"}}\' ({exc}).'
            ) from exc
    if not isinstance(headers, dict):
        raise ConfigError("headers must be a JSON object of header names to values.")
    out: dict[str, str] = {}
    for key, value in headers.items():
        if str(key).lower() in _CREDENTIAL_HEADERS:
            raise ConfigError(
                f"Header {key!r} carries a credential: put the key in an environment "
                "variable and name it with api_key_env= instead."
            )
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"Header {key!r} needs a text value, got {value!r}.")
        out[str(key)] = str(value)
    return out


def _saved(path: Path) -> dict[str, Any]:
    endpoints = _read(path).get("endpoints", {})
    if not isinstance(endpoints, dict):
        raise ConfigError(f"'endpoints' in {path} should be a JSON object.")
    return endpoints


def list_endpoints() -> list[Endpoint]:
    """Every saved endpoint, by name."""
    path = config_path()
    return [_endpoint(n, raw, path) for n, raw in sorted(_saved(path).items())]


def get_endpoint(name: str) -> Endpoint:
    """The saved endpoint ``name``, or ``ConfigError`` naming the ones there are."""
    path = config_path()
    saved = _saved(path)
    if name not in saved:
        known = ", ".join(sorted(saved)) or "none yet"
        raise ConfigError(
            f"No endpoint named {name!r} (saved: {known}); add one with "
            f"%chat endpoint add {name} base_url=... api_key_env=..."
        )
    return _endpoint(name, saved[name], path)


def find_endpoint(name: str) -> Endpoint | None:
    """The saved endpoint ``name``, or ``None`` when there is none (or no file)."""
    path = config_path()
    if not path.exists():
        return None
    saved = _saved(path)
    return _endpoint(name, saved[name], path) if name in saved else None


def add_endpoint(
    name: str,
    base_url: str,
    *,
    api_key_env: str | None = None,
    headers: dict[str, str] | str | None = None,
    api_version: str | None = None,
    api: WireAPI | None = None,
) -> Endpoint:
    """Save (or replace) an endpoint; returns it. The key is named, never stored."""
    endpoint = _checked(name, base_url, api_key_env, headers, api_version, api)
    path = config_path()
    data = _read(path)
    endpoints = data.get("endpoints")
    data["endpoints"] = {**(endpoints if isinstance(endpoints, dict) else {})}
    data["endpoints"][name] = endpoint.to_json()
    _write(path, data)
    return endpoint


def remove_endpoint(name: str) -> bool:
    """Forget a saved endpoint; ``False`` if there was none by that name."""
    path = config_path()
    data = _read(path)
    endpoints = data.get("endpoints")
    if not isinstance(endpoints, dict) or name not in endpoints:
        return False
    data["endpoints"] = {k: v for k, v in endpoints.items() if k != name}
    _write(path, data)
    return True


def split_model(model: str) -> tuple[Endpoint | None, str]:
    """``"work:gpt-4o"`` -> (the endpoint ``work``, ``"gpt-4o"``) when ``work`` is saved;
    otherwise (``None``, ``model``) unchanged."""
    prefix, sep, rest = model.partition(":")
    if not sep or not rest or not _NAME.fullmatch(prefix):
        return None, model
    endpoint = find_endpoint(prefix)
    return (endpoint, rest) if endpoint is not None else (None, model)


# ---------------------------------------------------------------------- %chat endpoint


def _report(title: str, rows: list[tuple[str, str]] | None = None) -> Info:
    """What ``%chat endpoint ...`` shows: a sentence, and a table for ``list``."""
    from ._magic_displays import Info

    return Info(title, rows, columns=("endpoint", "details"))


_USAGE = (
    "Usage: %chat endpoint list | add NAME base_url=URL [api_key_env=VAR] "
    '[headers=\'{"X-Title": "nbchat"}\'] [api_version=V] [api=chat|responses] | remove NAME'
)


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _describe(e: Endpoint) -> str:
    key = f"key from ${e.api_key_env}" if e.api_key_env else "no key"
    if e.api_key_env and not os.environ.get(e.api_key_env):
        key += " (not set)"
    parts = [e.base_url, key]
    if e.headers:
        parts.append("headers " + ", ".join(sorted(e.headers)))
    if e.api_version:
        parts.append(f"Azure api_version {e.api_version}")
    if e.api:
        parts.append(f"api={e.api}")
    return " · ".join(parts)


def endpoint_command(args: list[str]) -> Info:
    """``%chat endpoint add NAME k=v … | remove NAME | list``, already split into words."""
    if not args or args[0] == "list":
        endpoints = list_endpoints()
        if not endpoints:
            return _report(f"No endpoints saved in {config_path()}. {_USAGE}")
        rows = [(e.name, _describe(e)) for e in endpoints]
        return _report(f"Endpoints in {config_path()} (use one as model=NAME:MODEL)", rows)
    command, rest = args[0], args[1:]
    if command == "remove" and len(rest) == 1:
        if remove_endpoint(rest[0]):
            return _report(f"Removed endpoint {rest[0]!r}.")
        return _report(f"No endpoint named {rest[0]!r}; nothing removed.")
    if command == "add" and rest:
        options: dict[str, str] = {}
        for word in rest[1:]:
            key, sep, value = word.partition("=")
            if not sep or key not in _FIELDS:
                raise ConfigError(
                    f"Cannot read {word!r}: options are {', '.join(_FIELDS)}. {_USAGE}"
                )
            options[key] = _unquoted(value)
        if "base_url" not in options:
            raise ConfigError(f"endpoint add {rest[0]} needs base_url=... {_USAGE}")
        e = add_endpoint(
            rest[0],
            options["base_url"],
            api_key_env=options.get("api_key_env") or None,
            headers=options.get("headers") or None,
            api_version=options.get("api_version") or None,
            api=cast(WireAPI | None, options.get("api") or None),
        )
        return _report(
            f"Saved endpoint {e.name!r}: {_describe(e)}. Use it with model={e.name}:MODEL."
        )
    raise ConfigError(_USAGE)
