"""This process's store sinks, all together: what a read waits for, what exit drains, and
what a forked child starts again.

* **Reading your own writes.** A store read in this process (``settled``, which the
  backends' connections enter) first waits, bounded, for this process's sinks on the
  same store to write what they hold, so a turn ``send()`` returned is in what
  ``transcript()`` reads, even while the file was busy.
* **Exit.** An ``atexit`` hook gives every sink up to ``EXIT_WAIT_S`` in all to drain;
  what is left stays in the journal (or, without one, goes to a recovery file beside
  the store), which the next ``Store.open`` of that file writes; one line on stderr says
  so.
* **Fork.** The writer threads do not follow a process into its child: each sink there
  starts its own on demand (``StoreSink.after_fork``).

A sink joins ``live`` when it is made and leaves it when closed (``_sink.py``).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    from . import Store
    from ._sink import StoreSink

__all__ = ["EXIT_WAIT_S", "live", "mark_writer", "settle", "settled"]

EXIT_WAIT_S = 5.0  # at interpreter exit, the longest wait for all sinks to drain

live: weakref.WeakSet[StoreSink] = weakref.WeakSet()
_here = threading.local()  # .writer: this is a sink's writer; .depth: inside settled()


def mark_writer() -> None:
    """This thread is a sink's writer: its own writes never wait in ``settled()``."""
    _here.writer = True


def _after_fork_in_child() -> None:
    for sink in list(live):
        sink.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def settled(store: Store) -> Iterator[None]:
    """Around a use of ``store``: first let this process's sinks write what they hold for
    the same store (bounded by its lock timeout), so a read sees this process's turns.

    Not on a writer thread, and only at the outermost use (a nested one would wait for a
    writer that waits for the connection this thread holds).
    """
    depth = getattr(_here, "depth", 0)
    if depth == 0:
        settle(store)
    _here.depth = depth + 1
    try:
        yield
    finally:
        _here.depth = depth


def settle(store: Store) -> None:
    """Wait (bounded) for this process's sinks to write what they hold for ``store``;
    nothing on a writer thread. ``settled`` for a backend whose uses do not nest."""
    if getattr(_here, "writer", False):
        return
    for sink in list(live):
        same = sink.store is store or sink.store.path == store.path != ":memory:"
        if same and sink._handed > sink._done:
            sink.flush(store.lock_timeout)


@atexit.register
def _drain_at_exit() -> None:
    """Give every sink a last chance to write; keep what is left in a recovery file."""
    deadline = time.monotonic() + EXIT_WAIT_S
    for sink in list(live):
        left = sink.close(max(0.0, deadline - time.monotonic()))
        if not left or sink.store.path == ":memory:":
            continue
        if sink.kept_in is not None:
            print(
                f"nbchat: the store {sink.store.path} was still locked at exit; "
                f"{len(left)} events were kept in {sink.kept_in} and will be stored when "
                "it is next opened.",
                file=sys.stderr,
            )
            continue
        try:
            where = sink.store.save_recovery(left)
        except OSError as exc:
            print(
                f"nbchat: the store {sink.store.path} was still locked at exit and the "
                f"recovery file could not be written ({exc}); {len(left)} events are lost.",
                file=sys.stderr,
            )
            continue
        print(
            f"nbchat: the store {sink.store.path} was still locked at exit; {len(left)} "
            f"events were kept in {where} and will be stored when it is next opened.",
            file=sys.stderr,
        )
