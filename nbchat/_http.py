"""The HTTP client under ``openai``, and the transport nbchat gives it.

openai 1.x is built on httpx, later versions on its fork httpx2. nbchat needs that
library's Response class (to ask ``client.post`` for the raw response) and its error
classes (a stream cut or stalled mid-way raises them unwrapped); both come from here.

Under that client the transport is aiohttp when it is installed (openai's ``aiohttp``
extra, which nbchat depends on): its C parser hands over whatever the socket holds in
one read, where httpx's own stack (httpcore, h11) makes an event of every chunked frame
and passes it up through several async layers — most of nbchat's time per streamed
chunk. ``NBCHAT_HTTP_TRANSPORT=httpx`` keeps httpx's transport; without aiohttp it is
the one used. Either way the errors nbchat sees are the HTTP library's (see
``_aiohttp_client_class``), so the rest of nbchat does not know which one ran.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from ._exceptions import ConfigError

if TYPE_CHECKING:
    import ssl

__all__ = [
    "TRANSPORT_ENV",
    "counting_attempts",
    "http_client",
    "transport_cause",
    "transport_of",
]

logger = logging.getLogger("nbchat")

TRANSPORT_ENV = "NBCHAT_HTTP_TRANSPORT"
Transport = Literal["aiohttp", "httpx"]


@functools.cache
def _http_library() -> Any:
    """The module (``httpx`` or ``httpx2``) whose client the installed ``openai`` uses.

    Found through public names only: ``openai.DefaultAsyncHttpxClient`` subclasses that
    library's ``AsyncClient``, which both libraries export under their own module name.
    """
    import openai

    for base in openai.DefaultAsyncHttpxClient.__mro__[1:]:
        module = sys.modules.get(base.__module__)
        if module is not None and base is getattr(module, "AsyncClient", None):
            return module
    raise ImportError(
        "nbchat cannot find the HTTP library under this openai version "
        f"({openai.__version__}): openai.DefaultAsyncHttpxClient is not an httpx AsyncClient."
    )


def _ssl_env() -> tuple[str | None, str | None]:
    """What in the environment changes the default SSL context (the CA file or folder)."""
    return os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")


@functools.cache
def _ssl_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """The HTTP library's default SSL context, built once per CA setting: a context is
    not tied to a loop or a thread, and building one costs ~40 ms."""
    context: ssl.SSLContext = _http_library().create_ssl_context()
    return context


def _response_class() -> type[Any]:
    """The raw HTTP response class ``client.post(cast_to=...)`` hands back unparsed."""
    return _http_library().Response  # type: ignore[no-any-return]


@functools.cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a cut, stalled or undecodable connection raises while a body is read."""
    http = _http_library()
    return (http.HTTPError, http.StreamError, OSError, *_aiohttp_errors())


def _transport_setting() -> Literal["aiohttp", "httpx", ""]:
    value = os.environ.get(TRANSPORT_ENV, "").strip().lower()
    if value not in ("", "aiohttp", "httpx"):
        raise ConfigError(f"{TRANSPORT_ENV} is 'aiohttp' or 'httpx' (or unset), not {value!r}.")
    return value  # type: ignore[return-value]


# The HTTP attempts of the request being sent, when someone is counting: one entry per
# attempt, its status code once the server answered (None: no answer came).
_attempts: contextvars.ContextVar[list[int | None] | None] = contextvars.ContextVar(
    "nbchat_http_attempts", default=None
)


@contextlib.contextmanager
def counting_attempts(into: list[int | None]) -> Iterator[None]:
    """Record into ``into`` each HTTP attempt the client makes inside the block.

    The openai client retries a 429, a 5xx or a lost connection by itself, so one
    ``client.post`` can be several attempts; the hooks ``http_client`` installs (httpx's
    public ``event_hooks``, which its aiohttp transport keeps) see each one. The block
    runs in one task, so a concurrent request elsewhere counts into its own list.
    """
    token = _attempts.set(into)
    try:
        yield
    finally:
        _attempts.reset(token)


async def _on_request(request: Any) -> None:
    seen = _attempts.get()
    if seen is not None:
        seen.append(None)


async def _on_response(response: Any) -> None:
    seen = _attempts.get()
    if seen is None or not seen or seen[-1] is not None:
        return
    if response.is_redirect:  # followed: the next request is the same attempt
        seen.pop()
    else:
        seen[-1] = response.status_code


_HOOKS: dict[str, list[Callable[[Any], Awaitable[None]]]] = {
    "request": [_on_request],
    "response": [_on_response],
}


def http_client(timeout: float) -> Any:
    """A new async HTTP client for an ``openai`` client: on aiohttp unless
    ``NBCHAT_HTTP_TRANSPORT=httpx`` or aiohttp is missing, with the shared SSL context.

    The SDK's own default loads the CA bundle into a new SSL context for every client
    (~40 ms, paid each turn on a loop other than nbchat's own); this is the same client
    with one context per CA setting.
    """
    import openai

    setting = _transport_setting()
    verify = _ssl_context(*_ssl_env())
    if setting != "httpx":
        aiohttp_client = _aiohttp_client_class()
        if aiohttp_client is not None:
            try:
                return aiohttp_client(verify=verify, timeout=timeout, event_hooks=_HOOKS)
            except RuntimeError as exc:  # openai says its aiohttp extra is not installed
                logger.debug("aiohttp transport unavailable: %s", exc)
        if setting == "aiohttp":
            raise ConfigError(
                f"{TRANSPORT_ENV}=aiohttp, but this openai cannot use aiohttp: "
                "pip install 'openai[aiohttp]' (or unset it to use httpx)."
            )
    return openai.DefaultAsyncHttpxClient(verify=verify, timeout=timeout, event_hooks=_HOOKS)


def transport_of(client: Any) -> Transport:
    """Which transport an HTTP client from ``http_client`` uses."""
    aiohttp_client = _aiohttp_client_class()
    return "aiohttp" if aiohttp_client and isinstance(client, aiohttp_client) else "httpx"


def transport_cause(exc: BaseException) -> BaseException:
    """The error to describe for ``exc``: aiohttp's own when the adapter wrapped it in a
    timeout it was not (a refused or dropped connection arrives as ``ConnectTimeout``)."""
    cause = exc.__cause__
    if isinstance(cause, _aiohttp_errors()) and not isinstance(cause, TimeoutError):
        return cause
    return exc


def never_connected(exc: BaseException) -> bool:
    """Whether ``exc`` (openai's connection error) came from a connection that was never
    made: nothing reached the server, so nothing can have been billed. Both transports
    raise httpx's ``ConnectError`` for it (``_aiohttp_client_class``)."""
    connect_error = _http_library().ConnectError
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, connect_error):
            return True
        seen = seen.__cause__
    return False


def connect_reason(exc: BaseException) -> str | None:
    """Why a connection was never made, in words (None: not known): the operating
    system's error under the transport's, without its addresses and errno."""
    import ssl

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused: nothing listens there"
        if isinstance(seen, socket.gaierror):
            return "the host name could not be resolved"
        if isinstance(seen, ssl.SSLError):
            return f"TLS failed: {seen.reason or seen}"
        if isinstance(seen, TimeoutError):
            return "timed out while connecting"
        seen = seen.__cause__ or seen.__context__
    return None


def cut_short(exc: BaseException) -> bool:
    """Whether ``exc`` says the server closed the connection before a reply's end (httpx
    and aiohttp each have their own error for it)."""
    payload: tuple[type[BaseException], ...] = ()
    if _aiohttp_errors():
        import aiohttp

        payload = (aiohttp.ClientPayloadError,)
    return isinstance(exc, (_http_library().RemoteProtocolError, *payload))


@functools.cache
def _aiohttp_errors() -> tuple[type[BaseException], ...]:
    """aiohttp's error base class when aiohttp is installed (imported by openai then)."""
    if _aiohttp_client_class() is None:
        return ()
    import aiohttp

    return (aiohttp.ClientError,)


@functools.cache
def _aiohttp_client_class() -> type[Any] | None:
    """``openai.DefaultAioHttpClient`` with errors as httpx raises them; ``None`` when this
    openai has no aiohttp client or aiohttp is not installed.

    openai's aiohttp adapter maps every aiohttp connection error to ``ConnectTimeout``
    (a refused connection would read "did not answer in time") and lets a reply that is
    not HTTP escape as aiohttp's own error, past openai's retries. Here each becomes the
    error httpx raises for it (``ConnectError``, ``ReadError``, ``RemoteProtocolError``),
    so retries, messages and nbchat's checks are the same on both transports.
    """
    import openai

    base = getattr(openai, "DefaultAioHttpClient", None)
    if base is None or importlib.util.find_spec("aiohttp") is None:
        return None
    import aiohttp

    http = _http_library()

    def as_http_error(exc: aiohttp.ClientError, request: Any) -> Exception:
        if isinstance(exc, aiohttp.ClientConnectorError):
            kind = http.ConnectError
        elif isinstance(exc, aiohttp.ClientOSError):
            kind = http.ReadError
        else:
            kind = http.RemoteProtocolError
        error: Exception = kind(str(exc), request=request)
        return error

    class AiohttpClient(base):  # type: ignore[misc,valid-type]
        """openai's aiohttp client, raising what httpx raises for each failure."""

        async def send(self, request: Any, **kwargs: Any) -> Any:
            try:
                return await super().send(request, **kwargs)
            except aiohttp.ClientError as exc:
                raise as_http_error(exc, request) from exc
            except http.TimeoutException as exc:
                cause = exc.__cause__
                if isinstance(cause, aiohttp.ClientError) and not isinstance(cause, TimeoutError):
                    raise as_http_error(cause, request) from cause
                raise

    return AiohttpClient
