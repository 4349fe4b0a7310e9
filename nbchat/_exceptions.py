"""Every error nbchat raises on purpose.

    NbchatError
     ├── ConfigError           model, base URL or API key missing or invalid
     │    └── MissingKey       the endpoint needs an API key and none is set
     ├── StoreError            the store cannot be opened, migrated, written or read
     │    ├── StoreLocked      another process held it for the whole wait (retry later)
     │    ├── UnknownSession   it has no session of that id
     │    └── UnstorableRow    it refused an event's values (the writer skips the row)
     ├── ModelAPIError         the model server answered with an error (status_code, body)
     ├── SessionPendingError   a stored session has tool calls without results
     ├── SessionInUseError     a turn of the session runs in another process now
     ├── LoopStopped           nbchat's background event loop died during a turn
     ├── ToolDefinitionError   a function cannot be turned into a tool
     ├── AttachmentError       an attachment is not an image or text file nbchat can send
     ├── GuardrailRejected     a guardrail refused a text (raised by user guardrails)
     ├── SummaryError          the summary model failed (reported, never raised to you)
     ├── ExecutionFailed       the python tool's code raised (its output and traceback)
     └── TurnFailed            a %%chat cell's turn ended without an answer ("Run all" stops)

    KeyboardInterrupt
     └── TurnInterrupted       a %%chat cell was interrupted; its partial reply was kept

``TurnInterrupted`` is a ``KeyboardInterrupt`` because IPython's "Run all" stops only on
an error or an interrupt, and an interrupted cell should look like one. The two cell
errors show as one red line, not a traceback (``_render_traceback_``, IPython's hook).
Errors a *model* can recover from (a tool that raises, bad tool arguments) never
surface as exceptions: they go back to the model as a JSON error payload.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AttachmentError",
    "ConfigError",
    "ExecutionFailed",
    "GuardrailRejected",
    "LoopStopped",
    "MissingKey",
    "ModelAPIError",
    "NbchatError",
    "SessionInUseError",
    "SessionPendingError",
    "StoreError",
    "StoreLocked",
    "SummaryError",
    "ToolDefinitionError",
    "TurnFailed",
    "TurnInterrupted",
    "UnknownSession",
    "UnstorableRow",
    "one_line_traceback",
]


class NbchatError(Exception):
    """Base class of every error nbchat raises on purpose."""


class ConfigError(NbchatError):
    """Something the user must set (model, base URL, API key, option) is missing or wrong."""


class MissingKey(ConfigError):
    """The endpoint needs an API key and none is configured (the rest may be fine)."""


class StoreError(NbchatError):
    """The store could not be opened, migrated, written or read."""


class StoreLocked(StoreError):
    """Another process held the store for the whole wait: worth retrying later.

    ``holder`` names that process when the backend said which one (" (PID 1234)"), else "".
    """

    def __init__(self, message: str, holder: str = "") -> None:
        super().__init__(message)
        self.holder = holder


class UnknownSession(StoreError):
    """The store has no session of the id asked for (``Session(session_id=…)``,
    ``transcript(id)``, ``%chat use``)."""


class UnstorableRow(StoreError):
    """The store refused an event's values (out of range, wrong type, a constraint):
    retrying cannot help, so the writer skips the row and says so."""

    def __init__(self, table: str, reason: str) -> None:
        super().__init__(f"A row of {table} cannot be stored: {reason}")
        self.table = table
        self.reason = reason


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


class SessionInUseError(NbchatError):
    """A turn of this session is running in another process (or another ``Session``
    object of the same id): wait for it to finish, or start a new session."""


class LoopStopped(NbchatError):
    """The background event loop's thread died while a turn ran; the next call starts anew."""


class ToolDefinitionError(NbchatError):
    """A Python callable cannot be described to the model as a tool."""


class AttachmentError(NbchatError, ValueError):
    """An attachment cannot be sent: not an image or a text file, too large, or unreadable."""


class GuardrailRejected(NbchatError):
    """Raise this from a guardrail to reject a text; the message says why (shown to the user)."""


class SummaryError(NbchatError):
    """The summary model failed or returned nothing usable (the message says which).

    Never reaches the caller of ``send()``: the compaction is reported as failed in a
    ``CompactionEvent`` and the turn goes on with the history uncompacted.
    """


class ExecutionFailed(NbchatError):
    """The model's code raised; the message holds its output and traceback."""


_RED, _RESET = "\x1b[0;31m", "\x1b[0m"


def one_line_traceback(kind: str, message: str) -> list[str]:
    """What IPython prints for an error shown as one red line (``kind: message``)."""
    return [f"{_RED}{kind}{_RESET}: {message}"]


class TurnFailed(NbchatError):
    """A ``%%chat`` turn ended without an answer (server error, budget, guardrail).

    Raised after the cell shows what arrived, so "Run all" stops here; ``result`` is the
    turn's ``TurnResult``.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result

    def _render_traceback_(self) -> list[str]:
        return one_line_traceback("TurnFailed", str(self))


class TurnInterrupted(KeyboardInterrupt):
    """The kernel was interrupted during a ``%%chat`` turn; what arrived was kept."""

    def __init__(
        self,
        result: Any = None,
        message: str = "The turn was interrupted; the partial reply above was kept.",
    ) -> None:
        super().__init__(message)
        self.result = result

    def _render_traceback_(self) -> list[str]:
        return one_line_traceback("TurnInterrupted", str(self))
