"""The one cache of a process's connections to its stores: a lease per store.

Every ``Store`` handle on one store (a session, its writer thread, the analysis
functions) shares the process's ``Lease`` for it: ``shared_lease`` finds or makes it
and counts one reference more, ``release_lease`` drops one, and the last lets go of the
store (after its linger, if asked). The few most recently used idle leases stay
cached, so the next ``Store.open`` of the same store is quick; at exit every lease is
shut down, and a forked child forgets its parent's connections.
"""

from __future__ import annotations

import atexit
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

__all__ = ["Lease", "cached_lease", "evict_lease", "release_lease", "shared_lease"]


class Lease(ABC):
    """A process's access to one store, shared by all ``Store`` handles on it.

    ``key`` is what the cache finds it by (a resolved path, a URL); ``refs`` counts
    the handles using it. A private lease (``":memory:"``) is not cached.
    """

    key: str
    refs: int = 0
    shared: bool = True
    # Files other processes left were looked for (at the first open, or the first after
    # the store was closed without linger; the analysis functions' linger keeps it).
    leftovers_checked = False

    @abstractmethod
    def connection(self, timeout: float, access: Any = "write") -> AbstractContextManager[Any]:
        """The open connection, for one operation; waits up to ``timeout`` s for the store."""

    @abstractmethod
    def release(self) -> None:
        """Let go of the store now; keep what makes reconnecting quick."""

    @abstractmethod
    def shutdown(self) -> None:
        """Close everything now."""

    @abstractmethod
    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections without touching them."""

    def stats(self) -> dict[str, Any]:
        """Counters for benchmarks and tests."""
        return {}


_IDLE_LEASES = 4  # unused leases kept for quick reuse (analysis calls open and close)
_leases: OrderedDict[str, Lease] = OrderedDict()
_leases_lock = threading.Lock()


def shared_lease(key: str, make: Callable[[], Lease]) -> Lease:
    """The process's lease for ``key`` (made by ``make`` the first time), one reference more."""
    with _leases_lock:
        lease = _leases.pop(key, None) or make()
        _leases[key] = lease  # most recently used last
        lease.refs += 1
        return lease


def cached_lease(key: str) -> Lease | None:
    """The cached lease for ``key``, if any (for tests and benchmarks)."""
    with _leases_lock:
        return _leases.get(key)


def evict_lease(key: str) -> None:
    """Shut down and forget the cached lease for ``key`` if no handle uses it (tests and
    benchmarks, before they drop a database)."""
    with _leases_lock:
        lease = _leases.get(key)
        if lease is None or lease.refs > 0:
            return
        del _leases[key]
    lease.shutdown()


def release_lease(lease: Lease, *, linger: bool = False) -> None:
    """Drop one reference; the last one lets go of the store (after its linger, if asked).

    A shared lease stays cached for the next ``Store.open`` of the same store; only
    the few most recently used idle ones are kept.
    """
    evicted: list[Lease] = []
    with _leases_lock:
        lease.refs -= 1
        last = lease.refs <= 0
        if last and lease.shared:
            idle = [item for item in _leases.values() if item.refs <= 0]
            for item in idle[: max(0, len(idle) - _IDLE_LEASES)]:
                del _leases[item.key]
                evicted.append(item)
    if not last:
        return
    if not lease.shared or lease in evicted:
        lease.shutdown()
    elif not linger:
        lease.release()
        lease.leftovers_checked = False  # closed for good: the next open looks again
    for item in evicted:
        if item is not lease:
            item.shutdown()


@atexit.register
def _close_all() -> None:
    # Closing lets each backend finish cleanly (DuckDB checkpoints, so the next open is fast).
    with _leases_lock:
        leases = list(_leases.values())
    for lease in leases:
        lease.shutdown()


def _after_fork_in_child() -> None:
    global _leases_lock
    _leases_lock = threading.Lock()
    for lease in _leases.values():
        lease.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
