"""The notebook as context (issue 16): values written for a model, cell references,
typed answers and the model list, in-process against the fake server over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing import globalipapp
from pydantic import BaseModel

from nbchat._context import (
    cell_error,
    code_blocks,
    context_section,
    fix_prompt,
    reply_code,
    to_context,
)
from nbchat._exceptions import TurnFailed
from nbchat._magic_options import ChatOptions, interpolate, parse_options
from nbchat._pricing import forget_price, register_price
from nbchat.testing import FakeOpenAIServer

# --------------------------------------------------------------------------- values


def test_a_dataframe_is_shape_dtypes_and_first_rows_as_a_table() -> None:
    df = pd.DataFrame({"city": ["Oslo", "Lima", "Lagos"] * 10, "pop": np.arange(30.0)})
    text = to_context(df)
    assert text.startswith("DataFrame: 30 rows × 2 columns")
    assert "dtypes: city " in text and "pop float64" in text
    assert "|  | city | pop |\n|---|---|---|\n| 0 | Oslo | 0.0 |" in text
    assert "| 9 | Oslo | 9.0 |" in text and "| 10 |" not in text
    assert text.endswith("… 20 more rows")
    small = to_context(df, max_chars=300)
    assert len(small) <= 300 and "| 0 | Oslo | 0.0 |" in small
    assert small.endswith("… 25 more rows") or small.endswith("more rows")


def test_wide_frames_long_cells_and_pipes_stay_bounded() -> None:
    wide = pd.DataFrame([[f"v|{i}" + "x" * 100 for i in range(30)]], columns=list(range(30)))
    text = to_context(wide)
    assert "(… 10 more columns, not shown)" in text
    assert "v\\|0" in text  # a pipe in a value does not break the table
    row = text.splitlines()[-1]
    assert row.count("|") - row.count("\\|") == 22  # index + 20 columns
    assert "x" * 100 not in text


def test_series_arrays_containers_and_strings() -> None:
    series = pd.Series([1.5] * 50, name="price")
    assert to_context(series).startswith("Series 'price': 50 values, dtype float64")
    assert to_context(series).endswith("… 40 more rows")
    array = to_context(np.arange(1000).reshape(10, 100))
    assert array.startswith("ndarray: shape 10 × 100, dtype int64")
    assert "..." in array and len(array) < 600
    data = to_context({"a": list(range(50)), "b": "y" * 300})
    assert data.startswith("dict of 2 items:")
    assert "…(30 more)" in data and "y" * 300 not in data
    long = to_context("z" * 20_000, max_chars=1_000)
    assert len(long) <= 1_000 and "characters cut) …" in long
    error = to_context("Traceback …\n" + "  frame\n" * 500 + "ValueError: the cause", 300)
    assert len(error) <= 300 and error.endswith("ValueError: the cause")  # the end is kept
    assert to_context("short") == "short" and to_context(3) == "3"


def test_a_pydantic_model_is_its_fields_as_json() -> None:
    class City(BaseModel):
        name: str
        population: int

    assert json.loads(to_context(City(name="Oslo", population=709_000))) == {
        "name": "Oslo",
        "population": 709_000,
    }


def test_context_section_puts_each_value_under_its_name() -> None:
    section = context_section({"df": pd.DataFrame({"a": [1]}), "notes": "hello"})
    assert section.startswith("## Context from the notebook")
    assert "### `df` (DataFrame)\n\nDataFrame: 1 rows × 1 columns" in section
    assert section.endswith("### `notes` (str)\n\nhello")


# --------------------------------------------------------------------------- errors


def _inner() -> None:
    {}["missing"]


def test_cell_error_keeps_type_message_and_the_frames_that_matter() -> None:
    try:
        _inner()
    except KeyError as exc:
        error = cell_error(exc, 4, "_inner()", lambda filename: None)
    assert (error.execution_count, error.kind, error.message) == (4, "KeyError", "'missing'")
    text = error.render()
    assert text.startswith("Traceback (most recent call last):")
    assert "in _inner" in text and '{}["missing"]' in text
    assert text.endswith("KeyError: 'missing'")


def test_a_deep_traceback_keeps_the_innermost_frames() -> None:
    def down(n: int) -> None:
        if n == 0:
            raise ValueError("bottom")
        down(n - 1)

    try:
        down(20)
    except ValueError as exc:
        text = cell_error(exc, None, "down(20)").render()
    assert "  … 16 frames\n" in text and text.count(", in down") == 5
    assert "in test_a_deep_traceback_keeps_the_innermost_frames" in text  # the outermost


def test_a_syntax_error_names_its_cell() -> None:
    try:
        compile("def f(:\n", "<cell-7>", "exec")
    except SyntaxError as exc:
        error = cell_error(exc, 7, "def f(:", lambda f: "In[7]" if f == "<cell-7>" else None)
    assert "Cell In[7], line 1" in error.render() and "SyntaxError" in error.render()


def test_fix_prompt_carries_source_error_and_instructions() -> None:
    try:
        _inner()
    except KeyError as exc:
        error = cell_error(exc, 2, "_inner()\n")
    prompt = fix_prompt(error, "Keep it short.")
    assert "cell In[2] failed" in prompt
    assert "```python\n_inner()\n```" in prompt
    assert "KeyError: 'missing'" in prompt and prompt.endswith("Keep it short.")


# --------------------------------------------------------------------------- code in replies


def test_code_blocks_and_reply_code() -> None:
    reply = "Look:\n```python\nx = 1\n```\nThen\n~~~\ny = 2\n~~~\n```sql\nSELECT 1\n```\n"
    assert code_blocks(reply) == [("python", "x = 1"), ("", "y = 2"), ("sql", "SELECT 1")]
    assert reply_code(reply) == "x = 1\n\ny = 2\n\nSELECT 1"
    # The last block marked Python; an untagged one only when none is (it may be the
    # traceback quoted back, which a trial saw %chat fix put in the new cell).
    assert reply_code(reply, last_only=True) == "x = 1"
    quoted = "Fix:\n```python\nx = 2\n```\nYou had:\n```\nTraceback (most recent call last)\n```"
    assert reply_code(quoted, last_only=True) == "x = 2"
    assert reply_code("```\nprint(1)\n```", last_only=True) == "print(1)"
    assert reply_code("print('no fence')\n") == "print('no fence')"
    assert code_blocks("```py\ncut short") == [("py", "cut short")]
    assert code_blocks("````md\n```python\ninner\n```\n````") == [("md", "```python\ninner\n```")]


# --------------------------------------------------------------------------- placeholders


def test_cell_references_without_a_shell_come_from_in_and_out() -> None:
    ns: dict[str, Any] = {"In": ["", "x = 1", "x"], "Out": {2: pd.DataFrame({"a": [1, 2]})}}
    missing: list[str] = []
    text = interpolate("{In[1]} | {Out[2]} | {Out[9]} | {{In[1]}} | {Err[1]}", ns, missing)
    assert text.startswith("x = 1 | DataFrame: 2 rows × 1 columns")
    assert text.endswith("| {Out[9]} | {In[1]} | {Err[1]}")
    assert missing == ["{Out[9]}", "{Err[1]}"]


def test_context_option_and_the_rules_between_options() -> None:
    opts = parse_options(ChatOptions, "--context df,In[3],Err --max-context-chars 500")
    assert (opts.context, opts.max_context_chars) == (["df", "In[3]", "Err"], 500)
    assert parse_options(ChatOptions, "--schema mod.City --out c").schema_ == "mod.City"
    for line, message in [
        ("--schema City --format json", "--schema gives a typed answer"),
        ("--fix --format json", "--fix answers with code"),
        ("--context 3x", "'3x' is not a variable name"),
        ("--schema mod.3x", "--schema: Value error, 'mod.3x' is not the name of a type"),
        ("--format html", "--format: Input should be"),
        ("--max-context-chars 0", "--max-context-chars: Input should be greater"),
    ]:
        with pytest.raises(UsageError, match=r"^%%chat: ") as info:
            parse_options(ChatOptions, line)
        assert message in str(info.value)


# --------------------------------------------------------------------------- in a shell


@pytest.fixture
def shell(fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    """An IPython shell with nbchat loaded, pointed at the fake server."""
    monkeypatch.setenv("NBCHAT_BASE_URL", fake.url)
    monkeypatch.setenv("NBCHAT_MODEL", "fake-model")
    globalipapp.start_ipython()
    ip = globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "nbchat")
    try:
        yield ip
    finally:
        ip.run_line_magic("unload_ext", "nbchat")


def run(ip: InteractiveShell, code: str) -> Any:
    return ip.run_cell(code, store_history=True)


class City(BaseModel):
    """A city, as the model must answer it."""

    name: str
    population: int


def test_schema_gives_the_validated_instance(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    shell.user_ns["City"] = City
    fake.enqueue(json.dumps({"name": "Oslo", "population": 709_000}))
    result = run(shell, "%%chat --schema City --out city\nLargest city in Norway?")
    assert result.success, result.error_in_exec
    assert shell.user_ns["city"] == City(name="Oslo", population=709_000)
    body = fake.requests[0]
    assert body["response_format"]["json_schema"]["name"] == "City"
    users = [m["content"] for m in body["messages"] if m["role"] == "user"]
    assert users == ["Largest city in Norway?"]


def test_schema_failure_is_one_line_and_leaves_out_alone(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    shell.user_ns.update(City=City, city="before")
    fake.enqueue("not json", repeat=2)  # the answer, and the one retry
    result = run(shell, "%%chat --schema City --out city\nLargest city?")
    assert isinstance(result.error_in_exec, TurnFailed)
    (line,) = result.error_in_exec._render_traceback_()
    assert "did not fit City after 2 tries" in line
    assert shell.user_ns["city"] == "before"
    unknown = run(shell, "%%chat --schema Nope --out x\nhi")
    assert isinstance(unknown.error_in_exec, UsageError)
    assert "--schema Nope: no such type" in str(unknown.error_in_exec)
    shell.user_ns["not_a_type"] = object()
    bad = run(shell, "%%chat --schema not_a_type --out x\nhi")
    assert "not a type pydantic can validate" in str(bad.error_in_exec)
    assert len(fake.requests) == 2  # neither refused cell sent anything


def test_context_attaches_values_under_their_names(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    shell.user_ns["sales"] = pd.DataFrame({"day": range(40), "revenue": [9.5] * 40})
    shell.user_ns["model_results"] = {"r2": 0.81, "rmse": 3.2}
    fake.enqueue("Revenue is flat.")
    assert run(shell, "%%chat --context sales,model_results\nWhat do you see?").success
    sent = fake.requests[0]["messages"][-1]["content"]
    assert sent.startswith("What do you see?\n\n## Context from the notebook")
    assert "### `sales` (DataFrame)\n\nDataFrame: 40 rows × 2 columns" in sent
    assert "… 30 more rows" in sent
    assert "### `model_results` (dict)\n\ndict of 2 items:\n{'r2': 0.81, 'rmse': 3.2}" in sent
    refused = run(shell, "%%chat --context nope\nhi")
    assert "--context nope: no such variable" in str(refused.error_in_exec)


def test_placeholders_render_frames_and_the_size_limit_applies(
    shell: InteractiveShell, fake: FakeOpenAIServer, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.user_ns["df"] = pd.DataFrame({"a": range(100)})
    fake.enqueue("ok", repeat=3)
    assert run(shell, "%%chat\nLook at {df}").success
    assert "DataFrame: 100 rows × 1 columns" in fake.requests[0]["messages"][-1]["content"]
    shell.user_ns["doc"] = "w" * 5_000
    assert run(shell, "%%chat --max-context-chars 200\n{doc}").success
    assert len(fake.requests[1]["messages"][-1]["content"]) <= 200
    shell.run_line_magic("chat", "config max_context_chars=300")
    assert run(shell, "%%chat\n{doc} {Err[99]}").success
    sent = fake.requests[2]["messages"][-1]["content"]
    assert len(sent) <= 300 + len(" {Err[99]}") and sent.endswith(" {Err[99]}")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "{Err[99]} matched no variable, cell or error" in err
    assert "max_context_chars" in repr(shell.run_line_magic("chat", "config"))


def test_format_json_parses_into_out_and_refuses_non_json(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    fake.enqueue('```json\n{"cities": ["Oslo", "Lima"]}\n```')
    assert run(shell, "%%chat --format json --out data\nTwo cities as JSON.").success
    assert shell.user_ns["data"] == {"cities": ["Oslo", "Lima"]}
    assert fake.requests[0]["messages"][-1]["content"].endswith(
        "Answer with one JSON value and nothing else."
    )
    fake.enqueue("Oslo and Lima")
    result = run(shell, "%%chat --format json --out data\nAgain.")
    (line,) = result.error_in_exec._render_traceback_()
    assert "The reply is not valid JSON" in line and "--out data holds the text" in line
    assert shell.user_ns["data"] == "Oslo and Lima"


def test_format_code_offers_the_code_as_the_next_input(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    fake.enqueue("Here:\n```python\nimport math\nprint(math.pi)\n```\nDone.")
    assert run(shell, "%%chat --format code --out code\nPrint pi.").success
    assert shell.user_ns["code"] == "import math\nprint(math.pi)"
    assert shell.rl_next_input == "import math\nprint(math.pi)"  # a terminal's next prompt


def test_chat_fix_without_a_failed_cell_is_one_line(shell: InteractiveShell) -> None:
    shell.run_line_magic("load_ext", "nbchat")  # loaded already: nothing happens
    result = run(shell, "%chat fix")
    assert isinstance(result.error_in_exec, UsageError)
    assert "no cell has failed" in str(result.error_in_exec)


def test_models_lists_context_windows_prices_and_aliases(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    fake.models = ["gpt-4o-mini", "fake-model"]
    register_price("fake-model", input_per_mtok=0.5, output_per_mtok=1.5)
    try:
        shell.run_line_magic("chat", "alias fast=gpt-4o-mini")
        frame = shell.run_line_magic("chat", "models")
    finally:
        forget_price("fake-model")
    rows = frame.set_index("model")
    assert list(rows.index) == ["fake-model", "gpt-4o-mini"]
    assert rows.loc["gpt-4o-mini", "context_window"] == 128_000
    assert rows.loc["gpt-4o-mini", "input_usd_per_mtok"] == pytest.approx(0.15)
    assert rows.loc["gpt-4o-mini", "aliases"] == "fast"
    assert rows.loc["fake-model", "output_usd_per_mtok"] == pytest.approx(1.5)
    assert pd.isna(rows.loc["fake-model", "context_window"])


def test_models_shows_the_context_window_the_server_reports(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    # A trial: on the embedded llama.cpp server %chat models said <NA>, though the
    # README says /props is read (compaction read it; the listing did not).
    fake.models = ["served-model"]
    fake.props = {"default_generation_settings": {"n_ctx": 4096}}
    frame = shell.run_line_magic("chat", "models")
    assert frame.set_index("model").loc["served-model", "context_window"] == 4096
    # vLLM's and OpenRouter's cards say it per model; one that says nothing stays <NA>.
    fake.models = ["vllm-model", "router-model", "quiet-model"]
    fake.model_info = {"vllm-model": {"max_model_len": 8192},
                       "router-model": {"context_length": 32768}}  # fmt: skip
    rows = shell.run_line_magic("chat", "models").set_index("model")["context_window"]
    assert (rows["vllm-model"], rows["router-model"]) == (8192, 32768)
    assert pd.isna(rows["quiet-model"])  # /props speaks of one model: not asked for many


def test_models_needs_no_model_configured(
    shell: InteractiveShell, fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NBCHAT_MODEL")
    frame = shell.run_line_magic("chat", "models")
    assert list(frame["model"]) == ["fake-model"] and frame["input_usd_per_mtok"].isna().all()


def test_aliases_pick_the_model_of_cells_and_config(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    assert "No model aliases" in repr(shell.run_line_magic("chat", "alias"))
    listed = shell.run_line_magic("chat", "alias fast=gpt-4o-mini smart=gpt-4o")
    assert "fast" in repr(listed) and "gpt-4o-mini" in repr(listed)
    assert "| alias | model |" in listed._repr_markdown_()
    fake.enqueue("quick", repeat=2)
    assert run(shell, "%%chat -m fast\nhi").success
    assert fake.requests[0]["model"] == "gpt-4o-mini"
    shell.run_line_magic("chat", "config model=smart")
    assert run(shell, "%%chat --new\nhi").success
    assert fake.requests[1]["model"] == "gpt-4o"
    config = repr(shell.run_line_magic("chat", "config"))
    assert "alias fast" in config and "alias smart" in config
    shell.run_line_magic("chat", "alias fast=none")
    assert "alias fast" not in repr(shell.run_line_magic("chat", "config"))
    with pytest.raises(UsageError, match="write name=model"):
        shell.run_line_magic("chat", "alias fast")
    shell.run_line_magic("chat", "config model=none")


def test_context_section_in_a_real_reference() -> None:
    """``--context`` reads the same names placeholders do, cell references included."""
    opts = parse_options(ChatOptions, "--context Out[2],df.shape")
    assert opts.context == ["Out[2]", "df.shape"]
    assert parse_options(ChatOptions, "--fix").fix and parse_options(ChatOptions, "").fix is False


def test_help_names_the_new_subcommands_and_references(shell: InteractiveShell) -> None:
    doc = shell.find_cell_magic("chat").__doc__
    for words in ("%chat fix", "%chat models", "%chat alias", "{In[3]}", "{Err}", "--schema"):
        assert words in doc
    with pytest.raises(UsageError, match="max_context_chars must be a positive int"):
        shell.run_line_magic("chat", "config max_context_chars=lots")
    with pytest.raises(UsageError, match="takes no arguments"):
        shell.run_line_magic("chat", "models gpt")
