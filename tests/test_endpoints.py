"""Named endpoints: the config file, ``%chat endpoint``, and what reaches the server."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from nbchat import ConfigError, ModelAPIError, Session
from nbchat._assembler import ReplyAssembler
from nbchat._client import ModelClient
from nbchat._config import KEY_FROM_NONE, resolve_client, set_defaults
from nbchat._endpoints import (
    add_endpoint,
    config_path,
    endpoint_command,
    get_endpoint,
    list_endpoints,
    remove_endpoint,
)
from nbchat.testing import FakeOpenAIServer


@pytest.fixture(autouse=True)
def config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test here has its own config file."""
    path = tmp_path / "nbchat-config.json"
    monkeypatch.setenv("NBCHAT_CONFIG", str(path))
    for name in ("WORK_KEY", "AZ_KEY"):
        monkeypatch.delenv(name, raising=False)
    return path


def run(client: ModelClient, assembler: ReplyAssembler | None = None) -> ReplyAssembler:
    assembler = assembler or ReplyAssembler()

    async def go() -> None:
        async for _ in client.astream([{"role": "user", "content": "hi"}], assembler):
            pass

    asyncio.run(go())
    return assembler


def test_endpoint_command_adds_lists_and_removes(config: Path) -> None:
    report = endpoint_command(
        [
            "add",
            "work",
            "base_url=http://10.0.0.5:8000/v1/",
            "api_key_env=WORK_KEY",
            'headers=\'{"X-Title": "nbchat"}\'',
            "api=responses",
        ]
    )
    assert "Saved endpoint 'work'" in repr(report) and "model=work:MODEL" in repr(report)
    assert config_path() == config
    assert json.loads(config.read_text()) == {
        "endpoints": {
            "work": {
                "base_url": "http://10.0.0.5:8000/v1",
                "api_key_env": "WORK_KEY",
                "headers": {"X-Title": "nbchat"},
                "api": "responses",
            }
        }
    }
    listed = endpoint_command(["list"])
    assert [k for k, _ in listed.rows] == ["work"]
    assert "key from $WORK_KEY (not set)" in listed.rows[0][1]
    assert "| work |" in listed._repr_markdown_()
    assert "Removed" in repr(endpoint_command(["remove", "work"]))
    assert list_endpoints() == [] and "nothing removed" in repr(
        endpoint_command(["remove", "work"])
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "w", "base_url=http://h/v1", "api_key_env=sk-live-abcdefghijkl"], "NAME of an"),
        (
            ["add", "w", "base_url=http://h/v1", 'headers={"Authorization": "Bearer x"}'],
            "credential",
        ),
        (["add", "w", "base_url=ftp://h"], "base_url=http"),
        (["add", "w:x", "base_url=http://h"], "no ':'"),
        (["add", "w", "base_url=http://h", "api=soap"], "chat' or 'responses"),
        (["add", "w", "bogus=1"], "options are"),
        (["frobnicate"], "Usage"),
    ],
)
def test_bad_input_is_refused_and_no_key_is_written(
    config: Path, args: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        endpoint_command(args)
    assert "abcdefghijkl" not in str(info.value)
    assert not config.exists()


def test_unknown_endpoint_names_the_saved_ones() -> None:
    add_endpoint("home", "http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match=r"saved: home"):
        get_endpoint("work")
    assert remove_endpoint("nope") is False


def test_model_shorthand_and_endpoint_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    add_endpoint("work", "https://llm.example.com/v1", api_key_env="WORK_KEY")
    monkeypatch.setenv("WORK_KEY", "sk-work-123")
    monkeypatch.setenv("NBCHAT_API_KEY", "sk-general-should-not-leak")
    s = resolve_client("work:gpt-4o")
    assert (s.model, s.base_url, s.endpoint) == ("gpt-4o", "https://llm.example.com/v1", "work")
    assert s.api_key.get_secret_value() == "sk-work-123" and s.api_key.source == "WORK_KEY"
    assert resolve_client("gpt-4o", endpoint="work") == s
    # A model name with a colon that names no endpoint is just a model name.
    assert resolve_client("llama3:8b", "http://127.0.0.1:1/v1").model == "llama3:8b"
    monkeypatch.delenv("WORK_KEY")
    keyless = resolve_client("work:gpt-4o")
    assert keyless.keyless, "the general NBCHAT_API_KEY is never sent to a named endpoint"
    set_defaults(endpoint="work")
    assert resolve_client("m").endpoint == "work"


def test_new_sessions_base_url_names_the_endpoint_that_sets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What ``%chat config`` shows as base_url: the one resolve_client would use."""
    from nbchat._config import new_sessions_base_url

    add_endpoint("work", "https://llm.example.com/v1", api_key_env="WORK_KEY")
    monkeypatch.setenv("NBCHAT_MODEL", "work:gpt-4o")
    assert new_sessions_base_url() == ("https://llm.example.com/v1", "endpoint work")
    monkeypatch.setenv("NBCHAT_MODEL", "gpt-4o")
    set_defaults(endpoint="work")
    assert new_sessions_base_url() == ("https://llm.example.com/v1", "endpoint work")
    set_defaults(endpoint="gone")  # resolve_client names the saved ones; this needs no raise
    assert new_sessions_base_url()[1] != "endpoint gone"


def test_a_named_openai_endpoint_needs_its_key() -> None:
    add_endpoint("oai", "https://api.openai.com/v1", api_key_env="WORK_KEY")
    with pytest.raises(ConfigError, match="WORK_KEY"):
        resolve_client("oai:gpt-4o")


def test_a_keyless_server_on_the_lan_is_allowed() -> None:
    s = resolve_client("m", "http://192.168.1.20:8000/v1")
    assert s.api_key.source == KEY_FROM_NONE and s.keyless
    with pytest.raises(ConfigError, match="No API key"):
        resolve_client("gpt-4o", "https://api.openai.com/v1")


def test_a_session_opened_without_the_key_its_server_needs_sends_nothing(
    tmp_path: Path,
) -> None:
    """%chat use reads a stored session without a key; its turn stops before a request."""
    from nbchat._config import Secret

    no_key = Secret("no-key-configured", KEY_FROM_NONE)
    s = Session(model="gpt-4o", api_key=no_key, db=tmp_path / "k.duckdb")
    assert s.client.settings.base_url == "https://api.openai.com/v1"
    with pytest.raises(ConfigError, match=r"No API key for https://api\.openai\.com/v1"):
        s.send("hello")
    assert s.history == [] and s.store is not None
    assert s.store.query("SELECT count(*) AS n FROM turns").data["n"][0] == 0


def test_endpoint_headers_reach_the_request(fake: FakeOpenAIServer) -> None:
    add_endpoint("work", fake.url, headers={"X-Title": "nbchat", "HTTP-Referer": "https://x"})
    fake.enqueue("hello")
    fake.enqueue("hello again")
    r = Session(model="work:m", db=False, max_retries=0).send("hi")
    assert r.text == "hello"
    headers = fake.request_headers[0]
    assert headers["x-title"] == "nbchat" and headers["http-referer"] == "https://x"
    assert fake.requests[0]["model"] == "m"
    run(ModelClient(resolve_client("work:m"), max_retries=0, api="responses"))
    assert fake.request_headers[1]["x-title"] == "nbchat"


def test_azure_api_version_goes_through_the_azure_client(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = fake.url.removesuffix("/v1")
    add_endpoint("az", root, api_key_env="AZ_KEY", api_version="2024-10-21")
    monkeypatch.setenv("AZ_KEY", "az-secret-key")
    fake.enqueue("from azure")
    fake.enqueue("responses on azure")
    assembler = run(ModelClient(resolve_client("az:my-deployment"), max_retries=0))
    assert assembler.text == "from azure"
    assembler = run(ModelClient(resolve_client("az:my-deployment"), max_retries=0, api="responses"))
    assert assembler.text == "responses on azure"
    assert fake.request_paths == [
        "/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21",
        "/openai/responses?api-version=2024-10-21",
    ]
    assert "api-key" not in fake.request_headers[0], "the key header is never recorded"


def test_keyless_server_answering_401_says_so_and_warns_once(
    fake: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake.enqueue_error(401, "Missing bearer token", repeat=2)
    client = ModelClient(resolve_client("m", fake.url), max_retries=0)
    assert client.settings.keyless
    errors: list[ModelAPIError] = []
    with caplog.at_level(logging.WARNING, logger="nbchat"):
        for _ in range(2):
            with pytest.raises(ModelAPIError) as info:
                run(client)
            errors.append(info.value)
    assert all("wants an API key" in str(e) and "none is configured" in str(e) for e in errors)
    assert errors[0].status_code == 401
    warned = [r for r in caplog.records if "wants an API key" in r.getMessage()]
    assert len(warned) == 1, "warned once per endpoint, not per request"


def test_for_model_keeps_the_endpoint(fake: FakeOpenAIServer, monkeypatch: Any) -> None:
    add_endpoint("work", fake.url, headers={"X-Title": "t"})
    client = ModelClient(resolve_client("work:a"), api="responses")
    other = client.for_model("b")
    assert (other.model, other.settings.headers, other.api) == (
        "b",
        (("X-Title", "t"),),
        "responses",
    )
    add_endpoint("home", "http://127.0.0.1:9/v1")
    assert client.for_model("home:c").settings.base_url == "http://127.0.0.1:9/v1"


def test_kernel_default_api_picks_the_wire(fake: FakeOpenAIServer) -> None:
    with pytest.raises(ConfigError, match="chat' or 'responses"):
        set_defaults(api="soap")
    set_defaults(api="responses")
    fake.enqueue("over responses")
    r = Session(model="m", base_url=fake.url, db=False, max_retries=0).send("hi")
    assert r.text == "over responses" and fake.request_paths == ["/v1/responses"]
    add_endpoint("chatty", fake.url, api="chat")
    fake.enqueue("over chat")
    assert Session(model="chatty:m", db=False).send("hi").text == "over chat"
    assert fake.request_paths[1] == "/v1/chat/completions", "the endpoint's api wins"


def test_a_session_on_a_named_endpoint_keeps_it_for_new_sessions(
    fake: FakeOpenAIServer,
) -> None:
    add_endpoint("work", fake.url, headers={"X-Title": "nbchat"})
    s = Session(endpoint="work", model="m", db=False)
    fake.enqueue("one")
    s.send("hi")
    fresh = s.new()
    fake.enqueue("two")
    fresh.send("hi")
    assert [h.get("x-title") for h in fake.request_headers] == ["nbchat", "nbchat"]
    assert fresh.client.settings.endpoint == "work"


def test_session_api_responses_speaks_the_responses_wire(fake: FakeOpenAIServer) -> None:
    s = Session(model="m", base_url=fake.url, api_key="sk-test", db=False, api="responses")
    fake.enqueue("over responses")
    assert s.send("hi").text == "over responses"
    assert "input" in fake.requests[0] and "messages" not in fake.requests[0]
    assert s.new().client.api == "responses"
