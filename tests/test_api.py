"""The public surface: a curated ``__all__``, cheap import, and clean lint/type checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nbchat

ROOT = Path(__file__).resolve().parents[1]


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert nbchat.__all__ == sorted(nbchat.__all__)
    for name in nbchat.__all__:
        assert getattr(nbchat, name) is not None, name
    assert set(dir(nbchat)) == set(nbchat.__all__)


def test_public_names_are_documented() -> None:
    undocumented = [
        name
        for name in nbchat.__all__
        if not name.startswith("__") and not (getattr(nbchat, name).__doc__ or "").strip()
    ]
    assert undocumented == []


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nbchat.nope  # noqa: B018


def test_import_is_cheap() -> None:
    code = (
        "import sys, time, json; t = time.perf_counter(); import nbchat; "
        "ms = (time.perf_counter() - t) * 1000; "
        "heavy = [m for m in ('openai', 'pandas', 'duckdb', 'IPython', 'ipywidgets', 'pydantic') "
        "if m in sys.modules]; print(json.dumps({'ms': ms, 'heavy': heavy}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["heavy"] == [], "import nbchat must not import heavy modules"


def test_errors_share_one_base() -> None:
    for name in ("ConfigError", "StoreError", "ModelAPIError", "SessionPendingError"):
        assert issubclass(getattr(nbchat, name), nbchat.NbchatError)
    assert not issubclass(nbchat.NbchatError, KeyboardInterrupt)


@pytest.mark.slow
def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.fail("ruff is not installed in this environment (it is in the test extra)")
    out = subprocess.run(
        [ruff, "check", "nbchat", "tests", "bench"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_mypy_strict_is_clean() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_a_users_strict_type_check_sees_every_public_name(tmp_path: Path) -> None:
    """A notebook's code type-checked with ``mypy --strict`` may import any public name,
    and gets nbchat's own types for it (``py.typed``), not ``Any``."""
    assert (ROOT / "nbchat" / "py.typed").is_file()
    names = ", ".join(nbchat.__all__)
    user = tmp_path / "user.py"
    user.write_text(
        f"from nbchat import {names}\n"
        "session: Session = Session(model='m')\n"
        "reveal_type(session.send)\n"
        "reveal_type(plot.costs)\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", str(user)],
        cwd=tmp_path,  # not this repository's mypy settings: a user's
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "-> nbchat._types.TurnResult" in out.stdout, out.stdout
    assert "def (by:" in out.stdout, out.stdout


def test_all_lists_every_lazy_export() -> None:
    extras = {"load_ipython_extension", "unload_ipython_extension", "__version__"}
    assert set(nbchat.__all__) == set(nbchat._EXPORTS) | set(nbchat._SUBMODULES) | extras


def test_the_type_checking_imports_match_the_exports() -> None:
    """``__init__``'s static imports (for type checkers) name exactly the lazy exports."""
    import ast

    tree = ast.parse((ROOT / "nbchat" / "__init__.py").read_text())
    static: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom)
                for alias in stmt.names:
                    static[alias.asname or alias.name] = str(stmt.module)
    submodules = {name: "None" for name in nbchat._SUBMODULES}  # from . import plot, testing
    assert static == {**nbchat._EXPORTS, **submodules}
