"""What an OpenAI-compatible server sends, checked where it enters.

Chunks stay the JSON objects they arrive as (``ReplyAssembler`` checks the fields it reads);
the usage that comes once per request is validated here. Usage numbers become
non-negative BIGINT-sized ints or ``None``; JSON with lone surrogate escapes is repaired
to U+FFFD; ``SSEParser`` frames a byte stream into event payloads per the WHATWG spec.
All of this runs once per chunk, so it stays lean.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from operator import eq, is_
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import from_json

from ._exceptions import ModelAPIError
from ._text import valid_data
from ._types import RequestUsage

__all__ = [
    "REASONING_ITEM",
    "BodyEncoder",
    "PrefixCache",
    "SSEParser",
    "context_window_from_models",
    "context_window_from_props",
    "encode_json",
    "error_from_body",
    "load_json",
    "parse_chunk",
    "request_usage",
    "token_count",
    "truncation_notice",
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


# DuckDB stores token counts as BIGINT.
_BIGINT_MAX = 2**63 - 1


def token_count(value: Any) -> int | None:
    """A usage number as a non-negative BIGINT-sized int, or ``None`` (unknown).

    Servers send floats (rounded here), strings ("n/a", "12"), negatives and 2**64:
    none of it may cost the reply that came with it.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        n = value
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(number):
            return None
        n = round(number)
    return n if 0 <= n <= _BIGINT_MAX else None


def _object_or_none(value: Any) -> Any:
    return value if isinstance(value, dict) else None


_TokenCount = Annotated[int | None, BeforeValidator(token_count)]


def _cost_or_none(value: Any) -> float | None:
    """A reported cost in USD: a finite non-negative number, else ``None`` (unknown)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        cost = float(value)
    except ValueError:
        return None
    return cost if math.isfinite(cost) and cost >= 0 else None


class _TokenDetails(_Wire):
    cached_tokens: _TokenCount = None
    cache_write_tokens: _TokenCount = None
    reasoning_tokens: _TokenCount = None


_Details = Annotated[_TokenDetails | None, BeforeValidator(_object_or_none)]


class _Usage(_Wire):
    # Chat completions names, then the Responses API's names for the same counts.
    prompt_tokens: _TokenCount = None
    completion_tokens: _TokenCount = None
    prompt_tokens_details: _Details = None
    completion_tokens_details: _Details = None
    input_tokens: _TokenCount = None
    output_tokens: _TokenCount = None
    input_tokens_details: _Details = None
    output_tokens_details: _Details = None
    # Anthropic-compatible servers (and LiteLLM) report cache writes at the top level.
    cache_creation_input_tokens: _TokenCount = None
    # OpenRouter reports what the request cost, in USD.
    cost: Annotated[float | None, BeforeValidator(_cost_or_none)] = None


# The key under which a chunk's delta carries one of the Responses API's reasoning items
# (what ``_responses`` makes of ``response.output_item.done``); chat servers send none.
REASONING_ITEM = "reasoning_item"


def load_json(payload: bytes) -> Any:
    """JSON from the wire; text with lone surrogate escapes (``"\\udcff"``) is repaired.

    pydantic's parser (jiter) is three times faster than ``json.loads`` on bytes, and
    refuses lone surrogate escapes; the standard library accepts them (and NaN), and
    ``valid_data`` turns each surrogate into U+FFFD. Only the refused payloads pay.
    """
    try:
        return from_json(payload)
    except ValueError:
        data = json.loads(payload)
    return valid_data(data) if b"\\u" in payload else data


def parse_chunk(payload: bytes) -> dict[str, Any]:
    """One ``chat.completion.chunk`` (or a whole non-streamed reply) as its JSON object.

    Chunks stay the dicts the JSON parser made: building validated models per chunk
    cost more than the transport. ``ReplyAssembler`` checks each field it reads.
    """
    chunk = load_json(payload)
    if not isinstance(chunk, dict):
        raise ValueError(f"a chunk is a JSON object, got {payload[:60]!r}")
    return chunk


def request_usage(raw: Any) -> RequestUsage | None:
    """The usage a server reported, every count checked; ``None`` if it sent no object."""
    if not isinstance(raw, dict):
        return None
    u = _Usage.model_validate(raw)
    prompt_details = u.prompt_tokens_details or u.input_tokens_details or _TokenDetails()
    completion_details = u.completion_tokens_details or u.output_tokens_details or _TokenDetails()
    cache_write = prompt_details.cache_write_tokens
    if cache_write is None:
        cache_write = u.cache_creation_input_tokens
    prompt = u.prompt_tokens if u.prompt_tokens is not None else u.input_tokens
    cached = prompt_details.cached_tokens
    if cached is not None and prompt is not None and cached > prompt:
        cached = None  # cached tokens are part of the prompt: more cannot be right
    return RequestUsage(
        prompt_tokens=prompt,
        completion_tokens=(
            u.completion_tokens if u.completion_tokens is not None else u.output_tokens
        ),
        cached_tokens=cached,
        reasoning_tokens=completion_details.reasoning_tokens,
        cache_write_tokens=cache_write,
        reported_cost_usd=u.cost,
    )


# ------------------------------------------------------------ what servers say about themselves

# Where servers put a model's context window in their /models entries: vLLM, OpenRouter,
# Groq and others, LM Studio, LiteLLM.
_WINDOW_KEYS = (
    "max_model_len",
    "context_length",
    "context_window",
    "max_context_length",
    "max_input_tokens",
)


def context_window_from_models(body: Any, model: str) -> int | None:
    """The context window a ``GET /models`` answer gives for ``model``, if any."""
    data = body.get("data") if isinstance(body, dict) else None
    for entry in data if isinstance(data, list) else []:
        if isinstance(entry, dict) and entry.get("id") == model:
            for key in _WINDOW_KEYS:
                window = token_count(entry.get(key))
                if window:
                    return window
            top = entry.get("top_provider")
            if isinstance(top, dict) and token_count(top.get("context_length")):
                return token_count(top.get("context_length"))
    return None


def context_window_from_props(body: Any) -> int | None:
    """``n_ctx`` from llama.cpp's ``GET /props`` (the size the server was started with)."""
    if not isinstance(body, dict):
        return None
    settings = body.get("default_generation_settings")
    for place in (settings, body):
        if isinstance(place, dict) and token_count(place.get("n_ctx")):
            return token_count(place.get("n_ctx"))
    return None


# A prompt the server counted at under this share of the calibrated estimate was cut.
TRUNCATION_RATIO = 0.6
# Below this many estimated tokens an estimate is too rough to call anything a cut.
TRUNCATION_MIN_TOKENS = 1000


def truncation_notice(estimated: int, reported: int | None, window: int | None) -> str | None:
    """One line saying the server probably cut the prompt silently, or ``None``.

    Some servers (llama.cpp, Ollama) drop the start of a prompt longer than their
    context instead of refusing it: the sign is a reported ``prompt_tokens`` far below
    what was sent (< 60 % of the calibrated estimate, for a prompt of ≥ 1,000 tokens).
    """
    if not reported or estimated < TRUNCATION_MIN_TOKENS:
        return None
    if reported >= estimated * TRUNCATION_RATIO:
        return None
    fit = f"its context window ({window:,} tokens)" if window else "its context window"
    return (
        f"The server counted {reported:,} prompt tokens where about {estimated:,} were sent: "
        f"it probably cut the conversation to fit {fit} without saying so. Compact or start "
        "a new session, or give the server a larger context."
    )


def error_from_body(body: Any, status_code: int | None = None) -> ModelAPIError:
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


class SSEParser:
    """Splits a byte stream into the ``data`` of its SSE events; notes ``[DONE]``.

    Per the WHATWG spec: a line ends with LF, CRLF or a bare CR; an event ends at a
    blank line and its ``data:`` lines are joined with LF; comments (``: ping``) and
    other fields (``event:``, ``id:``) are skipped. This runs once per chunk: the
    common event, one ``data:`` line, costs a few attribute-free operations.
    """

    __slots__ = ("buffer", "data", "done", "events")

    def __init__(self) -> None:
        self.buffer = b""
        self.data: list[bytes] = []  # the data lines of the event being read
        self.done = False
        self.events = 0  # events with data, [DONE] included

    def feed(self, chunk: bytes) -> list[bytes]:
        """The payloads of the events ``chunk`` completes (with what came before it)."""
        if (
            # The common read: exactly one event of one data line, nothing held over.
            chunk[-2:] == b"\n\n"
            and chunk[:5] == b"data:"
            and chunk.find(b"\n") == len(chunk) - 2
            and not self.buffer
            and not self.data
            and b"\r" not in chunk
        ):
            self.events += 1
            payload = chunk[5:-2].strip()
            if payload == b"[DONE]":
                self.done = True
                return []
            return [payload] if payload else []
        buffer = self.buffer + chunk
        held = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):  # its LF may come in the next read
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in buffer:
            self.buffer = buffer + held
            return []
        *lines, rest = buffer.split(b"\n")
        self.buffer = rest + held
        payloads: list[bytes] = []
        data = self.data
        n = 0
        for line in lines:
            if line:
                if line.startswith(b"data:"):
                    data.append(line[5:])
            elif data:  # a blank line ends an event
                if len(data) == 1:
                    payload = data.pop().strip()
                else:  # the spec drops one space after each "data:"
                    payload = b"\n".join(d[1:] if d[:1] == b" " else d for d in data).strip()
                    data.clear()
                n += 1
                if payload == b"[DONE]":
                    self.done = True
                elif payload:
                    payloads.append(payload)
        self.events += n
        return payloads

    def close(self) -> list[bytes]:
        """At the end of the body: the payload of a last event left unterminated."""
        return self.feed(b"\n\n") if self.buffer or self.data else []


# --------------------------------------------------------------------------- request bodies

_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_json(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON; text UTF-8 cannot encode (a lone surrogate from a
    non-UTF-8 file name) goes as U+FFFD."""
    try:
        return _JSON.encode(obj).encode()
    except UnicodeEncodeError:
        return _JSON.encode(valid_data(obj)).encode()


_S = TypeVar("_S")
_T = TypeVar("_T")


def shared_prefix(
    old: Sequence[Any], new: Sequence[Any], same: Callable[[Any, Any], Any] = is_
) -> int:
    """How many leading elements ``old`` and ``new`` share (by identity, or ``same``)."""
    if all(map(same, old, new)):  # the usual case, checked without a Python loop
        return min(len(old), len(new))
    return next(i for i, (a, b) in enumerate(zip(old, new, strict=False)) if not same(a, b))


class PrefixCache(Generic[_S, _T]):
    """``convert`` of each element of a list, kept for the next list that begins with
    the same elements: a conversation is what was sent last time plus what came since,
    so only what came since is converted again.

    Elements match by identity (the cache holds them, so an identity stays theirs) and,
    with ``stamp``, by what ``stamp`` reads off them, up to the first that differs (a
    compaction or a re-run cell replaced part of the list): from there each is
    converted again. Checking a 2,000-element prefix is ~0.1 ms, where keeping the
    results by id cost a Python loop over the whole list on every request.
    """

    def __init__(
        self, convert: Callable[[_S], _T], stamp: Callable[[_S], Any] | None = None
    ) -> None:
        self._convert = convert
        self._stamp = stamp
        self._sources: list[_S] = []
        self._stamps: list[Any] = []
        self._results: list[_T] = []

    def __len__(self) -> int:
        """How many results are kept."""
        return len(self._results)

    def convert(
        self,
        sources: Sequence[_S],
        convert: Callable[[_S], _T] | None = None,
        *,
        reuse_below: int | None = None,
    ) -> list[_T]:
        """The results for ``sources`` (a new list each call); ``convert`` for this call
        only, ``reuse_below``: convert again from that index on, even if unchanged."""
        n = shared_prefix(self._sources, sources)
        stamps: list[Any] = []
        if self._stamp is not None:
            stamps = list(map(self._stamp, sources))
            n = min(n, shared_prefix(self._stamps, stamps, eq))
        if reuse_below is not None:
            n = min(n, reuse_below)
        results = self._results[:n]
        results += map(convert or self._convert, sources[n:])
        self._sources, self._stamps, self._results = list(sources), stamps, results
        return list(results)


class BodyEncoder:
    """JSON bytes of request bodies, each message (or input item) encoded once.

    A conversation sends the same messages again on every request; the session hands
    the same dicts each time, so their encodings are kept (``PrefixCache``) and a body
    is spliced together from them, instead of serialising a 2,000-message history from
    scratch for each request.
    """

    def __init__(self) -> None:
        self._parts: PrefixCache[Any, bytes] = PrefixCache(encode_json)

    def encode(self, body: dict[str, Any], key: str = "messages") -> bytes:
        """``body`` encoded; only the entries of ``body[key]`` (chat ``messages``,
        Responses ``input`` items) not sent before are serialised."""
        messages = body.get(key)
        if not isinstance(messages, list) or list(body)[:2] != ["model", key]:
            return encode_json(body)
        parts = self._parts.convert(messages)
        head = encode_json({**body, key: []})
        # The only key before it is "model", a plain string: the first match is the key.
        mark = b'"' + key.encode() + b'":[]'
        at = head.index(mark) + len(mark) - 1
        return head[:at] + b",".join(parts) + head[at:]
