"""A real Jupyter kernel driven the way JupyterLab drives it (cell ids in the metadata).

``nbclient`` sends no ``cellId``, and ``BlockingKernelClient.execute`` takes no
metadata, so execute requests are built by hand and sent on the shell channel.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager


@dataclass
class Execution:
    """What one execute request produced."""

    reply: dict[str, Any] = field(default_factory=dict)
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    input_requests: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.reply.get("status"))

    def of_type(self, msg_type: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m["header"]["msg_type"] == msg_type]

    @property
    def stdout(self) -> str:
        return "".join(
            m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stdout"
        )

    def displays(self) -> list[dict[str, Any]]:
        """The displays as a frontend shows them at the end (updates applied)."""
        shown: list[dict[str, Any]] = []
        by_id: dict[str, dict[str, Any]] = {}
        for _, msg in self.messages:
            kind, content = msg["header"]["msg_type"], msg["content"]
            display_id = content.get("transient", {}).get("display_id")
            if kind == "display_data":
                output = {"data": content["data"], "metadata": content["metadata"]}
                shown.append(output)
                if display_id:
                    by_id[display_id] = output
            elif kind == "update_display_data" and display_id in by_id:
                by_id[display_id].update(data=content["data"], metadata=content["metadata"])
        return shown


class Kernel:
    """A python3 kernel with a blocking client."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=dict(env))
        self.client: BlockingKernelClient = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)

    def interrupt(self) -> None:
        self.manager.interrupt_kernel()

    def execute(
        self,
        code: str,
        *,
        cell_id: str | None = None,
        stdin: Callable[[str], str] | None = None,
        on_message: Callable[[dict[str, Any]], None] | None = None,
        timeout: float = 60.0,
    ) -> Execution:
        """Run ``code`` as a cell; ``stdin(prompt)`` answers input requests."""
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": stdin is not None,
            "stop_on_error": True,
        }
        metadata = {"cellId": cell_id} if cell_id else {}
        msg = self.client.session.msg("execute_request", content, metadata=metadata)
        self.client.shell_channel.send(msg)
        msg_id = msg["header"]["msg_id"]
        result = Execution()
        deadline = time.monotonic() + timeout
        idle = False
        while not (idle and result.reply):
            if time.monotonic() > deadline:
                raise TimeoutError(f"cell did not finish in {timeout} s: {code[:60]!r}")
            if stdin is not None:
                try:
                    request = self.client.get_stdin_msg(timeout=0.01)
                except queue.Empty:
                    pass
                else:
                    prompt = request["content"]["prompt"]
                    result.input_requests.append(prompt)
                    self.client.input(stdin(prompt))
            if not result.reply:
                try:
                    reply = self.client.get_shell_msg(timeout=0.01)
                except queue.Empty:
                    pass
                else:
                    if reply["parent_header"].get("msg_id") == msg_id:
                        result.reply = reply["content"]
            try:
                message = self.client.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                continue
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            result.messages.append((time.monotonic(), message))
            if on_message is not None:
                on_message(message)
            kind = message["header"]["msg_type"]
            if kind == "status" and message["content"]["execution_state"] == "idle":
                idle = True
        return result


def kernel_env(base_url: str, db: str, **extra: str) -> dict[str, str]:
    """The environment of a kernel that talks to the fake server and stores in ``db``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBCHAT_", "OPENAI_"))}
    env.update(
        NBCHAT_BASE_URL=base_url,
        NBCHAT_MODEL="fake-model",
        NBCHAT_DB=db,
        JUPYTER_PLATFORM_DIRS="1",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
        **extra,
    )
    return env


@contextmanager
def running_kernel(env: Mapping[str, str]) -> Iterator[Kernel]:
    """A kernel for the duration of the block."""
    kernel = Kernel(env)
    try:
        yield kernel
    finally:
        kernel.close()


S = TypeVar("S", bound=Any)  # the fake server


@contextmanager
def nbchat_kernel(base_url: str, db: str | os.PathLike[str], *setup: str) -> Iterator[Kernel]:
    """A kernel on the fake server at ``base_url``, storing in ``db``, with nbchat loaded
    and the ``setup`` cells run (each must succeed)."""
    with running_kernel(kernel_env(base_url, str(db))) as kernel:
        for code in ("%load_ext nbchat", *setup):
            assert kernel.execute(code).status == "ok", code
        yield kernel


def fresh_session(server: S, kernel: Kernel) -> S:
    """``server`` emptied, and a new current session in ``kernel``: each test's start."""
    server.reset()
    assert kernel.execute("%chat new").status == "ok"
    return server


def stored_rows(session_id: str, db: str | os.PathLike[str], count: int, **options: Any) -> Any:
    """``transcript(session_id)`` read from this (another) process once it holds ``count``
    rows: a kernel's turn is durable in its journal when the cell ends and reaches the
    store file a moment later. Fails after 30 s (a bound, not a timing)."""
    from nbchat._analysis import transcript

    deadline = time.monotonic() + 30
    while len(rows := transcript(session_id, db=db, **options)) < count:
        assert time.monotonic() < deadline, f"only {len(rows)} of {count} rows were stored"
        time.sleep(0.05)
    return rows
