"""nbchat: chat with LLMs from Jupyter, with every turn and dollar stored in DuckDB.

``import nbchat`` is cheap: each public name is imported from its private module on
first use, so ``%load_ext nbchat`` does not pay for openai, pandas or duckdb until a
chat actually starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> private module that defines it
_EXPORTS: dict[str, str] = {
    # errors
    "ConfigError": "_exceptions",
    "GuardrailRejected": "_exceptions",
    "ModelAPIError": "_exceptions",
    "NbchatError": "_exceptions",
    "SessionPendingError": "_exceptions",
    "StoreError": "_exceptions",
    "ToolDefinitionError": "_exceptions",
    # messages, usage, events
    "CompactionEvent": "_types",
    "ErrorEvent": "_types",
    "Event": "_types",
    "LimitReached": "_types",
    "Message": "_types",
    "MessageAdded": "_types",
    "MessagesMarked": "_types",
    "Notice": "_types",
    "ReasoningDelta": "_types",
    "RequestUsage": "_types",
    "TextDelta": "_types",
    "ToolCall": "_types",
    "ToolCallDelta": "_types",
    "ToolCallRecord": "_types",
    "ToolCallStarted": "_types",
    "ToolResult": "_types",
    "TurnFinished": "_types",
    "TurnResult": "_types",
    "TurnStarted": "_types",
    "Usage": "_types",
    "UsageEvent": "_types",
    # configuration
    "configure": "_session",
    # the loop and its parts
    "Session": "_session",
    "Tool": "_tools",
    "ToolSet": "_tools",
    "as_tool": "_tools",
    "tool": "_tools",
}

if TYPE_CHECKING:
    from ._exceptions import (
        ConfigError,
        GuardrailRejected,
        ModelAPIError,
        NbchatError,
        SessionPendingError,
        StoreError,
        ToolDefinitionError,
    )
    from ._session import Session, configure
    from ._tools import Tool, ToolSet, as_tool, tool
    from ._types import (
        CompactionEvent,
        ErrorEvent,
        Event,
        LimitReached,
        Message,
        MessageAdded,
        MessagesMarked,
        Notice,
        ReasoningDelta,
        RequestUsage,
        TextDelta,
        ToolCall,
        ToolCallDelta,
        ToolCallRecord,
        ToolCallStarted,
        ToolResult,
        TurnFinished,
        TurnResult,
        TurnStarted,
        Usage,
        UsageEvent,
    )

__all__ = [
    "CompactionEvent",
    "ConfigError",
    "ErrorEvent",
    "Event",
    "GuardrailRejected",
    "LimitReached",
    "Message",
    "MessageAdded",
    "MessagesMarked",
    "ModelAPIError",
    "NbchatError",
    "Notice",
    "ReasoningDelta",
    "RequestUsage",
    "Session",
    "SessionPendingError",
    "StoreError",
    "TextDelta",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallRecord",
    "ToolCallStarted",
    "ToolDefinitionError",
    "ToolResult",
    "ToolSet",
    "TurnFinished",
    "TurnResult",
    "TurnStarted",
    "Usage",
    "UsageEvent",
    "__version__",
    "as_tool",
    "configure",
    "load_ipython_extension",
    "testing",
    "tool",
]


def __getattr__(name: str) -> Any:
    if name == "testing":
        return importlib.import_module(".testing", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nbchat' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%%chat``, ``%chat`` and ``%%chat_sql`` (``%load_ext nbchat``)."""
    from ._magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Undo ``load_ipython_extension`` (``%unload_ext nbchat``)."""
    from ._magics import unload_ipython_extension as unload

    unload(ipython)
