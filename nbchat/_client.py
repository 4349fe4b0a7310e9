"""Talking to an OpenAI-compatible model: one request, streamed and folded into one message.

The official ``openai`` client does what it is good at — base URL, auth headers,
retries with backoff on 429/5xx, typed errors. The stream itself is read as raw SSE
bytes and parsed into small validated models here: the SDK's per-chunk object building
costs several times more than the transport and JSON parsing together, and a reply of
thousands of chunks is the common case in a notebook.

``ReplyAssembler`` assembles the deltas of one request into one assistant message: text, tool
calls gathered by ``index`` (id, name, argument fragments), finish reason and usage.
What the server sends is parsed and checked in ``_wire``; every error leaving
``ModelClient`` is one ``ModelAPIError`` with the key redacted from it.
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
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Literal, Protocol

from . import _responses, _runner
from ._config import ClientSettings, WireAPI, resolve_client
from ._exceptions import ModelAPIError
from ._http import (
    TRANSPORT_ENV,
    _http_library,
    _response_class,
    _transport_errors,
    http_client,
    transport_cause,
)
from ._text import redact, redact_data, valid_data, valid_text
from ._types import (
    Event,
    ReasoningDelta,
    RequestUsage,
    TextBuffer,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStarted,
    UsageEvent,
    new_id,
    trusted,
)
from ._wire import (
    REASONING_ITEM,
    BodyEncoder,
    SSEParser,
    context_window_from_models,
    context_window_from_props,
    error_from_body,
    parse_chunk,
    request_usage,
    truncation_notice,
)

if TYPE_CHECKING:
    import openai

__all__ = ["ModelClient", "ReplyAssembler", "truncation_notice"]

logger = logging.getLogger("nbchat")

# openai clients shared per endpoint (base URL, key, retries, timeout): connection reuse,
# and no pools left for the garbage collector to find unclosed.
_cache_lock = threading.Lock()
_async_clients: dict[tuple[Any, ...], openai.AsyncOpenAI] = {}
# Context windows the servers reported, per (base URL, model); None: they report none.
_windows: dict[tuple[str, str], int | None] = {}
# Keyless endpoints that answered 401 and were warned about (once each).
_warned_keyless: set[str] = set()


class _Decoder(Protocol):
    finished: bool

    def feed(self, payload: bytes) -> dict[str, Any]: ...


class _ChatStream:
    """Chat completions chunks as they come (the end is ``[DONE]``, seen by the parser)."""

    finished = False
    feed = staticmethod(parse_chunk)  # a chunk is its JSON object: no call in between


# --------------------------------------------------------------------------- folding


class _PendingCall:
    __slots__ = ("call_id", "fragments", "name")

    def __init__(self, call_id: str, name: str) -> None:
        self.call_id = call_id
        self.name = name
        self.fragments: list[str] = []


class ReplyAssembler:
    """Assembles the chunks of one model request into one assistant message.

    ``feed`` returns the events a chunk produced (text, reasoning, tool-call start and
    argument fragments), stamped with the session, turn and round they belong to.
    """

    def __init__(self, session_id: str = "", turn_id: str = "", round: int = 0) -> None:
        self.session_id = session_id
        self.turn_id = turn_id
        self.round = round
        self.text_buffer = TextBuffer()
        self.reasoning_buffer = TextBuffer()
        self.calls: dict[int, _PendingCall] = {}
        self.finish_reason: str | None = None
        self.usage: RequestUsage | None = None
        self.model: str | None = None
        self.started = time.perf_counter()
        self.first_token_at: float | None = None  # reasoning counts: the model answered
        self.first_text_at: float | None = None  # the answer itself began
        self.chunks = 0
        # The Responses API's reasoning items, as received: sent back with the tool calls
        # that followed them (the encrypted reasoning of a stateless request).
        self.reasoning_items: list[Any] = []

    @property
    def text(self) -> str:
        """The reply text received so far."""
        return self.text_buffer.text()

    @property
    def reasoning(self) -> str:
        """The reasoning text received so far."""
        return self.reasoning_buffer.text()

    @property
    def first_text_ms(self) -> float | None:
        """Milliseconds from the request to its first answer (text or tool-call) delta."""
        if self.first_text_at is None:
            return None
        return (self.first_text_at - self.started) * 1000

    @property
    def ttft_ms(self) -> float | None:
        """Milliseconds from the request to its first token: reasoning, text or tool call."""
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.started) * 1000

    def tool_calls(self) -> list[ToolCall]:
        """The tool calls gathered so far, in index order (arguments joined, not parsed)."""
        return [
            ToolCall(id=c.call_id, name=c.name, arguments="".join(c.fragments))
            for _, c in sorted(self.calls.items())
        ]

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        """Fold one chunk (a ``chat.completion.chunk`` object) in; return its events.

        This runs once per streamed chunk: each field is checked as it is read, and a
        field of the wrong type makes the answer broken (``ValueError``).
        """
        self.chunks += 1
        get = chunk.get
        error = get("error")
        if error is not None:
            raise error_from_body(error)
        if self.model is None:
            model = get("model")
            if model and isinstance(model, str):
                self.model = model
        usage = get("usage")
        if usage is not None:
            self.usage = request_usage(usage) or self.usage
        choices = get("choices")
        if not choices:
            return []
        if not isinstance(choices, list):
            raise ValueError(f"'choices' is not a list: {choices!r:.60}")
        events: list[Event] = []
        for choice in choices:
            if not isinstance(choice, dict):
                raise ValueError(f"a choice is not an object: {choice!r:.60}")
            finish = choice.get("finish_reason")
            if finish:
                self.finish_reason = _string(finish, "finish_reason")
            delta = choice.get("delta") or choice.get("message")
            if not delta:
                continue
            if not isinstance(delta, dict):
                raise ValueError(f"a delta is not an object: {delta!r:.60}")
            content = delta.get("content")
            if content:
                if not isinstance(content, str):
                    raise ValueError(f"'content' is not a string: {content!r:.60}")
                if self.first_text_at is None:
                    self._mark_first_token(answer=True)
                self.text_buffer.append(content)
                events.append(self._text_event(TextDelta, "text_delta", content))
                if len(delta) == 1:
                    continue  # the common chunk: its text is all it holds
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning and isinstance(reasoning, str):  # other shapes are not text
                if self.first_token_at is None:
                    self._mark_first_token(answer=False)
                self.reasoning_buffer.append(reasoning)
                events.append(self._text_event(ReasoningDelta, "reasoning_delta", reasoning))
            calls = delta.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise ValueError(f"'tool_calls' is not a list: {calls!r:.60}")
                self._mark_first_token(answer=True)  # rarer than text: no inline check
                for position, tc in enumerate(calls):
                    events.extend(self._feed_tool_call(tc, position))
            item = delta.get(REASONING_ITEM)
            if item is not None:
                self.reasoning_items.append(item)
        return events

    def _feed_tool_call(self, tc: Any, position: int) -> list[Event]:
        if not isinstance(tc, dict):
            raise ValueError(f"a tool call is not an object: {tc!r:.60}")
        # Some servers omit `index` on non-streamed messages: fall back to the position.
        index = tc.get("index")
        if index is None:
            index = position
        elif not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"a tool call's index is not an integer: {index!r:.60}")
        fn = tc.get("function") or {}
        if not isinstance(fn, dict):
            raise ValueError(f"a tool call's function is not an object: {fn!r:.60}")
        name = _optional_string(fn.get("name"), "name")
        arguments = _optional_string(fn.get("arguments"), "arguments")
        events: list[Event] = []
        pending = self.calls.get(index)
        if pending is None:
            call_id = _optional_string(tc.get("id"), "id")
            pending = _PendingCall(call_id or f"call_{new_id()[:24]}", name or "")
            self.calls[index] = pending
            events.append(
                self._stamp(
                    ToolCallStarted.model_construct(
                        index=index, call_id=pending.call_id, name=pending.name
                    )
                )
            )
        elif name and not pending.name:
            pending.name = name
        if arguments:
            pending.fragments.append(arguments)
            events.append(
                self._stamp(
                    ToolCallDelta.model_construct(
                        index=index, call_id=pending.call_id, arguments_delta=arguments
                    )
                )
            )
        return events

    def _text_event(self, cls: type[Any], kind: str, text: str) -> Event:
        """A text or reasoning delta, built without validation (the hot path per chunk)."""
        event: Event = trusted(
            cls,
            session_id=self.session_id,
            turn_id=self.turn_id,
            round=self.round,
            kind=kind,
            text=text,
        )
        return event

    def _stamp(self, event: Any) -> Event:
        event.session_id = self.session_id
        event.turn_id = self.turn_id
        event.round = self.round
        return event  # type: ignore[no-any-return]

    def _mark_first_token(self, *, answer: bool) -> None:
        if self.first_text_at is not None:
            return  # both are known (the common case, once per chunk)
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        if answer:
            self.first_text_at = now


# --------------------------------------------------------------------------- client

DEFAULT_STALL_TIMEOUT = 60.0
# How much of a body that is not what was expected gets quoted in the error.
_QUOTE_CHARS = 120


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
        self._input_items: dict[int, Any] = {}  # the Responses items of each message sent

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
        (``"work:gpt-4o"`` switches to the saved endpoint ``work``)."""
        settings = dataclasses.replace(self.settings, model=model)
        if ":" in model:
            from ._endpoints import split_model

            if split_model(model)[0] is not None:
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
        with self._translated_errors(assembler, stream=stream):
            async with self.async_client() as client:
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
                                raise self._not_expected(content_type, data, "an event stream")
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
                        raise self._not_expected(content_type, head or b"", "an event stream")
                    _check_complete(parser, assembler)
                finally:
                    await response.aclose()

    def _parse_reply(self, raw: bytes, content_type: str) -> dict[str, Any]:
        """A whole (non-streamed) answer as one chunk, or say what came instead of JSON."""
        try:
            return _responses.reply_chunk(raw) if self.api == "responses" else parse_chunk(raw)
        except ValueError:
            if raw.lstrip()[:1] in (b"{", b"["):
                raise  # JSON that is not a reply: reported as a broken answer
            raise self._not_expected(content_type, raw, "a JSON reply") from None

    def _not_expected(self, content_type: str, head: bytes, expected: str) -> ModelAPIError:
        """The error for a 200 whose body is not the API's: what came, and its first line."""
        kind = content_type.split(";")[0].strip()
        if kind == "text/html":
            what = "an HTML page (text/html)"
        else:
            what = kind or "a body without a content type"
        first = head.lstrip().split(b"\n", 1)[0].split(b"\r", 1)[0]
        line = first.decode("utf-8", "replace").strip()
        if len(line) > _QUOTE_CHARS:
            line = line[:_QUOTE_CHARS] + "…"
        shown = f"first line: {redact(line, *self._secrets())!r}" if line else "an empty body"
        return ModelAPIError(
            f"The model server at {self.settings.base_url} answered HTTP 200 with {what}, "
            f"not {expected} ({shown}). Check base_url: it should be an OpenAI-compatible "
            "API (usually ending in /v1), not a web page, a login page or a proxy's page."
        )

    def _secrets(self) -> tuple[str, ...]:
        return (self.settings.api_key.get_secret_value(),)

    @contextlib.contextmanager
    def _translated_errors(
        self, assembler: ReplyAssembler | None, *, stream: bool
    ) -> Iterator[None]:
        """Turn whatever the transport or the server raised into one ``ModelAPIError``,
        with the key and anything shaped like one redacted from its message and body."""
        import openai

        try:
            try:
                yield
            except openai.APIError as exc:
                raise self._api_error(exc, assembler, stream) from exc
            except ModelAPIError:
                raise
            except _transport_errors() as exc:
                raise self._transport_error(exc, assembler, stream) from exc
            except ValueError as exc:  # undecodable or invalid payloads
                raise _broken_stream(exc, assembler) from exc
        except ModelAPIError as error:
            clean = _cleaned(error, self._secrets())
            if clean is error:
                raise
            raise clean from None  # the original and its cause may hold the secret

    def _transport_error(
        self, exc: BaseException, assembler: ReplyAssembler | None, stream: bool
    ) -> ModelAPIError:
        http = _http_library()
        exc = transport_cause(exc)
        if isinstance(exc, http.ReadTimeout):
            n = assembler.chunks if assembler is not None else 0
            if stream and self.stall_timeout is not None:
                return ModelAPIError(
                    f"The model server stopped sending for {self.stall_timeout:g} s "
                    f"(stall_timeout) after {n} chunks; the partial reply was kept."
                )
            return ModelAPIError(
                f"The model server sent nothing for {self.timeout:g} s (timeout) while "
                f"answering; {n} chunks arrived."
            )
        return _broken_stream(exc, assembler)

    def _api_error(
        self, exc: openai.APIError, assembler: ReplyAssembler | None, stream: bool
    ) -> ModelAPIError:
        import openai

        url = self.settings.base_url
        status = getattr(exc, "status_code", None)
        tries = f"{self.max_retries + 1} attempt{'s' if self.max_retries else ''}"
        if isinstance(exc, openai.APITimeoutError):
            waits = f"connect/answer timeout {self.timeout:g} s"
            if stream and self.stall_timeout is not None:
                waits += f", nothing sent for {self.stall_timeout:g} s (stall_timeout)"
            message = f"The model server at {url} did not answer in time ({waits}; {tries})."
        elif isinstance(exc, openai.APIConnectionError):
            cause = _describe(exc.__cause__) if exc.__cause__ else _describe(exc)
            message = f"Could not connect to the model server at {url} ({cause}; {tries})."
        elif isinstance(exc, openai.APIStatusError):
            message = f"The model server answered HTTP {status}: {_said(exc)}"
            if status == 401 and self.settings.keyless:
                message = self._keyless_401(exc.message)
            elif status == 401:
                message += " " + self.settings.key_hint()
        else:
            message = f"The model server failed: {_describe(exc)}"
        if assembler is not None and assembler.chunks:
            message += (
                f" The stream broke after {assembler.chunks} chunks; the partial reply was kept."
            )
        code = getattr(exc, "code", None)
        return ModelAPIError(
            message, status_code=status, body=exc.body, code=str(code) if code else None
        )

    def usage_event(
        self,
        assembler: ReplyAssembler,
        error: ModelAPIError | None,
        *,
        interrupted: bool = False,
        purpose: Literal["chat", "summary"] = "chat",
    ) -> UsageEvent:
        """The record of one finished (or failed) request: usage, cost, timing, error.

        A request refused with an HTTP error before anything was generated used nothing:
        it counts as 0 tokens and $0 (recording "unknown" would leave every later budget
        check unable to count). A price nbchat does not know stays ``None``.
        """
        from ._pricing import price_request

        usage = assembler.usage
        cost, provider, source = price_request(self.model, self.settings.base_url, usage)
        if usage is None and error is not None and error.status_code is not None:
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
        )

    async def list_models(self) -> list[str]:
        """The model ids the server offers (``GET /models``)."""
        with self._translated_errors(None, stream=False):
            async with self.async_client() as client:
                page = await client.models.list()
        return sorted(m.id for m in page.data)

    def _keyless_401(self, detail: str) -> str:
        """The message for a 401 from a server nbchat sent no key to; logged once per URL."""
        s = self.settings
        message = (
            f"The model server at {s.base_url} wants an API key (HTTP 401: {detail}), and "
            f"none is configured for it. {s.key_hint()}"
        )
        if s.base_url not in _warned_keyless:
            _warned_keyless.add(s.base_url)
            logger.warning("%s", message)
        return message

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
        window = await self._ask_window()
        _windows[key] = window
        return window

    async def _ask_window(self) -> int | None:
        base = self.settings.base_url
        root = base.removesuffix("/v1") if base.endswith("/v1") else base
        try:
            async with self.async_client() as client:
                models = await self._get_json(client, "/models")
                window = context_window_from_models(models, self.model)
                if window is None:
                    window = context_window_from_props(
                        await self._get_json(client, root + "/props")
                    )
        except Exception as exc:  # a server that cannot say is a server that says nothing
            logger.debug("no context window from %s: %r", base, exc)
            return None
        return window

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


def _cleaned(error: ModelAPIError, secrets: tuple[str, ...]) -> ModelAPIError:
    """``error`` with secrets redacted and text made valid Unicode (lone surrogates from
    an error body would fail to store), or ``error`` itself when nothing changed."""
    message = str(error)
    clean_message = valid_text(redact(message, *secrets))
    clean_body = valid_data(redact_data(error.body, *secrets))
    clean_code = valid_text(redact(error.code, *secrets)) if error.code else error.code
    if clean_message == message and clean_body == error.body and clean_code == error.code:
        return error
    return ModelAPIError(
        clean_message, status_code=error.status_code, body=clean_body, code=clean_code
    )


def _describe(exc: BaseException) -> str:
    """``Type: message``, never an empty message (httpx timeouts often have none)."""
    text = str(exc).strip()
    if not text and exc.__cause__ is not None:
        text = str(exc.__cause__).strip()
    if not text:
        doc = (type(exc).__doc__ or "").strip().splitlines()
        text = doc[0].rstrip(".") if doc else "no detail given"
    return f"{type(exc).__name__}: {text}"


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field!r} is not a string: {value!r:.60}")
    return value


def _optional_string(value: Any, field: str) -> str | None:
    return None if value is None else _string(value, field)


def _check_complete(parser: SSEParser, assembler: ReplyAssembler) -> None:
    if not parser.done and assembler.finish_reason is None:
        raise ModelAPIError(
            f"The model's stream ended early after {assembler.chunks} chunks "
            "(no finish reason, no [DONE]); the partial reply was kept."
        )


def _broken_stream(exc: BaseException, assembler: ReplyAssembler | None) -> ModelAPIError:
    n = assembler.chunks if assembler is not None else 0
    return ModelAPIError(
        f"The model's stream broke after {n} chunks ({_describe(exc)}); the partial reply was kept."
    )


def _said(exc: Any) -> str:
    """What an HTTP error says: its body's ``message`` when there is one, else the SDK's
    text (``Error code: 500 - {...}``, which would repeat the status)."""
    body = getattr(exc, "body", None)
    said = body.get("message") if isinstance(body, dict) else None
    return said if isinstance(said, str) and said.strip() else str(exc.message)
