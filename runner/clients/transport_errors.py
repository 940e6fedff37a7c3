"""What an HTTP transport raises for one request, translated into the call-error tree; and scrubbing secrets.

Measured against a raw socket server that answers with each kind of damage (tests/test_transport_faults.py):

- httpx's own transport raises httpx.TransportError subclasses (httpcore and h11 errors mapped to them:
  RemoteProtocolError for a bad status line, header or chunk and for a body cut short, ReadError for a
  reset), and httpx.DecodingError, which is not a TransportError, for a body whose Content-Encoding does
  not decode.
- httpx-aiohttp maps only part of aiohttp's tree, and loosely: every ClientConnectionError becomes
  httpx.ConnectTimeout (a reset or a disconnect included), ClientPayloadError becomes httpx.ReadError;
  the rest passes through as aiohttp raised it, notably ClientResponseError for a bad status line or
  header (its cause an aiohttp.http_exceptions.HttpProcessingError). So an httpx exception whose cause is
  an aiohttp one is judged by that cause.

Each becomes a TransientCallError with a stable code, except a request the transport refuses to send
(an illegal header, an unsupported URL), which fails the same way every time: a PermanentCallError.
"""

from __future__ import annotations

import asyncio
import re
import sys
from functools import cache
from typing import Iterable
from urllib.parse import quote

import h11
import httpx

from ..errors import CallError, PermanentCallError, TransientCallError

TIMEOUT = "timeout"
CONNECTION = "connection_error"
TRUNCATED = "truncated_body"
UNDECODABLE = "malformed_body"
PROTOCOL = "protocol_error"
UNSENDABLE = "invalid_request"

_WHAT = {
    TIMEOUT: "the request timed out",
    CONNECTION: "the connection failed",
    TRUNCATED: "the answer was cut short",
    UNDECODABLE: "the answer's body could not be decoded",
    PROTOCOL: "the answer broke the HTTP protocol",
    UNSENDABLE: "the request could not be sent",
}
_DETAIL_LIMIT = 300
# h11's words (through httpx) for a body that stopped before its Content-Length or last chunk, and for a
# connection closed before any answer; httpx gives both the same type as a malformed answer.
_H11_TRUNCATED = "complete message body"
_H11_DISCONNECTED = "disconnected without sending"


@cache
def transport_exceptions(with_aiohttp: bool) -> tuple[type[BaseException], ...]:
    """Every exception a transport can raise for one request, and nothing that would hide a bug in ours.

    OSError (ssl.SSLError and the ConnectionError family among them) and asyncio.IncompleteReadError
    cover a transport that lets the socket's own errors through; h11's errors one that does not map them.
    aiohttp's trees only when aiohttp is loaded (no aiohttp exception can be raised before it is)."""
    caught: tuple[type[BaseException], ...] = (httpx.HTTPError, h11.ProtocolError, OSError,
                                               asyncio.IncompleteReadError)
    if with_aiohttp:
        from aiohttp import ClientError
        from aiohttp.http_exceptions import HttpProcessingError

        caught += (ClientError, HttpProcessingError)
    return caught


def caught_exceptions() -> tuple[type[BaseException], ...]:
    return transport_exceptions("aiohttp" in sys.modules)


def call_error(exc: BaseException, *, secrets: Iterable[str] = ()) -> CallError:
    """The CallError for a transport's exception, its message free of secrets; chain it with `from exc`."""
    chain = _chain(exc)
    kind = _kind(chain)
    error_type = PermanentCallError if kind == UNSENDABLE else TransientCallError
    return error_type(f"{_WHAT[kind]} ({scrub(_detail(chain), secrets)})", code=kind)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first; an httpx exception that httpx-aiohttp made from an aiohttp
    one is left out, since its type says less than (or the opposite of) its cause."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(chain) < 16:
        seen.add(id(current))
        cause = current.__cause__ or _implicit_cause(current)
        if not (isinstance(current, httpx.HTTPError) and cause is not None and _from(cause, "aiohttp")):
            chain.append(current)
        current = cause
    return chain or [exc]


def _implicit_cause(exc: BaseException) -> BaseException | None:
    """The exception `exc` was raised while handling, when that one is the network's, not something it
    handled on the way. Followed even when suppressed: httpcore raises ReadError `from None` over the
    socket's ConnectionResetError, which is the only part that says what happened."""
    context = exc.__context__
    if context is not None and (isinstance(context, (OSError, EOFError, TimeoutError))
                                or _from(context, "aiohttp", "httpx", "httpcore", "h11", "anyio")):
        return context
    return None


def _from(exc: BaseException, *packages: str) -> bool:
    return type(exc).__module__.split(".", 1)[0] in packages


def _kind(chain: list[BaseException]) -> str:
    aiohttp = sys.modules.get("aiohttp")
    if any(isinstance(e, (httpx.LocalProtocolError, httpx.UnsupportedProtocol, h11.LocalProtocolError))
           for e in chain):
        return UNSENDABLE
    if aiohttp is not None and any(isinstance(e, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError))
                                   for e in chain):
        return UNSENDABLE
    if any(isinstance(e, (TimeoutError, httpx.TimeoutException)) for e in chain):
        return TIMEOUT
    if any(isinstance(e, asyncio.IncompleteReadError) or _H11_TRUNCATED in str(e) for e in chain):
        return TRUNCATED
    if aiohttp is not None:
        from aiohttp.http_exceptions import ContentEncodingError, ContentLengthError, TransferEncodingError

        if any(isinstance(e, (ContentLengthError, TransferEncodingError)) for e in chain):
            return TRUNCATED
        if any(isinstance(e, ContentEncodingError) for e in chain):
            return UNDECODABLE
    if any(isinstance(e, httpx.DecodingError) for e in chain):
        return UNDECODABLE
    if any(_H11_DISCONNECTED in str(e) for e in chain):
        return CONNECTION
    if any(isinstance(e, (httpx.RemoteProtocolError, h11.RemoteProtocolError)) for e in chain):
        return PROTOCOL
    if aiohttp is not None:
        from aiohttp.http_exceptions import HttpProcessingError

        if any(isinstance(e, (HttpProcessingError, aiohttp.ClientResponseError, aiohttp.ClientPayloadError))
               for e in chain):
            return PROTOCOL
    return CONNECTION


def _detail(chain: list[BaseException]) -> str:
    """The innermost exception that says something, as `Type: message` on one line."""
    for exc in reversed(chain):
        # aiohttp's exceptions keep their text in `.message`; their str() leads with a made-up status 400.
        message = getattr(exc, "message", None)
        text = message if isinstance(message, str) and message else str(exc)
        text = " ".join(text.split())
        if text:
            text = f"{type(exc).__name__}: {text}"
            return text if len(text) <= _DETAIL_LIMIT else text[:_DETAIL_LIMIT - 3] + "..."
    return type(chain[0]).__name__


# A header value a transport quotes back in its message: h11's `Illegal header value b'Bearer sk-...'`.
_QUOTED_HEADER_VALUE = re.compile(r"""(?i)(header value\s*:?\s*)b?('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
# A bearer token wherever it shows (a header echoed in a message, a repr of the request's headers).
_BEARER = re.compile(r"""(?i)(bearer\s+)[^\s'",;)}\]]+""")


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with header values that may hold a secret replaced by `***`: every spelling of each secret
    (as is, as Python's repr and bytes repr escape it, percent-encoded), anything after `Bearer `, and a
    quoted header value in an `Illegal header value ...` message."""
    for secret in secrets:
        if not secret:
            continue
        for spelling in _spellings(secret):
            text = text.replace(spelling, "***")
    text = _QUOTED_HEADER_VALUE.sub(r"\1b'***'", text)
    return _BEARER.sub(r"\1***", text)


def _spellings(secret: str) -> list[str]:
    spellings = {secret, repr(secret)[1:-1], ascii(secret)[1:-1], quote(secret, safe="", errors="surrogatepass"),
                 repr(secret.encode("utf-8", "surrogatepass"))[2:-1]}
    # The longest first, so a short spelling inside a longer one does not leave a piece of the longer behind.
    return sorted(spellings, key=len, reverse=True)
