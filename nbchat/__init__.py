"""nbchat: chat with LLMs from Jupyter, with every turn and dollar stored in DuckDB.

``import nbchat`` is cheap: each public name is imported from its private module on
first use, so ``%load_ext nbchat`` does not pay for openai, pandas or duckdb until a
chat actually starts.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public submodules, imported on first use too
_SUBMODULES = ("plot", "testing")

# public name -> private module that defines it
_EXPORTS: dict[str, str] = {
    # errors
    "AttachmentError": "_exceptions",
    "ConfigError": "_exceptions",
    "GuardrailRejected": "_exceptions",
    "LoopStopped": "_exceptions",
    "ModelAPIError": "_exceptions",
    "NbchatError": "_exceptions",
    "SessionInUseError": "_exceptions",
    "SessionPendingError": "_exceptions",
    "StoreError": "_exceptions",
    "ToolDefinitionError": "_exceptions",
    "TurnFailed": "_exceptions",
    "TurnInterrupted": "_exceptions",
    # messages, usage, events
    "CompactionEvent": "_events",
    "ErrorEvent": "_events",
    "Event": "_events",
    "ImagePart": "_types",
    "LimitReached": "_events",
    "Message": "_types",
    "MessageAdded": "_events",
    "MessagesMarked": "_events",
    "Notice": "_events",
    "ReasoningDelta": "_events",
    "RequestUsage": "_types",
    "TextDelta": "_events",
    "ToolCall": "_types",
    "ToolCallDelta": "_events",
    "ToolCallRecord": "_types",
    "ToolCallStarted": "_events",
    "ToolResult": "_events",
    "TurnFinished": "_events",
    "TurnResult": "_types",
    "TurnStarted": "_events",
    "Usage": "_types",
    "UsageEvent": "_events",
    # configuration
    "configure": "_session",
    # the loop and its parts
    "Session": "_session",
    "TurnOptions": "_turn",
    "Tool": "_tools",
    "ToolSet": "_tools",
    "as_tool": "_tools",
    "tool": "_tools",
    "Image": "_images",
    # front ends, analysis, the store
    "attachments": "_analysis",
    "compactions": "_analysis",
    "costs": "_analysis",
    "reprice": "_analysis",
    "search": "_analysis",
    "sessions": "_analysis",
    "sql": "_analysis",
    "tool_calls": "_analysis",
    "transcript": "_analysis",
    "turns": "_analysis",
    "usage": "_analysis",
    "CompactionStrategy": "_compaction",
    "SummaryStrategy": "_compaction",
    "WindowStrategy": "_compaction",
    "export_session": "_export",
    "extract": "_extract",
    "import_session": "_export",
    "local": "_local",
    "stop_local": "_local",
    "ChatPanel": "_panel",
    "panel": "_panel",
    "dashboard": "_dashboard",
    "mark_free": "_pricing",
    "register_price": "_pricing",
    "python_tool": "_pytool",
    "Store": "_store",
    "copy_store": "_store._copy",
}

if TYPE_CHECKING:
    from . import plot as plot, testing as testing
    from ._analysis import (
        attachments as attachments,
        compactions as compactions,
        costs as costs,
        reprice as reprice,
        search as search,
        sessions as sessions,
        sql as sql,
        tool_calls as tool_calls,
        transcript as transcript,
        turns as turns,
        usage as usage,
    )
    from ._compaction import (
        CompactionStrategy as CompactionStrategy,
        SummaryStrategy as SummaryStrategy,
        WindowStrategy as WindowStrategy,
    )
    from ._dashboard import dashboard as dashboard
    from ._events import (
        CompactionEvent as CompactionEvent,
        ErrorEvent as ErrorEvent,
        Event as Event,
        LimitReached as LimitReached,
        MessageAdded as MessageAdded,
        MessagesMarked as MessagesMarked,
        Notice as Notice,
        ReasoningDelta as ReasoningDelta,
        TextDelta as TextDelta,
        ToolCallDelta as ToolCallDelta,
        ToolCallStarted as ToolCallStarted,
        ToolResult as ToolResult,
        TurnFinished as TurnFinished,
        TurnStarted as TurnStarted,
        UsageEvent as UsageEvent,
    )
    from ._exceptions import (
        AttachmentError as AttachmentError,
        ConfigError as ConfigError,
        GuardrailRejected as GuardrailRejected,
        LoopStopped as LoopStopped,
        ModelAPIError as ModelAPIError,
        NbchatError as NbchatError,
        SessionInUseError as SessionInUseError,
        SessionPendingError as SessionPendingError,
        StoreError as StoreError,
        ToolDefinitionError as ToolDefinitionError,
        TurnFailed as TurnFailed,
        TurnInterrupted as TurnInterrupted,
    )
    from ._export import export_session as export_session, import_session as import_session
    from ._extract import extract as extract
    from ._images import Image as Image
    from ._local import local as local, stop_local as stop_local
    from ._panel import ChatPanel as ChatPanel, panel as panel
    from ._pricing import mark_free as mark_free, register_price as register_price
    from ._pytool import python_tool as python_tool
    from ._session import Session as Session, configure as configure
    from ._store import Store as Store
    from ._store._copy import copy_store as copy_store
    from ._tools import Tool as Tool, ToolSet as ToolSet, as_tool as as_tool, tool as tool
    from ._turn import TurnOptions as TurnOptions
    from ._types import (
        ImagePart as ImagePart,
        Message as Message,
        RequestUsage as RequestUsage,
        ToolCall as ToolCall,
        ToolCallRecord as ToolCallRecord,
        TurnResult as TurnResult,
        Usage as Usage,
    )

# The one list of public names. The TYPE_CHECKING imports above are for type checkers
# and editors: ``X as X`` is the explicit re-export that a user's ``mypy --strict``
# needs, since this __all__ is computed. test_api checks both name the same things.
__all__ = sorted(
    [
        *_EXPORTS,
        "__version__",
        "load_ipython_extension",
        "plot",
        "testing",
        "unload_ipython_extension",
    ]
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
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


def _register_magics_in_ipython() -> None:
    """``import nbchat`` inside IPython registers the magics, like ``%load_ext nbchat``.

    Only when IPython is already imported, so plain scripts never import it.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None:
        load_ipython_extension(shell)


_register_magics_in_ipython()
