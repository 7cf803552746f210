r"""What keeps `attnscope serve` safe on a machine with other users: typed request errors, size limits, the
``Host`` allow-list and the bounded work queue.

* **Typed errors.** Every error a request can meet is an :class:`~attnscope.errors.AttnscopeError` whose class
  names its HTTP status (:func:`http_status`); the message text never decides the status.
* **Limits.** A request body over :data:`MAX_BODY_BYTES` is refused (413) before it is read; a text over
  :data:`MAX_CHARS` characters or :data:`MAX_TOKENS` tokens is refused (413) after tokenising and before any
  model work.  The attention endpoint has its own, smaller limit (:data:`MAX_ATTENTION_TOKENS`).
* **Host allow-list** (:func:`allowed_hosts`, :class:`GuardMiddleware`): a browser page on another site could
  otherwise reach the server through DNS rebinding; only the names the server was started for are answered.
* **Work queue** (:class:`WorkQueue`): the model work of every request runs on one worker thread, behind a
  queue of bounded depth; a request that finds the queue full gets 429 at once.  So at most one request's
  model work is in memory at a time, whatever the number of clients.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

from attnscope.core.errors import AttnscopeError, IndexOutOfRangeError

MAX_CHARS = 200_000  # characters per text (a cheap first bound)
MAX_TOKENS = 16_384  # tokens per text: what bounds the model work and the answer
MAX_BODY_BYTES = 5_000_000  # a request body (two texts of MAX_CHARS characters, JSON-escaped, fit)
MAX_ATTENTION_TOKENS = 256  # tokens of text whose attention patterns one request may ask for
WINDOW_BATCH_BYTES = 64_000_000  # activations of the windows one forward pass analyses together (serve/analysis.py)
QUEUE_DEPTH = 4  # requests running or waiting for the model; one more gets 429
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")

T = TypeVar("T")


class RequestError(AttnscopeError):
    """A request the server refuses; the class's ``http_status`` is the answer's status."""

    http_status: ClassVar[int] = 400


class InvalidTextError(RequestError):
    """The text is not valid Unicode (e.g. a lone surrogate)."""


class TextTooLongError(RequestError):
    """A text over :data:`MAX_CHARS` characters or :data:`MAX_TOKENS` tokens."""

    http_status = 413


class BodyTooLargeError(RequestError):
    """A request body over :data:`MAX_BODY_BYTES`."""

    http_status = 413


class QueueFullError(RequestError):
    """Every place in the work queue is taken."""

    http_status = 429


class HostNotAllowedError(RequestError):
    """The request's ``Host`` header is not one this server was started for."""

    http_status = 400  # as Starlette's TrustedHostMiddleware


def http_status(err: AttnscopeError) -> int:
    """The HTTP status of a user-facing error, from its class alone."""
    if isinstance(err, IndexOutOfRangeError):
        return 404
    return int(getattr(type(err), "http_status", 400))


def check_text(text: str, what: str = "the text") -> None:
    """Valid Unicode and at most :data:`MAX_CHARS` characters (cheap checks, before tokenising)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidTextError(f"{what} is not valid Unicode (character {err.start} is a lone surrogate "
                               f"{text[err.start]!r}); send UTF-8 text") from None
    if len(text) > MAX_CHARS:
        raise TextTooLongError(f"{what} has {len(text)} characters, more than {MAX_CHARS}; analyse a shorter excerpt")


def check_tokens(n_tokens: int, what: str = "the text", limit: int = MAX_TOKENS) -> None:
    if n_tokens > limit:
        raise TextTooLongError(f"{what} has {n_tokens} tokens, more than {limit} tokens; analyse a shorter excerpt")


CHUNK_CHARS = 4096  # the token pre-count tokenises the text in pieces of about this many characters


def _cuts(text: str, size: int) -> list[int]:
    """Piece boundaries about ``size`` characters apart, moved back to just before a whitespace character when
    one lies near (the usual pre-tokenisers split there, so the pieces' token counts add up to the whole's)."""
    cuts, i = [0], 0
    while len(text) - i > size:
        j = i + size
        k = max(text.rfind(" ", j - 256, j), text.rfind("\n", j - 256, j))
        cuts.append(k if k > i else j)
        i = cuts[-1]
    return cuts + [len(text)]


def precheck_tokens(count: Callable[[str], int], text: str, limit: int = MAX_TOKENS, what: str = "the text") -> None:
    """Refuse a text that surely has more than ``limit`` tokens, at a cost bounded by about ``limit`` tokens of
    tokenising: the text is counted piece by piece and the count stops once it passes ``limit`` plus a margin
    for the pieces' boundaries.  (Tokenising 200,000 emoji whole takes seconds: they form one pre-token.)  A
    text of at most ``limit`` UTF-8 bytes is never counted (no tokenizer here gives more tokens than bytes)."""
    if len(text) <= limit and len(text.encode("utf-8")) <= limit:
        return
    n, margin, cuts = 0, 64, _cuts(text, CHUNK_CHARS)
    for a, b in zip(cuts, cuts[1:]):
        n += count(text[a:b])
        if n > limit + margin:
            raise TextTooLongError(f"{what} has more than {limit} tokens ({n}+ in its first {b} characters); "
                                   "analyse a shorter excerpt")


# ---------------------------------------------------------------------------------------------- Host allow-list
def normalise_host(host: str) -> str:
    """``Host`` header or name without port, brackets, case or a trailing dot."""
    h = host.strip().lower()
    if h.startswith("["):  # [::1]:8000
        h = h[1:].split("]", 1)[0]
    elif h.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which ``Host`` headers are answered: the localhost names, the ``--host`` the server listens on, and every
    ``--allow-host`` name; when listening on every address (``0.0.0.0`` or ``::``), also any IP address (a page
    cannot rebind a DNS name onto an address literal)."""

    def __init__(self, bind_host: str = "127.0.0.1", allow: Iterable[str] = ()):
        self.names = frozenset(normalise_host(h) for h in (*LOCAL_HOSTS, bind_host, *allow) if normalise_host(h))
        self.any_ip = normalise_host(bind_host) in WILDCARD_HOSTS

    def allows(self, host_header: str | None) -> bool:
        if not host_header:
            return False
        h = normalise_host(host_header)
        return h in self.names or (self.any_ip and _is_ip(h))

    def describe(self) -> str:
        return ", ".join(sorted(self.names)) + (", any IP address" if self.any_ip else "")


def check_allow_host(name: str) -> str:
    """An ``--allow-host`` value: a host name or address, without scheme, path or spaces."""
    h = normalise_host(name)
    if not h or any(c in name for c in "/ @?#") or h in WILDCARD_HOSTS:
        raise AttnscopeError(f"--allow-host {name!r} is not a host name; pass the name the browser uses to reach "
                             "the server, e.g. --allow-host attnscope.example.org")
    return h


# ---------------------------------------------------------------------------------------------- ASGI guard
async def _send_error(send, status: int, msg: str) -> None:
    body = json.dumps({"error": msg}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Answers before the application: a ``Host`` outside the policy (400), a body over ``max_body`` bytes
    (413, from its Content-Length before anything is read, or once the streamed bytes pass the limit)."""

    def __init__(self, app, policy: HostPolicy, max_body: int = MAX_BODY_BYTES):
        self.app, self.policy, self.max_body = app, policy, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if not self.policy.allows(host):
            return await _send_error(send, HostNotAllowedError.http_status,
                                     f"Host {host!r} is not allowed; this server answers {self.policy.describe()} "
                                     "(start it with --allow-host NAME to add a name)")
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = 0
        if length > self.max_body:
            return await _send_error(send, BodyTooLargeError.http_status, _too_large(length, self.max_body))
        seen = 0
        limit = self.max_body

        async def bounded_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    from starlette.exceptions import HTTPException as StarletteHTTPException

                    # FastAPI turns other exceptions raised while reading a body into 400
                    raise StarletteHTTPException(BodyTooLargeError.http_status, _too_large(seen, limit))
            return msg

        return await self.app(scope, bounded_receive, send)


def _too_large(n: int, limit: int) -> str:
    return f"the request body has {n} bytes, more than {limit}; send a shorter text"


# ---------------------------------------------------------------------------------------------- work queue
class WorkQueue:
    """One worker thread behind ``depth`` places (the running request included).  :meth:`run` raises
    :class:`QueueFullError` at once when every place is taken; a place is freed when its work ends, even if
    the client has gone."""

    def __init__(self, depth: int = QUEUE_DEPTH, workers: int = 1):
        if depth < 1:
            raise AttnscopeError(f"queue depth {depth} must be at least 1")
        self.depth = depth
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="attnscope-serve")
        self._places = threading.BoundedSemaphore(depth)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._places.acquire(blocking=False):
            raise QueueFullError(f"the server is busy ({self.depth} requests running or waiting); try again in a "
                                 "few seconds")
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._places.release()
            raise
        fut.add_done_callback(lambda _f: self._places.release())
        return await asyncio.wrap_future(fut)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
