"""What a failed model request tells the user: every failure as one ``ModelAPIError``.

Whatever goes wrong while a request is sent or its answer read — an HTTP error after
the SDK's retries, a refused connection, a timeout or a stalled stream, a stream cut
short, a 200 whose body is a web page — leaves ``translated_errors`` as one
``ModelAPIError`` whose message says what happened in the user's terms (which server,
how long it waited, how much of the reply arrived and was kept), with the key and
anything shaped like one redacted from its message, body and code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._exceptions import ModelAPIError
from ._http import (
    _http_library,
    _transport_errors,
    connect_reason,
    cut_short,
    never_connected,
    transport_cause,
)
from ._text import counted, redact, redact_data, valid_data, valid_text

if TYPE_CHECKING:
    import openai

    from ._assembler import ReplyAssembler
    from ._client import ModelClient
    from ._config import ClientSettings
    from ._wire import SSEParser

__all__ = ["NEVER_CONNECTED", "check_complete", "describe", "not_expected", "translated_errors"]

# ModelAPIError.code of a request whose connection was never made (nothing was sent).
NEVER_CONNECTED = "never_connected"

logger = logging.getLogger("nbchat")

# How much of a body that is not what was expected gets quoted in the error.
_QUOTE_CHARS = 120
# Keyless endpoints that answered 401 and were warned about (once each).
_warned_keyless: set[str] = set()


@contextlib.contextmanager
def translated_errors(
    client: ModelClient, assembler: ReplyAssembler | None, *, stream: bool
) -> Iterator[None]:
    """Turn whatever the transport or the server raised into one ``ModelAPIError``,
    with the key and anything shaped like one redacted from its message and body."""
    import openai

    try:
        try:
            yield
        except openai.APIError as exc:
            raise _api_error(client, exc, assembler, stream) from exc
        except ModelAPIError:
            raise
        except _transport_errors() as exc:
            raise _transport_error(client, exc, assembler, stream) from exc
        except ValueError as exc:  # undecodable or invalid payloads
            raise _broken_stream(exc, assembler) from exc
    except ModelAPIError as error:
        clean = _cleaned(error, _secrets(client.settings))
        if clean is error:
            raise
        raise clean from None  # the original and its cause may hold the secret


def not_expected(
    settings: ClientSettings, content_type: str, head: bytes, expected: str
) -> ModelAPIError:
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
    shown = f"first line: {redact(line, *_secrets(settings))!r}" if line else "an empty body"
    return ModelAPIError(
        f"The model server at {settings.base_url} answered HTTP 200 with {what}, "
        f"not {expected} ({shown}). Check base_url: it should be an OpenAI-compatible "
        "API (usually ending in /v1), not a web page, a login page or a proxy's page."
    )


def check_complete(parser: SSEParser, assembler: ReplyAssembler) -> None:
    """Raise if the stream ended without saying it was done (a cut the socket hid)."""
    if not parser.done and assembler.finish_reason is None:
        raise ModelAPIError(
            f"The model's stream ended early after {assembler.chunks} chunks "
            "(no finish reason, no [DONE]); the partial reply was kept."
        )


def describe(exc: BaseException) -> str:
    """``Type: message``, never an empty message (httpx timeouts often have none)."""
    text = str(exc).strip()
    if not text and exc.__cause__ is not None:
        text = str(exc.__cause__).strip()
    if not text:
        doc = (type(exc).__doc__ or "").strip().splitlines()
        text = doc[0].rstrip(".") if doc else "no detail given"
    return f"{type(exc).__name__}: {text}"


def _secrets(settings: ClientSettings) -> tuple[str, ...]:
    return (settings.api_key.get_secret_value(),)


def _transport_error(
    client: ModelClient, exc: BaseException, assembler: ReplyAssembler | None, stream: bool
) -> ModelAPIError:
    http = _http_library()
    exc = transport_cause(exc)
    if isinstance(exc, http.ReadTimeout):
        n = assembler.chunks if assembler is not None else 0
        if stream and client.stall_timeout is not None:
            return ModelAPIError(
                f"The model server stopped sending for {client.stall_timeout:g} s "
                f"(stall_timeout) after {n} chunks; the partial reply was kept."
            )
        return ModelAPIError(
            f"The model server sent nothing for {client.timeout:g} s (timeout) while "
            f"answering; {n} chunks arrived."
        )
    return _broken_stream(exc, assembler)


def _api_error(
    client: ModelClient,
    exc: openai.APIError,
    assembler: ReplyAssembler | None,
    stream: bool,
) -> ModelAPIError:
    import openai

    settings = client.settings
    url = settings.base_url
    status = getattr(exc, "status_code", None)
    # The attempts the transport saw (``_http.counting_attempts``); else what the
    # client's retry setting allows (a request sent without counting).
    made = len(assembler.attempts) if assembler is not None else 0
    tries = counted(made or client.max_retries + 1, "attempt")
    if isinstance(exc, openai.APITimeoutError):
        waits = f"connect/answer timeout {client.timeout:g} s"
        if stream and client.stall_timeout is not None:
            waits += f", nothing sent for {client.stall_timeout:g} s (stall_timeout)"
        message = f"The model server at {url} did not answer in time ({waits}; {tries})."
    elif isinstance(exc, openai.APIConnectionError):
        cause = describe(exc.__cause__) if exc.__cause__ else describe(exc)
        if never_connected(exc):
            cause = connect_reason(exc) or cause
        message = f"Could not connect to the model server at {url} ({cause}; {tries})."
    elif isinstance(exc, openai.APIStatusError):
        message = f"The model server answered HTTP {status}: {_said(exc)}"
        retried = made > 1 if made else bool(client.max_retries) and _retried(exc)
        if retried:  # a 429 line had hidden its retries
            message = f"{message.rstrip().rstrip('.')} ({tries})."
        if status == 401 and settings.keyless:
            message = _keyless_401(settings, exc.message)
        elif status == 401:
            message = _sentence(message) + " " + settings.key_hint()
    else:
        message = f"The model server failed: {describe(exc)}"
    if assembler is not None and assembler.chunks:
        message += f" The stream broke after {assembler.chunks} chunks; the partial reply was kept."
    code = getattr(exc, "code", None)
    if isinstance(exc, openai.APIConnectionError) and never_connected(exc):
        code = NEVER_CONNECTED
    return ModelAPIError(
        message, status_code=status, body=exc.body, code=str(code) if code else None
    )


def _retried(exc: openai.APIStatusError) -> bool:
    """Whether the openai client retried this status before raising it: 408, 409, 429
    and 5xx, unless the server's ``x-should-retry`` header said not to (the SDK's
    documented retry rule)."""
    should = exc.response.headers.get("x-should-retry")
    if should in ("true", "false"):
        return should == "true"
    return exc.status_code in (408, 409, 429) or exc.status_code >= 500


def _keyless_401(settings: ClientSettings, detail: str) -> str:
    """The message for a 401 from a server nbchat sent no key to; logged once per URL."""
    message = (
        f"The model server at {settings.base_url} wants an API key (HTTP 401: {detail}), "
        f"and none is configured for it. {settings.key_hint()}"
    )
    if settings.base_url not in _warned_keyless:
        _warned_keyless.add(settings.base_url)
        logger.warning("%s", message)
    return message


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


def _broken_stream(exc: BaseException, assembler: ReplyAssembler | None) -> ModelAPIError:
    n = assembler.chunks if assembler is not None else 0
    why = "the server closed the connection before its end" if cut_short(exc) else describe(exc)
    return ModelAPIError(
        f"The model's stream broke after {n} chunks ({why}); the partial reply was kept."
    )


def _sentence(text: str) -> str:
    """``text`` ending as a sentence does, so another can follow it."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _said(exc: Any) -> str:
    """What an HTTP error says: its body's ``message`` when there is one, else the SDK's
    text (``Error code: 500 - {...}``, which would repeat the status)."""
    body = getattr(exc, "body", None)
    said = body.get("message") if isinstance(body, dict) else None
    return said if isinstance(said, str) and said.strip() else str(exc.message)
