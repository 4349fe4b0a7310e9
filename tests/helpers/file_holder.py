"""Another process holding a store file with a plain DuckDB connection, as another
program would, until the test lets it go (or, as a last resort, its time is up).

A hold that ends by itself after a few seconds made tests that check "still held"
fail on a loaded machine; the tests let go when they are done.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

CHILD = Path(__file__).parent / "store_child.py"


def spawn_until_ready(script: Path, args: list[str], ready: Path) -> subprocess.Popen[str]:
    """Start ``python script args...`` and wait until it creates the file ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{script.name} {args[0]} never made {ready}"
        time.sleep(0.01)
    return proc


class FileHolder:
    """A child process that holds ``db_path`` from when it is made until ``let_go()``."""

    def __init__(self, db_path: Path | str, ready: Path, most: float = 120.0) -> None:
        self.ready = ready
        self.stop = Path(f"{ready}.stop")
        args = ["hold", str(db_path), str(most), str(ready), str(self.stop)]
        self.proc = spawn_until_ready(CHILD, args, ready)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def holding(self) -> bool:
        """Whether the child still holds the file."""
        return self.proc.poll() is None

    def let_go_in(self, seconds: float) -> None:
        """Have the child let go ``seconds`` from now (a hold a test waits out)."""
        timer = threading.Timer(seconds, self.stop.touch)
        timer.daemon = True
        timer.start()

    def let_go(self, timeout: float = 30) -> None:
        """Tell the child to let go of the file, and wait until it has."""
        self.stop.touch()
        self.proc.communicate(timeout=timeout)

    def kill(self) -> None:
        """End the child now (at a test's end, whatever happened)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
