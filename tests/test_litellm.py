"""nbchat against a real LiteLLM proxy on 127.0.0.1, its models answering ``mock_response``.

LiteLLM is not a dependency: these tests find its ``litellm`` command (``NBCHAT_LITELLM``,
next to this Python, or on ``PATH``) and skip without it. The proxy runs offline
(``LITELLM_LOCAL_MODEL_COST_MAP``: its bundled price list, not the network's) and
reports each request's ``usage.cost`` itself, which nbchat records as a server cost.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ports import free_port

from nbchat import Session
from nbchat._assembler import ReplyAssembler
from nbchat._client import ModelClient
from nbchat._config import resolve_client

pytestmark = pytest.mark.slow

MASTER_KEY = "sk-nbchat-litellm-test-9f8e7d6c5b4a3210"
MOCK_TEXT = "Hello from the LiteLLM mock"
CONFIG = f"""
model_list:
  - model_name: mock-gpt
    litellm_params:
      model: openai/gpt-4o
      api_key: not-used
      mock_response: "{MOCK_TEXT}"
litellm_settings:
  telemetry: false
general_settings:
  master_key: {MASTER_KEY}
"""


def _litellm_command() -> str | None:
    configured = os.environ.get("NBCHAT_LITELLM")
    if configured:
        return configured
    beside = Path(sys.executable).parent / "litellm"
    if beside.exists():
        return str(beside)
    return shutil.which("litellm")


@pytest.fixture(scope="module")
def litellm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a LiteLLM proxy started for these tests (stopped after them)."""
    command = _litellm_command()
    if command is None:
        why = (
            "LiteLLM is not installed (pip install 'litellm[proxy]', or set NBCHAT_LITELLM "
            "to its litellm command)"
        )
        if os.environ.get("CI"):  # .ci/run installs it: a skip there would hide a gap
            pytest.fail(why)
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("litellm")
    (folder / "config.yaml").write_text(CONFIG)
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_DOCS": "True"}
    log = (folder / "proxy.log").open("wb")
    proc = subprocess.Popen(
        [command, "--config", "config.yaml", "--host", "127.0.0.1", "--port", str(port)],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"LiteLLM exited: {(folder / 'proxy.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{root}/health/liveliness", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("LiteLLM did not start within 90 s")
            time.sleep(0.5)
        yield f"{root}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_a_streamed_turn_records_the_proxys_own_cost(litellm_url: str) -> None:
    s = Session(model="mock-gpt", base_url=litellm_url, api_key=MASTER_KEY, db=False)
    events: list[object] = []
    r = s.send("hi", on_event=events.append)
    assert r.status == "completed" and r.text == MOCK_TEXT
    [usage] = [e for e in events if getattr(e, "kind", None) == "usage"]
    assert usage.usage.prompt_tokens and usage.usage.completion_tokens  # type: ignore[attr-defined]
    assert usage.cost_source == "server" and usage.cost_usd > 0  # type: ignore[attr-defined]
    assert sum(e.kind == "text_delta" for e in events) > 1, "it streamed in pieces"  # type: ignore[attr-defined]


def test_the_context_window_comes_from_its_models_list(litellm_url: str) -> None:
    client = ModelClient(resolve_client("mock-gpt", litellm_url, MASTER_KEY), max_retries=0)
    assert asyncio.run(client.context_window()) == 128000


def test_responses_api_answers_unstreamed(litellm_url: str) -> None:
    # LiteLLM's mock answers /v1/responses in whole; streamed, it reports an error.
    client = ModelClient(
        resolve_client("mock-gpt", litellm_url, MASTER_KEY), max_retries=0, api="responses"
    )
    assembler = ReplyAssembler()

    async def go() -> None:
        async for _ in client.astream([{"role": "user", "content": "hi"}], assembler, stream=False):
            pass

    asyncio.run(go())
    assert assembler.text == MOCK_TEXT and assembler.finish_reason == "stop"
