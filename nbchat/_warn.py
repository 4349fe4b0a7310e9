"""Warnings that point at the user's line, not at nbchat's internals.

Python 3.11 has no ``skip_file_prefixes``, and a fixed ``stacklevel`` is right for one
call path only (``Session(...)`` from a notebook, from ``%chat use``, from ``Store.open``
inside ``Session``...). ``warn_user`` walks the stack out of the nbchat package instead, and
past IPython's magic machinery, so a warning from a magic points at the cell's line.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import warnings

__all__ = ["warn_user"]

_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_IPYTHON = f"{os.sep}IPython{os.sep}"


# The standard library's own folder (not the packages installed beside it): its frames
# stand between nbchat's (``contextlib``'s ``next(self.gen)`` in a ``with``).
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_SITE = f"{os.sep}site-packages{os.sep}"


def _inside(filename: str) -> bool:
    """A frame of nbchat's own, of IPython running a magic (``<decorator-gen-…>``), or of
    the standard library between two of nbchat's."""
    return (
        filename.startswith(_HERE)
        or _IPYTHON in filename
        or filename.startswith("<decorator")
        or (filename.startswith(_STDLIB) and _SITE not in filename)
    )


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside nbchat (and a magic's IPython frames)."""
    level = 2  # the caller of ``warn_user``
    frame = sys._getframe(1)
    while frame.f_back is not None and _inside(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
