"""Talking to an OpenAI-compatible model: one request, streamed and folded into one message.

The official ``openai`` client does what it is good at — base URL, auth headers,
retries with backoff on 429/5xx, typed errors. The stream itself is read as raw SSE
bytes and parsed into small validated models here: the SDK's per-chunk object building
costs several times more than the transport and JSON parsing together, and a reply of
thousands of chunks is the common case in a notebook.

What the server sends is parsed and checked in ``_wire`` (``_responses`` for the
Responses API) and put together into one message by ``_assembler.ReplyAssembler``;
every error leaving ``ModelClient`` is one ``ModelAPIError`` with the key redacted from
it, worded in ``_request_errors``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from . import _responses, _runner
from ._assembler import ReplyAssembler
from ._config import ClientSettings, WireAPI, foreign_to_embedded, resolve_client
from ._events import Event, UsageEvent
from ._exceptions import ModelAPIError
from ._http import (
    TRANSPORT_ENV,
    _response_class,
    counting_attempts,
    http_client,
)
from ._request_errors import NEVER_CONNECTED, check_complete, not_expected, translated_errors
from ._text import valid_data
from ._types import RequestUsage
from ._wire import (
    BodyEncoder,
    SSEParser,
    context_window_from_models,
    context_window_from_props,
    parse_chunk,
    truncation_notice,
)

if TYPE_CHECKING:
    import openai

__all__ = ["ModelClient", "truncation_notice"]

logger = logging.getLogger("nbchat")

# openai clients shared per endpoint (base URL, key, retries, timeout): connection reuse,
# and no pools left for the garbage collector to find unclosed.
_cache_lock = threading.Lock()
_async_clients: dict[tuple[Any, ...], openai.AsyncOpenAI] = {}
# Context windows the servers reported, per (base URL, model); None: they report none.
_windows: dict[tuple[str, str], int | None] = {}


class _Decoder(Protocol):
    finished: bool

    def feed(self, payload: bytes) -> dict[str, Any]: ...


class _ChatStream:
    """Chat completions chunks as they come (the end is ``[DONE]``, seen by the parser)."""

    finished = False
    feed = staticmethod(parse_chunk)  # a chunk is its JSON object: no call in between


# --------------------------------------------------------------------------- client

DEFAULT_STALL_TIMEOUT = 60.0


class ModelClient:
    """One OpenAI-compatible endpoint; builds its ``openai.AsyncOpenAI`` client lazily.

    ``timeout`` bounds connecting, sending, and waiting for a non-streamed answer;
    ``stall_timeout`` is how long a stream may go without a byte before it is given up
    (``None``: only ``timeout``). Every error it raises is a ``ModelAPIError`` whose
    message and body have the key (and anything shaped like one) redacted.
    """

    def __init__(
        self,
        settings: ClientSettings,
        *,
        max_retries: int = 2,
        timeout: float = 600.0,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        api: WireAPI | None = None,
    ) -> None:
        self.settings = settings
        self.max_retries = max_retries
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        if api is not None and api not in ("chat", "responses"):
            raise ValueError(f"api must be 'chat' or 'responses', not {api!r}")
        self._api = api
        self._encoder = BodyEncoder()
        self._input_items = _responses.input_items()  # the Responses items of what was sent

    @property
    def model(self) -> str:
        """The model name requests go to."""
        return self.settings.model

    @property
    def api(self) -> WireAPI:
        """The wire format: ``api=`` if given, else the endpoint's, else ``"responses"``
        for models that exist only there (``o3-pro``...), else ``"chat"``."""
        if self._api is not None:
            return self._api
        if self.settings.api is not None:
            return self.settings.api
        return "responses" if _responses.responses_only(self.model) else "chat"

    def __repr__(self) -> str:
        where = self.settings.base_url
        return f"ModelClient(model={self.model!r}, base_url={where!r}, api={self.api!r})"

    def for_model(self, model: str) -> ModelClient:
        """A client for another model on the same endpoint, key and timeouts
        (``"work:gpt-4o"`` switches to the saved endpoint ``work``; a model not under
        ``local/`` leaves the embedded server for the configured endpoint)."""
        settings = dataclasses.replace(self.settings, model=model)
        if _names_endpoint(model) or foreign_to_embedded(model, self.settings.base_url):
            settings = resolve_client(model)
        return ModelClient(
            settings,
            max_retries=self.max_retries,
            timeout=self.timeout,
            stall_timeout=self.stall_timeout,
            api=self._api,
        )

    def _options(self) -> dict[str, Any]:
        s = self.settings
        options: dict[str, Any] = {
            "api_key": s.api_key.get_secret_value(),
            "max_retries": self.max_retries,
            "timeout": self.timeout,
        }
        if s.headers:
            options["default_headers"] = dict(s.headers)
        if s.api_version is None:
            options["base_url"] = s.base_url
        elif "/deployments/" in s.base_url:
            options["base_url"] = s.base_url
            options["api_version"] = s.api_version
        else:  # the resource's URL: the SDK adds /openai and /deployments/{model}
            options["azure_endpoint"] = s.base_url.removesuffix("/openai")
            options["api_version"] = s.api_version
        return options

    def _new_client(self) -> openai.AsyncOpenAI:
        import openai

        options = self._options()
        options["http_client"] = http_client(self.timeout)
        if self.settings.api_version is not None:
            return openai.AsyncAzureOpenAI(**options)
        return openai.AsyncOpenAI(**options)

    def _cache_key(self) -> tuple[Any, ...]:
        s = self.settings
        return (
            s.base_url,
            s.api_key.get_secret_value(),
            self.max_retries,
            self.timeout,
            s.headers,
            s.api_version,
            os.environ.get(TRANSPORT_ENV),
        )

    @contextlib.asynccontextmanager
    async def async_client(self) -> AsyncIterator[openai.AsyncOpenAI]:
        """An ``openai.AsyncOpenAI`` client usable on the running loop.

        Its connections belong to one event loop: on nbchat's background loop a client
        per endpoint is kept for connection reuse; on any other loop (a user's own
        ``asyncio.run``) a fresh client is opened and closed around the request.
        """
        loop = asyncio.get_running_loop()
        if loop is _runner.current_background_loop():
            # Keyed by the loop too: a background loop that had to be replaced leaves its
            # clients (and their connections) behind.
            key = (id(loop), *self._cache_key())
            with _cache_lock:
                client = _async_clients.get(key)
                if client is None:
                    if not _async_clients:
                        atexit.register(_close_kept_clients)
                    client = _async_clients[key] = self._new_client()
            yield client
        else:
            async with self._new_client() as client:
                yield client

    def _body(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        stream: bool,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        if self.api == "responses":
            return _responses.request_body(
                self.model, messages, tools, stream, params, self._input_items
            )
        body: dict[str, Any] = {"model": self.settings.model, "messages": messages, **params}
        if tools:
            body["tools"] = tools
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _request_options(self, stream: bool) -> Any:  # the SDK's RequestOptions TypedDict
        if not stream or self.stall_timeout is None:
            return {}
        import openai

        # httpx's read timeout is the longest wait for the next byte: a stall timeout.
        return {"timeout": openai.Timeout(self.timeout, read=self.stall_timeout)}

    async def _post(self, client: openai.AsyncOpenAI, body: dict[str, Any], stream: bool) -> Any:
        # client.post skips the SDK's walk over the request body, which costs ~0.3 s for
        # a 600-message history; auth, retries and errors are the same.
        options = self._request_options(stream)
        path = "/responses" if self.api == "responses" else "/chat/completions"
        if self.settings.api_version is None:
            # Sent as bytes, each message (or item) encoded once per conversation (Azure's
            # client reads the model from the JSON body to route the request: not there).
            key = "input" if self.api == "responses" else "messages"
            return await client.post(
                path,
                content=self._encoder.encode(body, key),
                cast_to=_response_class(),
                stream=True,
                options=options,
            )
        try:
            return await client.post(
                path,
                body=body,
                cast_to=_response_class(),
                stream=True,
                options=options,
            )
        except UnicodeEncodeError as exc:
            if exc.encoding.replace("-", "").lower() != "utf8":
                raise
        # A lone surrogate somewhere in the history cannot be encoded: send U+FFFD
        # instead (walking the body only now that it failed).
        return await client.post(
            path,
            body=valid_data(body),
            cast_to=_response_class(),
            stream=True,
            options=options,
        )

    async def astream(
        self,
        messages: list[dict[str, Any]],
        assembler: ReplyAssembler,
        *,
        tools: list[dict[str, Any]] | None = None,
        stream: bool = True,
        **params: Any,
    ) -> AsyncIterator[Event]:
        """Send one request; yield its delta events while ``assembler`` accumulates the message.

        Raises ``ModelAPIError`` for an HTTP error (after the client's retries), a broken
        or stalled stream, an answer that is not an event stream (an HTML page), or an
        error the server sends inside the stream. What arrived before a failure stays in
        ``assembler``.
        """
        body = self._body(messages, tools, stream, params)
        with translated_errors(self, assembler, stream=stream):
            async with self.async_client() as client:
                with counting_attempts(assembler.attempts):
                    response = await self._post(client, body, stream)
                try:
                    content_type = response.headers.get("content-type", "").lower()
                    if not stream or "json" in content_type:
                        # A server may ignore stream=true and answer one JSON object.
                        raw = await response.aread()
                        for event in assembler.feed(self._parse_reply(raw, content_type)):
                            yield event
                        return
                    # Trust a server that says event-stream; otherwise a body that opens
                    # like a page (HTML, XML) is reported at its first read, and one that
                    # gave no event by its end is reported then.
                    sse = "event-stream" in content_type
                    parser = SSEParser()
                    decoder: _Decoder = (
                        _responses.ResponsesStream() if self.api == "responses" else _ChatStream()
                    )
                    head: bytes | None = None
                    # A body without a content encoding is read as it came, past httpx's
                    # decoder and re-chunker (each a layer per chunk).
                    encoding = response.headers.get("content-encoding", "").strip().lower()
                    raw = encoding in ("", "identity")
                    frame, decode, fold = parser.feed, decoder.feed, assembler.feed  # per chunk
                    async for data in response.aiter_raw() if raw else response.aiter_bytes():
                        if head is None:
                            head = data
                            if not sse and data.lstrip()[:1] == b"<":
                                raise not_expected(
                                    self.settings, content_type, data, "an event stream"
                                )
                        for payload in frame(data):
                            for event in fold(decode(payload)):
                                yield event
                        if parser.done or decoder.finished:
                            break
                    else:
                        for payload in parser.close():
                            for event in assembler.feed(decoder.feed(payload)):
                                yield event
                    if not sse and parser.events == 0:
                        raise not_expected(
                            self.settings, content_type, head or b"", "an event stream"
                        )
                    check_complete(parser, assembler)
                finally:
                    await response.aclose()

    def _parse_reply(self, raw: bytes, content_type: str) -> dict[str, Any]:
        """A whole (non-streamed) answer as one chunk, or say what came instead of JSON."""
        try:
            return _responses.reply_chunk(raw) if self.api == "responses" else parse_chunk(raw)
        except ValueError:
            if raw.lstrip()[:1] in (b"{", b"["):
                raise  # JSON that is not a reply: reported as a broken answer
            raise not_expected(self.settings, content_type, raw, "a JSON reply") from None

    def usage_event(
        self,
        assembler: ReplyAssembler,
        error: ModelAPIError | None,
        *,
        interrupted: bool = False,
        purpose: Literal["chat", "summary"] = "chat",
    ) -> UsageEvent:
        """The record of one finished (or failed) request: usage, cost, timing, error.

        A request refused with an HTTP error before anything was generated used nothing,
        nor did one whose connection was never made: it counts as 0 tokens and $0
        (recording "unknown" would leave every later budget check unable to count). A
        price nbchat does not know stays ``None``.
        """
        from ._pricing import price_request

        usage = assembler.usage
        cost, provider, source = price_request(self.model, self.settings.base_url, usage)
        refused = error is not None and (
            error.status_code is not None or error.code == NEVER_CONNECTED
        )
        if usage is None and refused:
            usage, cost, source = RequestUsage(prompt_tokens=0, completion_tokens=0), 0.0, None
        return UsageEvent(
            session_id=assembler.session_id,
            turn_id=assembler.turn_id,
            round=assembler.round,
            model=self.model,
            provider=provider,
            usage=usage,
            cost_usd=cost,
            cost_source=source,
            ttft_ms=assembler.ttft_ms,
            first_text_ms=assembler.first_text_ms,
            duration_ms=(time.perf_counter() - assembler.started) * 1000,
            finish_reason=assembler.finish_reason,
            error=str(error) if error else ("interrupted" if interrupted else None),
            purpose=purpose,
            attempts=len(assembler.attempts) or None,
            retried_after=_retry_causes(assembler.attempts),
        )

    async def list_models(self) -> list[str]:
        """The model ids the server offers (``GET /models``)."""
        with translated_errors(self, None, stream=False):
            async with self.async_client() as client:
                page = await client.models.list()
        return sorted(m.id for m in page.data)

    def cached_context_window(self) -> int | None:
        """The context window ``context_window()`` found for this endpoint and model, if
        it has asked already (no request)."""
        return _windows.get((self.settings.base_url, self.model))

    async def context_window(self) -> int | None:
        """The model's context window as the server reports it, asked once per endpoint and
        model and then cached: ``max_model_len`` (vLLM) or ``context_length`` (OpenRouter)
        in ``GET /models``, else ``n_ctx`` from llama.cpp's ``GET /props``. ``None`` when
        the server says nothing (or cannot be asked); never raises."""
        key = (self.settings.base_url, self.model)
        if key in _windows:
            return _windows[key]
        window = (await self.listed_windows([self.model])).get(self.model)
        _windows[key] = window
        return window

    async def listed_windows(self, models: Sequence[str]) -> dict[str, int]:
        """The context windows the server reports for ``models`` (those it says nothing
        of are left out): ``GET /models``' cards, and when one model is asked of and its
        card says nothing, llama.cpp's ``GET /props`` (the size it was started with; a
        llama.cpp server serves the one model). Never raises."""
        base = self.settings.base_url
        root = base.removesuffix("/v1") if base.endswith("/v1") else base
        windows: dict[str, int] = {}
        try:
            async with self.async_client() as client:
                listed = await self._get_json(client, "/models")
                for model in models:
                    window = context_window_from_models(listed, model)
                    if window is not None:
                        windows[model] = window
                if len(models) == 1 and not windows:
                    window = context_window_from_props(
                        await self._get_json(client, root + "/props")
                    )
                    if window is not None:
                        windows[models[0]] = window
        except Exception as exc:  # a server that cannot say is a server that says nothing
            logger.debug("no context windows from %s: %r", base, exc)
        return windows

    async def _get_json(self, client: openai.AsyncOpenAI, path: str) -> Any:
        """``GET path`` (relative to the base URL, or absolute) as JSON; ``None`` if it fails."""
        import openai

        try:
            response = await client.get(
                path, cast_to=_response_class(), stream=True, options={"max_retries": 0}
            )
        except openai.APIError:
            return None
        try:
            return json.loads(await response.aread())
        except ValueError:
            return None
        finally:
            await response.aclose()


def _close_kept_clients() -> None:
    """Close the clients kept on the background loop, at exit: aiohttp reports a session
    that the garbage collector finds open ("Unclosed client session") on stderr.

    They stay in the cache: the tasks of a loop that died hold on to its clients, and
    freeing those now would report each such task "destroyed but pending".
    """
    with _cache_lock:
        clients = list(_async_clients.values())

    async def close_all() -> None:
        for client in clients:
            with contextlib.suppress(Exception):  # a client of a loop that died, say
                await client.close()

    loop = _runner.current_background_loop()
    if loop is not None and _runner.loop_alive():
        with contextlib.suppress(Exception):  # the loop is stuck, or went away meanwhile
            asyncio.run_coroutine_threadsafe(close_all(), loop).result(_CLOSE_WAIT)
        return
    thread = threading.Thread(target=asyncio.run, args=(close_all(),), daemon=True)
    thread.start()
    thread.join(_CLOSE_WAIT)


# How long exit waits for the kept clients to close their connections.
_CLOSE_WAIT = 2.0


def _names_endpoint(model: str) -> bool:
    """Whether ``model`` names a saved endpoint (``"work:gpt-4o"``)."""
    if ":" not in model:
        return False
    from ._endpoints import split_model

    return split_model(model)[0] is not None


def _retry_causes(attempts: list[int | None]) -> str | None:
    """What the attempts before the last one got ("HTTP 429, no answer"), or None when
    the first attempt was the last."""
    causes = ["no answer" if status is None else f"HTTP {status}" for status in attempts[:-1]]
    return ", ".join(causes) or None
