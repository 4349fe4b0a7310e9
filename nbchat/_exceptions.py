"""Every error nbchat raises on purpose.

    NbchatError
     ├── ConfigError           model, base URL or API key missing or invalid
     ├── StoreError            the DuckDB store cannot be opened, migrated, written or read
     ├── ModelAPIError         the model server answered with an error (status_code, body)
     ├── SessionPendingError   a stored session has tool calls without results
     ├── LoopStopped           nbchat's background event loop died during a turn
     ├── ToolDefinitionError   a function cannot be turned into a tool
     └── GuardrailRejected     a guardrail refused a text (raised by user guardrails)

Errors a *model* can recover from (a tool that raises, bad tool arguments) never
surface as exceptions: they go back to the model as a JSON error payload.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "GuardrailRejected",
    "LoopStopped",
    "ModelAPIError",
    "NbchatError",
    "SessionPendingError",
    "StoreError",
    "ToolDefinitionError",
]


class NbchatError(Exception):
    """Base class of every error nbchat raises on purpose."""


class ConfigError(NbchatError):
    """Something the user must set (model, base URL, API key, option) is missing or wrong."""


class StoreError(NbchatError):
    """The DuckDB store could not be opened, migrated, written or read."""


class ModelAPIError(NbchatError):
    """The model server answered with an error, or the connection to it failed.

    ``status_code`` is ``None`` when no HTTP answer arrived (connection refused,
    timeout, stream cut mid-way). ``body`` is the server's error body when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        body: Any = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body
        self.code = code


class SessionPendingError(NbchatError):
    """A stored session ends with tool calls that never got results.

    Call ``Session.resume()`` to run the missing tools and continue, or
    ``Session.abort_pending()`` to close them with synthetic "aborted" results.
    """


class LoopStopped(NbchatError):
    """The background event loop's thread died while a turn ran; the next call starts anew."""


class ToolDefinitionError(NbchatError):
    """A Python callable cannot be described to the model as a tool."""


class GuardrailRejected(NbchatError):
    """Raise this from a guardrail to reject a text; the message says why (shown to the user)."""
