"""The README's Python examples run as written, and its commands match CI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_python_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 4
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in blocks:  # one namespace, in order: later examples build on earlier ones
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Hello from a scripted model! completed" in out
    assert "It is 21 °C in Oslo." in out


def test_readme_commands_are_the_ci_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/run" in README and "bash .ci/demo" in README
    assert ".venv/bin/python -m pytest\n" in ci
    assert "`.venv/bin/python -m pytest`" in README


def test_readme_has_no_unfilled_placeholders() -> None:
    assert re.findall(r"\b[A-Z]+_(?:SECTION|LINK)\b", README) == []
