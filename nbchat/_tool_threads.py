"""Where a sync tool call runs: a daemon thread of its own, and the time it waits on the user.

Each sync call gets a fresh daemon thread rather than the event loop's default executor:
a stuck tool then blocks neither ``asyncio.run()``'s shutdown nor the interpreter's exit.
Python cannot stop a thread, so a cancelled run returns at once and the function keeps
running in the background, its result dropped (code the user may stop, like the python
tool, gets a ``KeyboardInterrupt`` instead). A tool's recorded duration leaves out the
time it spent waiting on the user (the python tool's approval): ``waiting_on_user`` marks
that time, ``user_waits`` counts it for one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["in_thread", "user_waits", "waiting_on_user"]

# The seconds the running call has waited on the user; the thread a sync tool runs in
# shares the counter through the copied context.
_waiting: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "nbchat_tool_waiting", default=None
)


@contextlib.contextmanager
def user_waits() -> Iterator[list[float]]:
    """For one tool call: ``[seconds]`` it spent in ``waiting_on_user`` blocks so far."""
    waited = [0.0]
    token = _waiting.set(waited)
    try:
        yield waited
    finally:
        _waiting.reset(token)


@contextlib.contextmanager
def waiting_on_user() -> Iterator[None]:
    """Inside a tool: the time spent in this block is not part of the tool's duration."""
    start = time.perf_counter()
    try:
        yield
    finally:
        counter = _waiting.get()
        if counter is not None:
            counter[0] += time.perf_counter() - start


async def in_thread(
    fn: Callable[..., Any],
    args: list[Any],
    kwargs: dict[str, Any],
    name: str,
    *,
    interrupt_on_cancel: bool = False,
) -> Any:
    """Run ``fn`` in a fresh daemon thread and await its result.

    Cancelling the await returns at once: a thread cannot be killed, so the function
    runs on and its result is dropped — or, with ``interrupt_on_cancel``, it gets a
    KeyboardInterrupt at its next bytecode (code the user may stop, like the python tool).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(exc: BaseException | None, value: Any) -> None:
        if future.done():  # the caller was cancelled and no longer waits
            return
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)

    def target() -> None:
        try:
            value = context.run(fn, *args, **kwargs)
        except BaseException as exc:
            outcome: tuple[BaseException | None, Any] = (exc, None)
        else:
            outcome = (None, value)
        # A closed loop means nobody is left waiting for the result.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *outcome)

    worker = threading.Thread(target=target, name=f"nbchat-tool-{name}", daemon=True)
    worker.start()
    try:
        return await future
    except asyncio.CancelledError:
        if interrupt_on_cancel and worker.ident is not None and worker.is_alive():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(worker.ident), ctypes.py_object(KeyboardInterrupt)
            )
        raise
