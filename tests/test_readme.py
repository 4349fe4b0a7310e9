"""The README's Python examples run as written, and its commands match CI."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from nbchat.testing import FakeOpenAIServer

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from magics_kernel import kernel_env, running_kernel

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


def ipython_blocks(section: str = "Quickstart") -> list[str]:
    """The ``ipython`` cells of one README section (other sections' are run by their tests)."""
    (text,) = re.findall(rf"^## {section}.*?(?=^## )", README, flags=re.S | re.M)
    return re.findall(r"^```ipython\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.slow
def test_readme_magic_cells_run_as_written(tmp_path: Path) -> None:
    """The Quickstart cells, typed as the README shows them, in a real kernel."""
    cells = ipython_blocks()
    assert len(cells) >= 3 and cells[0].startswith("%load_ext nbchat")
    with FakeOpenAIServer(fallback="A window function computes a value per row.") as server:
        env = kernel_env(server.url, str(tmp_path / "readme.duckdb"))
        with running_kernel(env) as kernel:
            for i, cell in enumerate(cells):
                run = kernel.execute(cell, cell_id=f"readme-{i}")
                assert run.status == "ok", (cell, run.reply)
                assert not run.of_type("error") and not run.of_type("stream"), cell
            check = kernel.execute("print(example)")
            assert check.stdout == "A window function computes a value per row.\n"
        assert len(server.requests) == len(cells) - 1  # every %%chat cell asked the model


@pytest.mark.slow
def test_readme_endpoint_cell_runs_as_written(tmp_path: Path) -> None:
    """The Endpoints cell, its trailing comment (with an apostrophe) included."""
    (cell,) = ipython_blocks("Endpoints")
    assert "# the kernel's default endpoint" in cell
    env = kernel_env("http://127.0.0.1:9/v1", str(tmp_path / "readme.duckdb"))
    env["NBCHAT_CONFIG"] = str(tmp_path / "config.json")  # the endpoint is saved there
    with running_kernel(env) as kernel:
        assert kernel.execute("%load_ext nbchat").status == "ok"
        run = kernel.execute(cell)
        assert run.status == "ok" and not run.of_type("error"), run.reply
        shown = kernel.execute("from nbchat import _config\nprint(_config.get_defaults())")
        assert "'endpoint': 'work'" in shown.stdout, shown.reply


def test_readme_commands_are_the_ci_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/run" in README and "bash .ci/demo" in README
    assert ".venv/bin/python -m pytest\n" in ci
    assert "`.venv/bin/python -m pytest`" in README


def test_readme_has_no_unfilled_placeholders() -> None:
    assert re.findall(r"\b[A-Z]+_(?:SECTION|LINK)\b", README) == []


def test_readme_and_help_name_every_config_setting() -> None:
    # A trial found `%chat help` and the README listing different keys.
    from nbchat._magic_commands import _CONFIG_NAMES, SUBCOMMANDS_HELP

    (row,) = [line for line in README.splitlines() if line.startswith("| `%chat config [k=v")]
    listed = row.split("defaults: ", 1)[1].split(";", 1)[0]
    assert listed.split(", ") == list(_CONFIG_NAMES)
    said = " ".join(SUBCOMMANDS_HELP.split())
    assert f"({', '.join(_CONFIG_NAMES)};" in said
