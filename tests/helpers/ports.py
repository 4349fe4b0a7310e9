"""A TCP port for a server a test starts (PostgreSQL, LiteLLM, Jupyter) to bind itself.

Binding port 0 and letting go hands back a port from the kernel's ephemeral range,
the range every outgoing connection's local port also comes from: between our probe
and the server's own bind, a browser's, kernel's or client's connection may take it.
A port below that range is never given out that way, so only another server bound to
it on purpose could be there, and the probe below sees that.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port"]

LOWEST = 20000  # above the well-known and most registered servers' ports


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(attempts: int = 200) -> int:
    """A port on 127.0.0.1 that nothing listens on, below the ephemeral range."""
    top = _ephemeral_start() - 1
    if top <= LOWEST:  # a machine configured with a wide ephemeral range
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])
    for port in random.sample(range(LOWEST, top + 1), attempts):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port among {attempts} tried in {LOWEST}-{top}")
