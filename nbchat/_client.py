"""Talking to an OpenAI-compatible model: one request, streamed and folded into one message.

The official ``openai`` client does what it is good at — base URL, auth headers,
retries with backoff on 429/5xx, typed errors. The stream itself is read as raw SSE
bytes and parsed into small validated models here: the SDK's per-chunk object building
costs several times more than the transport and JSON parsing together, and a reply of
thousands of chunks is the common case in a notebook.

``RoundFolder`` folds the deltas of one request into one assistant message: text, tool
calls gathered by ``index`` (id, name, argument fragments), finish reason and usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from . import _runner
from ._config import ClientSettings
from ._exceptions import ModelAPIError
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
)

if TYPE_CHECKING:
    import openai

__all__ = ["ModelClient", "RoundFolder"]

# openai clients shared per endpoint (base URL, key, retries, timeout): connection reuse,
# and no pools left for the garbage collector to find unclosed.
_cache_lock = threading.Lock()
_sync_clients: dict[tuple[str, str, int, float], openai.OpenAI] = {}
_async_clients: dict[tuple[str, str, int, float], openai.AsyncOpenAI] = {}


# --------------------------------------------------------------------------- wire models
# Only the fields nbchat reads; everything else a server sends is ignored.


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _FunctionDelta(_Wire):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(_Wire):
    index: int | None = None
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(_Wire):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(_Wire):
    delta: _Delta | None = None
    message: _Delta | None = None  # non-streamed replies carry the whole message here
    finish_reason: str | None = None


class _TokenDetails(_Wire):
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class _Usage(_Wire):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _TokenDetails | None = None
    completion_tokens_details: _TokenDetails | None = None


class _Chunk(_Wire):
    model: str | None = None
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


# --------------------------------------------------------------------------- folding


class _PendingCall:
    __slots__ = ("call_id", "fragments", "name")

    def __init__(self, call_id: str, name: str) -> None:
        self.call_id = call_id
        self.name = name
        self.fragments: list[str] = []


class RoundFolder:
    """Folds the chunks of one model request into one assistant message.

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
        self.first_token_at: float | None = None
        self.chunks = 0

    @property
    def text(self) -> str:
        """The reply text received so far."""
        return self.text_buffer.text()

    @property
    def reasoning(self) -> str:
        """The reasoning text received so far."""
        return self.reasoning_buffer.text()

    @property
    def ttft_ms(self) -> float | None:
        """Milliseconds from the request to its first text or tool-call delta."""
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.started) * 1000

    def tool_calls(self) -> list[ToolCall]:
        """The tool calls gathered so far, in index order (arguments joined, not parsed)."""
        return [
            ToolCall(id=c.call_id, name=c.name, arguments="".join(c.fragments))
            for _, c in sorted(self.calls.items())
        ]

    def feed(self, chunk: _Chunk) -> list[Event]:
        """Fold one parsed chunk in; return the events it produced."""
        self.chunks += 1
        if chunk.error is not None:
            raise _error_from_body(chunk.error)
        if chunk.model and self.model is None:
            self.model = chunk.model
        if chunk.usage is not None:
            self.usage = _request_usage(chunk.usage)
        events: list[Event] = []
        for choice in chunk.choices:
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
            delta = choice.delta or choice.message
            if delta is None:
                continue
            if delta.content:
                self._mark_first_token()
                self.text_buffer.append(delta.content)
                events.append(self._stamp(TextDelta.model_construct(text=delta.content)))
            reasoning = delta.reasoning_content or delta.reasoning
            if reasoning:
                self.reasoning_buffer.append(reasoning)
                events.append(self._stamp(ReasoningDelta.model_construct(text=reasoning)))
            if delta.tool_calls:
                self._mark_first_token()
                for position, tc in enumerate(delta.tool_calls):
                    events.extend(self._feed_tool_call(tc, position))
        return events

    def _feed_tool_call(self, tc: _ToolCallDelta, position: int) -> list[Event]:
        # Some servers omit `index` on non-streamed messages: fall back to the position.
        index = tc.index if tc.index is not None else position
        fn = tc.function or _FunctionDelta()
        events: list[Event] = []
        pending = self.calls.get(index)
        if pending is None:
            pending = _PendingCall(tc.id or f"call_{new_id()[:24]}", fn.name or "")
            self.calls[index] = pending
            events.append(
                self._stamp(
                    ToolCallStarted.model_construct(
                        index=index, call_id=pending.call_id, name=pending.name
                    )
                )
            )
        elif fn.name and not pending.name:
            pending.name = fn.name
        if fn.arguments:
            pending.fragments.append(fn.arguments)
            events.append(
                self._stamp(
                    ToolCallDelta.model_construct(
                        index=index, call_id=pending.call_id, arguments_delta=fn.arguments
                    )
                )
            )
        return events

    def _stamp(self, event: Any) -> Event:
        event.session_id = self.session_id
        event.turn_id = self.turn_id
        event.round = self.round
        return event  # type: ignore[no-any-return]

    def _mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()


def _request_usage(u: _Usage) -> RequestUsage:
    prompt_details = u.prompt_tokens_details or _TokenDetails()
    completion_details = u.completion_tokens_details or _TokenDetails()
    return RequestUsage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        cached_tokens=prompt_details.cached_tokens,
        reasoning_tokens=completion_details.reasoning_tokens,
    )


def _error_from_body(body: Any, status_code: int | None = None) -> ModelAPIError:
    err = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or "the server reported an error")
        code = err.get("code")
    else:
        message, code = str(body or "the server reported an error"), None
    return ModelAPIError(
        f"The model server returned an error: {message}",
        status_code=status_code,
        body=body,
        code=str(code) if code else None,
    )


class _SSEParser:
    """Splits a byte stream into SSE ``data:`` payloads; notes the ``[DONE]`` marker."""

    __slots__ = ("buffer", "done")

    def __init__(self) -> None:
        self.buffer = b""
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        if b"\n" not in data:
            return []
        *lines, self.buffer = self.buffer.split(b"\n")
        payloads = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (": ping"), event:/id: fields
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
            elif payload:
                payloads.append(payload)
        return payloads


# --------------------------------------------------------------------------- client


class ModelClient:
    """One OpenAI-compatible endpoint; builds the sync and async ``openai`` clients lazily."""

    def __init__(
        self, settings: ClientSettings, *, max_retries: int = 2, timeout: float = 600.0
    ) -> None:
        self.settings = settings
        self.max_retries = max_retries
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ModelClient(model={self.settings.model!r}, base_url={self.settings.base_url!r})"

    @property
    def model(self) -> str:
        """The model name requests go to."""
        return self.settings.model

    def _options(self) -> dict[str, Any]:
        return {
            "base_url": self.settings.base_url,
            "api_key": self.settings.api_key.get_secret_value(),
            "max_retries": self.max_retries,
            "timeout": self.timeout,
        }

    def _cache_key(self) -> tuple[str, str, int, float]:
        s = self.settings
        return (s.base_url, s.api_key.get_secret_value(), self.max_retries, self.timeout)

    def sync_client(self) -> openai.OpenAI:
        """The ``openai.OpenAI`` client, shared by every session with the same endpoint."""
        with _cache_lock:
            client = _sync_clients.get(self._cache_key())
            if client is None:
                import openai

                client = _sync_clients[self._cache_key()] = openai.OpenAI(**self._options())
        return client

    @contextlib.asynccontextmanager
    async def async_client(self) -> AsyncIterator[openai.AsyncOpenAI]:
        """An ``openai.AsyncOpenAI`` client usable on the running loop.

        Its connections belong to one event loop: on nbchat's background loop a client
        per endpoint is kept for connection reuse; on any other loop (a user's own
        ``asyncio.run``) a fresh client is opened and closed around the request.
        """
        import openai

        if asyncio.get_running_loop() is _runner.current_background_loop():
            with _cache_lock:
                client = _async_clients.get(self._cache_key())
                if client is None:
                    client = openai.AsyncOpenAI(**self._options())
                    _async_clients[self._cache_key()] = client
            yield client
        else:
            async with openai.AsyncOpenAI(**self._options()) as client:
                yield client

    def _body(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        stream: bool,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.settings.model, "messages": messages, **params}
        if tools:
            body["tools"] = tools
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def astream(
        self,
        messages: list[dict[str, Any]],
        folder: RoundFolder,
        *,
        tools: list[dict[str, Any]] | None = None,
        stream: bool = True,
        **params: Any,
    ) -> AsyncIterator[Event]:
        """Send one request; yield its delta events while ``folder`` accumulates the message.

        Raises ``ModelAPIError`` for an HTTP error (after the client's retries), a broken
        stream, or an error the server sends inside the stream. What arrived before a
        failure stays in ``folder``.
        """
        body = self._body(messages, tools, stream, params)
        with _translated_errors(folder):
            async with self.async_client() as client:
                # client.post skips the SDK's walk over the request body, which costs
                # ~0.3 s for a 600-message history; auth, retries and errors are the same.
                response = await client.post(
                    "/chat/completions", body=body, cast_to=_response_class(), stream=True
                )
                try:
                    if not stream:
                        for event in folder.feed(
                            _Chunk.model_validate_json(await response.aread())
                        ):
                            yield event
                        return
                    parser = _SSEParser()
                    async for data in response.aiter_bytes():
                        for payload in parser.feed(data):
                            for event in folder.feed(_Chunk.model_validate_json(payload)):
                                yield event
                        if parser.done:
                            break
                    _check_complete(parser, folder)
                finally:
                    await response.aclose()

    def stream_sync(
        self,
        messages: list[dict[str, Any]],
        folder: RoundFolder,
        *,
        tools: list[dict[str, Any]] | None = None,
        stream: bool = True,
        **params: Any,
    ) -> Iterator[Event]:
        """The same request as ``astream``, for code without an event loop."""
        body = self._body(messages, tools, stream, params)
        with _translated_errors(folder):
            response = self.sync_client().post(
                "/chat/completions", body=body, cast_to=_response_class(), stream=True
            )
            try:
                if not stream:
                    yield from folder.feed(_Chunk.model_validate_json(response.read()))
                    return
                parser = _SSEParser()
                for data in response.iter_bytes():
                    for payload in parser.feed(data):
                        yield from folder.feed(_Chunk.model_validate_json(payload))
                    if parser.done:
                        break
                _check_complete(parser, folder)
            finally:
                response.close()

    def usage_event(
        self,
        folder: RoundFolder,
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
        from ._pricing import request_cost

        usage = folder.usage
        cost, provider = request_cost(self.model, self.settings.base_url, usage)
        if usage is None and error is not None and error.status_code is not None:
            usage, cost = RequestUsage(prompt_tokens=0, completion_tokens=0), 0.0
        return UsageEvent(
            session_id=folder.session_id,
            turn_id=folder.turn_id,
            round=folder.round,
            model=self.model,
            provider=provider,
            usage=usage,
            cost_usd=cost,
            ttft_ms=folder.ttft_ms,
            duration_ms=(time.perf_counter() - folder.started) * 1000,
            finish_reason=folder.finish_reason,
            error=str(error) if error else ("interrupted" if interrupted else None),
            purpose=purpose,
        )

    async def list_models(self) -> list[str]:
        """The model ids the server offers (``GET /models``)."""
        import openai

        try:
            async with self.async_client() as client:
                page = await client.models.list()
        except openai.APIError as exc:
            raise _api_error(exc, None) from exc
        return sorted(m.id for m in page.data)


def _response_class() -> type[Any]:
    """The HTTP response class the ``openai`` client is built on (httpx, or its fork)."""
    import openai

    return openai._httpx.Response  # type: ignore[attr-defined,no-any-return]


@contextlib.contextmanager
def _translated_errors(folder: RoundFolder) -> Iterator[None]:
    """Turn whatever the transport or the server raised into one ``ModelAPIError``."""
    import openai

    try:
        yield
    except openai.APIError as exc:
        raise _api_error(exc, folder) from exc
    except ModelAPIError:
        raise
    except (OSError, ValueError) as exc:  # transport failures, undecodable payloads
        raise _broken_stream(exc, folder) from exc
    except Exception as exc:
        # httpx signals a cut connection with its own exception classes.
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise _broken_stream(exc, folder) from exc
        raise


def _check_complete(parser: _SSEParser, folder: RoundFolder) -> None:
    if not parser.done and folder.finish_reason is None:
        raise ModelAPIError(
            f"The model's stream ended early after {folder.chunks} chunks "
            "(no finish reason, no [DONE]); the partial reply was kept."
        )


def _broken_stream(exc: BaseException, folder: RoundFolder) -> ModelAPIError:
    return ModelAPIError(
        f"The model's stream broke after {folder.chunks} chunks ({type(exc).__name__}: {exc}); "
        "the partial reply was kept."
    )


def _api_error(exc: Any, folder: RoundFolder | None) -> ModelAPIError:
    import openai

    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    if isinstance(exc, openai.APITimeoutError):
        message = "The model server did not answer in time (after retries)."
    elif isinstance(exc, openai.APIConnectionError):
        message = f"Could not connect to the model server ({exc.__cause__ or exc})."
    elif isinstance(exc, openai.APIStatusError):
        detail = exc.message
        message = f"The model server answered HTTP {status}: {detail}"
    else:
        message = f"The model server failed: {exc}"
    if folder is not None and folder.chunks:
        message += f" The stream broke after {folder.chunks} chunks; the partial reply was kept."
    code = getattr(exc, "code", None)
    return ModelAPIError(message, status_code=status, body=body, code=str(code) if code else None)
