"""Streaming: nbchat's loop against the bare openai SDK loop over the same fake stream.

- throughput: ``Session.stream()`` (store on, rendering off) over a 10,000-chunk reply,
  against ``for chunk in client.chat.completions.create(..., stream=True)`` with the
  SDK's default client; goal ≥ 6x. A second line puts the same SDK loop on aiohttp
  (``AsyncOpenAI(http_client=DefaultAioHttpClient())``), the transport nbchat uses when
  it is installed, so the part of the ratio that is the transport shows. Twice: with the
  fake server in this process (its encoding, ~5 us a chunk, then counts for all loops,
  as in earlier figures) and in its own process (each loop's own cost, as against a
  remote server).
- time to first token: extra milliseconds over the raw SDK; goal ≤ 20 ms.
- memory: peak traced allocation while streaming a 100,000-token reply, as a multiple
  of the reply's size (the server runs in another process so its buffers don't count).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench._common import best_of, figure, median_of

CHUNKS = 10_000


def _sdk_stream(client: Any) -> int:
    n = 0
    stream = client.chat.completions.create(
        model="bench",
        messages=[{"role": "user", "content": "go"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1
    return n


async def _sdk_stream_aiohttp(url: str) -> int:
    import openai

    n = 0
    async with openai.AsyncOpenAI(
        base_url=url, api_key="bench", max_retries=0, http_client=openai.DefaultAioHttpClient()
    ) as client:
        stream = await client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": "go"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                n += 1
    return n


async def _nbchat_stream(session: Any, text: str = "go") -> int:
    n = 0
    async for event in session.stream(text):
        if event.kind == "text_delta":
            n += 1
    return n


@contextlib.contextmanager
def _server(replies: int, in_process: bool) -> Iterator[str]:
    """The URL of a fake server that plays ``replies`` 10,000-chunk replies: in this
    process (its work then counts for both loops), or in one of its own."""
    from nbchat.testing import FakeOpenAIServer

    if in_process:
        with FakeOpenAIServer() as server:
            server.enqueue("x" * CHUNKS, chunk_size=1, repeat=replies)
            yield server.url
        return
    with _server_process([{"text": "x" * CHUNKS, "chunk_size": 1}] * replies) as url:
        yield url


@contextlib.contextmanager
def _server_process(replies: list[dict[str, Any]]) -> Iterator[str]:
    """The URL of a fake server in a process of its own that plays ``replies`` (its
    script: ``Reply`` fields), so that its buffers and CPU are not this process's."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "script.json"
        script.write_text(json.dumps(replies))
        process = subprocess.Popen(
            [sys.executable, "-m", "nbchat.testing", "--script", str(script)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            yield process.stdout.readline().strip()
        finally:
            process.terminate()
            process.wait()


def throughput(repeats: int = 5, in_process: bool = True) -> list[dict[str, Any]]:
    """Per-chunk time of nbchat's loop and of the SDK's (default client, then aiohttp),
    each the best of ``repeats`` runs, the runs interleaved so that a change in the
    machine's load hits all alike."""
    import openai

    import nbchat
    from nbchat._http import http_client, transport_of

    transport = transport_of(http_client(60.0))
    with _server(3 * repeats + 3, in_process) as url, tempfile.TemporaryDirectory() as tmp:
        client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0)
        session = nbchat.Session(
            model="bench", base_url=url, api_key="bench", db=Path(tmp) / "b.duckdb"
        )
        _sdk_stream(client)  # warm every path (imports, connections)
        asyncio.run(_sdk_stream_aiohttp(url))
        asyncio.run(_nbchat_stream(session))
        sdk: list[float] = []
        sdk_aiohttp: list[float] = []
        ours: list[float] = []
        for _ in range(repeats):
            sdk.append(best_of(1, lambda: _sdk_stream(client)))
            sdk_aiohttp.append(best_of(1, lambda: asyncio.run(_sdk_stream_aiohttp(url))))
            ours.append(best_of(1, lambda: asyncio.run(_nbchat_stream(session))))
        client.close()
    per_sdk, per_ours = min(sdk) / CHUNKS * 1e6, min(ours) / CHUNKS * 1e6
    per_sdk_aiohttp = min(sdk_aiohttp) / CHUNKS * 1e6
    ratios = sorted(s / o for s, o in zip(sdk, ours, strict=True))
    ratios_aiohttp = sorted(s / o for s, o in zip(sdk_aiohttp, ours, strict=True))
    where = "in this process" if in_process else "in its own process"
    name = f"stream 10k chunks, server {'in' if in_process else 'out of'} process"
    return [
        figure(
            name,
            per_ours,
            "us/chunk",
            baseline=per_sdk,
            goal="ratio >= 6 (vs bare SDK loop)",
            ok=per_sdk / per_ours >= 6,
            note=f"ratio per interleaved pair {ratios[0]:.1f}-{ratios[-1]:.1f}x "
            f"(store on, rendering off; nbchat on {transport}; the fake server {where}; "
            "baseline: the sync SDK loop, default client)",
        ),
        figure(
            "  the same, vs the SDK loop on aiohttp",
            per_ours,
            "us/chunk",
            baseline=per_sdk_aiohttp,
            note=f"ratio per interleaved pair {ratios_aiohttp[0]:.1f}-{ratios_aiohttp[-1]:.1f}x "
            "(reference: the async SDK loop with openai.DefaultAioHttpClient)",
        ),
    ]


def time_to_first_token(samples: int = 15) -> list[dict[str, Any]]:
    import openai

    import nbchat
    from nbchat.testing import FakeOpenAIServer

    def sdk_first(client: Any) -> float:
        t0 = time.perf_counter()
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": "go"}], stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                elapsed = time.perf_counter() - t0
                stream.close()
                return elapsed
        raise RuntimeError("no text arrived")

    def ours_first(session: Any) -> float:
        # send() is what cells and the panel use: the turn runs on nbchat's background
        # loop with a kept connection; the first text event is timed on this thread.
        t0 = time.perf_counter()
        first: list[float] = []

        def on_event(event: Any) -> None:
            if event.kind == "text_delta" and not first:
                first.append(time.perf_counter() - t0)
                session.cancel()

        session.send("go", on_event=on_event)
        if not first:
            raise RuntimeError("no text arrived")
        return first[0]

    with FakeOpenAIServer(fallback="hello there") as server, tempfile.TemporaryDirectory() as t:
        client = openai.OpenAI(base_url=server.url, api_key="bench", max_retries=0)
        session = nbchat.Session(
            model="bench", base_url=server.url, api_key="bench", db=Path(t) / "b.duckdb"
        )
        sdk_first(client)
        ours_first(session)
        sdk = median_of([sdk_first(client) for _ in range(samples)]) * 1000
        ours = median_of([ours_first(session) for _ in range(samples)]) * 1000
        client.close()
    extra = ours - sdk
    return [
        figure(
            "time to first token, extra over raw SDK",
            extra,
            "ms",
            baseline=sdk,
            goal="<= 20 ms extra",
            ok=extra <= 20,
            note=f"nbchat send() {ours:.1f} ms vs SDK {sdk:.1f} ms (median of {samples}, store on)",
        )
    ]


def memory(tokens: int = 100_000) -> list[dict[str, Any]]:
    import nbchat

    text = "abcd" * tokens  # ~4 characters per token
    # a short warm-up reply first, so imports and connection set-up are not counted
    with _server_process([{"text": "warm"}, {"text": text, "chunk_size": 4}]) as url:
        session = nbchat.Session(model="bench", base_url=url, api_key="b", db=False)
        asyncio.run(_nbchat_stream(session))
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        n = asyncio.run(_nbchat_stream(session))
        peak = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
    assert n == tokens, n
    size = len(text.encode())
    multiple = peak / size
    return [
        figure(
            "100k-token reply: peak memory growth",
            multiple,
            "x text",
            goal="<= 6x the reply's size",
            ok=multiple <= 6,
            note=f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB reply (tracemalloc)",
        )
    ]


def run() -> list[dict[str, Any]]:
    """All streaming figures."""
    return [
        *throughput(in_process=True),
        *throughput(in_process=False),
        *time_to_first_token(),
        *memory(),
    ]


if __name__ == "__main__":
    from bench._common import print_table

    print_table(run())
