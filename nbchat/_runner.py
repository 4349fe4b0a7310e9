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
import contextlib
import queue
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import FrameType
from typing import Any, Generic, TypeVar

from ._exceptions import LoopStopped

__all__ = [
    "TurnRunner",
    "background_loop",
    "current_background_loop",
    "loop_alive",
    "run_sync",
    "submit",
]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The shared background loop, started on first use (and again if its thread died)."""
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed() or not loop_alive():
            if _loop is not None and not _loop.is_closed() and not _loop.is_running():
                _wind_down(_loop)  # its thread died
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                while True:
                    try:
                        loop.run_forever()
                    except (KeyboardInterrupt, SystemExit):
                        # asyncio lets these escape a task and out of run_forever; the
                        # task that raised is done, the others go on as the loop restarts.
                        continue
                    break  # stopped on purpose

            thread = threading.Thread(target=run, name="nbchat-loop", daemon=True)
            thread.start()
            started.wait()
            _loop, _thread = loop, thread
        return _loop


# How long a replaced loop's cancelled turns get to store themselves as interrupted.
_WIND_DOWN_S = 2.0


def _wind_down(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel a dead loop's tasks, let them finish on a helper thread, close the loop.

    A turn left pending there would never end: its session would keep it as running and
    the interpreter would say "Task was destroyed but it is pending!" at exit. Cancelled,
    it is stored as interrupted, as after a stop. This waits (a little) so that it is
    done before the next turn of the same session starts on the new loop.
    """
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()

    def finish() -> None:
        with contextlib.suppress(Exception):
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=_WIND_DOWN_S))
            loop.run_until_complete(loop.shutdown_asyncgens())

    helper = threading.Thread(target=finish, name="nbchat-loop-wind-down", daemon=True)
    helper.start()
    helper.join(_WIND_DOWN_S + 1)
    if not helper.is_alive():
        loop.close()  # free its self-pipe and selector


def loop_alive() -> bool:
    """Whether the background loop's thread is still running it.

    ``SystemExit`` or ``KeyboardInterrupt`` escaping one of its tasks only restarts the
    loop in its thread; the thread ends if someone stops or closes the loop itself.
    """
    return _thread is not None and _thread.is_alive()


def current_background_loop() -> asyncio.AbstractEventLoop | None:
    """The background loop if it has been started, else ``None`` (never starts it)."""
    return _loop


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the background loop."""
    return asyncio.run_coroutine_threadsafe(coro, background_loop())


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and wait for its result."""
    return submit(coro).result()


_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Channel:
    """Items from a turn's task to its consumer on the same loop, taken in batches: an
    ``asyncio.Queue`` without the bookkeeping it does per item (this runs per chunk)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Any) -> bool:
        """Queue ``item``; True when the consumer is behind and the producer should let
        it run (a reply already in the socket would otherwise be parsed whole first)."""
        items = self._items
        items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return len(items) > _BACKLOG

    async def take(self) -> list[Any]:
        """Every item queued so far (at least one), waiting for the first if need be."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


# Items a consumer on the turn's own loop may fall behind by before the turn waits for it.
_BACKLOG = 64


class TurnRunner(Generic[T]):
    """Runs one turn at a time for its owner, for sync or async callers, and stops it.

    A turn is an async iterator of items (events). ``run_sync`` drives it on the
    background loop and hands items to a callback on the calling thread; ``stream``
    drives it as a task on the caller's loop. Either way ``cancel()`` (from any thread,
    or a signal handler) cancels that task at once, and the turn's own code decides
    what to keep. A lock makes a second turn wait for the first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._task_loop: asyncio.AbstractEventLoop | None = None
        self._inflight = 0  # turns started and not yet finished (running or waiting)
        self._generation = 0  # bumped by _abandon: older turns must not touch the state
        self.cancel_requested = False

    def cancel(self) -> None:
        """Stop the running turn at once; a no-op when none is running."""
        if not self._inflight:
            return
        # The flag also covers a turn whose task does not exist yet (see _pump).
        self.cancel_requested = True
        task, loop = self._task, self._task_loop
        if task is not None and loop is not None:
            loop.call_soon_threadsafe(task.cancel)

    def run_sync(self, turn: AsyncIterator[T], on_item: Callable[[T], None]) -> None:
        """Drive ``turn`` on the background loop; call ``on_item`` here for each item.

        On the main thread, Ctrl-C / a kernel interrupt cancels the turn instead of
        unwinding this call, so every item still reaches ``on_item``. If ``on_item``
        raises, the turn is cancelled and drained before the error propagates.
        """
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inflight += 1
        future = submit(self._pump(turn, items.put))
        with self._interrupts_cancel():
            self._drain(items, on_item)
        future.result()

    def _abandon(self) -> None:
        """Forget a turn whose loop died under it: it will never finish or release the lock."""
        self._lock = threading.Lock()
        self._task = self._task_loop = None
        self._inflight = 0
        self._generation += 1
        self.cancel_requested = False

    async def stream(self, turn: AsyncIterator[T]) -> AsyncIterator[T]:
        """Drive ``turn`` as a task on the running loop, yielding its items."""
        items = _Channel()
        self._inflight += 1
        task = asyncio.ensure_future(self._pump(turn, items.put))
        try:
            while True:
                for item in await items.take():
                    if item is _DONE:
                        return
                    if isinstance(item, _Failure):
                        raise item.exc
                    yield item
        finally:
            if not task.done():
                self.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.contextmanager
    def _interrupts_cancel(self) -> Iterator[None]:
        """While a turn runs on the main thread, the first SIGINT cancels it.

        Raising KeyboardInterrupt between taking an item off the queue and handing it
        on would lose that item from the caller's display; cancelling loses nothing. A
        second interrupt goes to the previous handler (KeyboardInterrupt, as usual), in
        case the turn is stuck.
        """
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or not callable(previous):
            yield
            return
        presses = 0

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                self.cancel()
            else:
                previous(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _drain(self, items: queue.SimpleQueue[Any], on_item: Callable[[T], None]) -> None:
        failed: BaseException | None = None
        while True:
            try:
                try:
                    item = items.get(timeout=0.1)
                except queue.Empty:
                    if not loop_alive():
                        self._abandon()
                        raise LoopStopped(
                            "nbchat's background event loop stopped while this turn ran "
                            "(something raised SystemExit or KeyboardInterrupt inside it). "
                            "What was stored is kept; the next call starts a new loop."
                        ) from None
                    continue
                if item is _DONE:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                if failed is None:
                    on_item(item)
            except KeyboardInterrupt:
                # A second interrupt, or one with no handler of ours: stop the turn and
                # keep draining so what it produced is still delivered.
                self.cancel()
            except LoopStopped:
                raise
            except Exception as exc:
                if isinstance(item, _Failure) or failed is not None:
                    raise
                failed = exc  # the consumer broke: stop the turn, then re-raise
                self.cancel()
        if failed is not None:
            raise failed

    async def _pump(self, turn: AsyncIterator[T], put: Callable[[Any], bool | None]) -> None:
        """Drive ``turn`` under the lock, handing items to ``put``, then ``_DONE``.

        When ``put`` says the consumer (on this same loop) is behind, yield to it. A turn
        that was abandoned (its loop died, see ``_wind_down``) and is ended later releases
        its own lock and leaves the runner's state to the turns after it.
        """
        lock, generation = self._lock, self._generation
        try:
            await self._acquire(lock)
            try:
                self._task = asyncio.current_task()
                self._task_loop = asyncio.get_running_loop()
                if self.cancel_requested and self._task is not None:
                    self._task.cancel()  # cancel() came before this task existed
                async for item in turn:
                    if put(item):
                        await asyncio.sleep(0)
            finally:
                if generation == self._generation:
                    self._task = self._task_loop = None
                    self.cancel_requested = False
                lock.release()
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(_Failure(exc))
        finally:
            if generation == self._generation:
                self._inflight -= 1
            put(_DONE)

    @staticmethod
    async def _acquire(lock: threading.Lock) -> None:
        if lock.acquire(blocking=False):
            return
        # Another turn is running: wait without blocking the loop.
        acquired = asyncio.get_running_loop().run_in_executor(None, lock.acquire)
        try:
            await asyncio.shield(acquired)
        except asyncio.CancelledError:
            acquired.add_done_callback(lambda _: lock.release())
            raise
