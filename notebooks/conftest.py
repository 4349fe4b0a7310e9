"""``pytest --nbval-lax notebooks/``: the notebooks run against a deterministic fake model.

A fake OpenAI-compatible server (``nbchat.testing.FakeOpenAIServer`` with the replies
in ``tests/helpers/magics_fake_model.py``) is started before nbval launches any kernel,
and the kernels find it through ``NBCHAT_BASE_URL`` / ``NBCHAT_MODEL``; their store is
a fresh file. Set ``NBCHAT_NOTEBOOKS_LIVE=1`` to run them against your own settings.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from magics_fake_model import notebook_server

_state: dict[str, Any] = {}


def pytest_configure(config: Any) -> None:
    if os.environ.get("NBCHAT_NOTEBOOKS_LIVE"):
        return
    server = notebook_server()
    tmp = tempfile.mkdtemp(prefix="nbchat-notebooks-")
    _state.update(server=server, tmp=tmp, env={k: os.environ.get(k) for k in _ENV})
    for name in _ENV:
        os.environ.pop(name, None)
    os.environ.update(
        NBCHAT_BASE_URL=server.url,
        NBCHAT_MODEL="fake-model",
        NBCHAT_DB=str(Path(tmp) / "notebooks.duckdb"),
    )


def pytest_unconfigure(config: Any) -> None:
    if "server" not in _state:
        return
    _state["server"].stop()
    shutil.rmtree(_state["tmp"], ignore_errors=True)
    for name, value in _state["env"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _state.clear()


_ENV = (
    "NBCHAT_BASE_URL",
    "NBCHAT_MODEL",
    "NBCHAT_DB",
    "NBCHAT_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
)
