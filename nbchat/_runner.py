"""One background event loop for sync callers.

``Session.send()`` must work in a plain script and inside a Jupyter kernel, where an
event loop is already running on the main thread (``asyncio.run`` fails there, and
blocking that loop would freeze widget messages). So sync calls run their turn on a
dedicated daemon thread's loop and wait for its events on the calling thread, which
also keeps Ctrl-C / kernel interrupts landing where they can be handled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["background_loop", "current_background_loop", "run_sync", "submit"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The shared background loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=run, name="nbchat-loop", daemon=True).start()
            started.wait()
            _loop = loop
        return _loop


def current_background_loop() -> asyncio.AbstractEventLoop | None:
    """The background loop if it has been started, else ``None`` (never starts it)."""
    return _loop


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the background loop."""
    return asyncio.run_coroutine_threadsafe(coro, background_loop())


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and wait for its result."""
    return submit(coro).result()
