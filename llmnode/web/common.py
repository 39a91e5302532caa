"""Helpers shared by the web resources: JSON answers, OpenAI-shaped errors, bounded bodies,
and the HTTP channel that bounds request heads and slow clients."""

from __future__ import annotations

import io
import json
import math
import re
from typing import Any, Callable, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from llmnode.errors import BadRequest, BodyTooLarge, MethodNotAllowed, NodeError, NotFound

log = Logger()

JSON_TYPE = b"application/json"


def render_json(request, status: int, body: Any) -> bytes:
    """Set C{status} and a JSON content type on C{request}; return C{body} encoded.

    C{body} may be bytes already encoded, or anything C{json.dumps} takes.
    """
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_TYPE)
    if isinstance(body, bytes):
        return body
    return json.dumps(body).encode("utf-8")


def render_error(request, error: NodeError) -> bytes:
    """Set the status (and C{Retry-After}) of C{error} on C{request}; return its JSON body."""
    if error.retry_after is not None:
        request.setHeader(b"Retry-After", b"%d" % max(0, math.ceil(error.retry_after)))
    return render_json(request, error.status, error.body())


def method_not_allowed(request, allowed: tuple[str, ...]) -> bytes:
    """A 405 with an C{Allow} header listing C{allowed} methods."""
    request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
    method = request.method.decode("ascii", "replace")
    return render_error(request, MethodNotAllowed(
        f"{method} is not allowed on {_path(request)}; use {' or '.join(allowed)}"))


def _path(request) -> str:
    return request.path.decode("utf-8", "replace")[:200]


class PendingResponse:
    """A C{NOT_DONE_YET} response that ends along exactly one path.

    Whether the client left is decided from C{notifyFinish()} only; once it has left, or once
    the response was ended here, nothing more is written.

    @ivar gone: the client went away before the response was finished.
    @ivar ended: this object finished the response (or cut the connection).
    """

    def __init__(self, request):
        self.request = request
        self.gone = False
        self.ended = False
        self._on_gone: list[Callable[[], Any]] = []
        self._on_end: list[Callable[[Optional[Failure]], Any]] = []
        request.notifyFinish().addBoth(self._finished)

    @property
    def open(self) -> bool:
        """Whether the response may still be written to."""
        return not (self.gone or self.ended)

    def on_gone(self, callback: Callable[[], Any]) -> None:
        """Call C{callback()} if the client leaves before the response ends."""
        self._on_gone.append(callback)

    def on_end(self, callback: Callable[[Optional[Failure]], Any]) -> None:
        """Call C{callback(None)} once the response is finished, or C{callback(failure)} if the
        connection was lost first (one C{notifyFinish} for all such listeners)."""
        self._on_end.append(callback)

    def _finished(self, result) -> None:
        if isinstance(result, Failure):
            self._lost(result)
        callbacks, self._on_end = self._on_end, []
        for callback in callbacks:
            try:
                callback(result)
            except Exception:
                log.failure("end-of-response callback failed")

    def _lost(self, failure) -> None:
        if self.ended:
            return
        self.gone = True
        callbacks, self._on_gone = self._on_gone, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.failure("client-gone callback failed")

    def send_json(self, status: int, body: Any) -> bool:
        """Write a whole JSON answer and finish; False (and nothing written) if not open."""
        if not self.open:
            return False
        self.ended = True
        self.request.write(render_json(self.request, status, body))
        self.request.finish()
        return True

    def send_error(self, error: NodeError) -> bool:
        """Write C{error} as an OpenAI-shaped answer and finish; False if not open."""
        if not self.open:
            return False
        self.ended = True
        self.request.write(render_error(self.request, error))
        self.request.finish()
        return True

    def finish(self) -> bool:
        """Finish a response whose body was written elsewhere; False if not open."""
        if not self.open:
            return False
        self.ended = True
        self.request.finish()
        return True

    def cut(self) -> bool:
        """End the response visibly incomplete: close the connection without a final chunk.

        Bytes already written are flushed first; the client sees a body shorter than its
        C{Content-Length} or a chunked body without its terminating chunk.
        """
        if not self.open:
            return False
        self.ended = True
        transport = getattr(self.request, "transport", None) or self.request.channel
        transport.loseConnection()
        return True


class BoundedRequest(Request):
    """A request that stops storing its body once it is larger than C{max_body_bytes}.

    twisted.web reads the whole body before C{render}; this keeps an oversized body from
    being buffered (to memory or a temporary file). When C{Content-Length} announces too much,
    nothing is stored at all. The body is still read (and dropped) so the 413 that C{render}
    answers reaches the client. Build a Site with L{bounded_request_factory}.

    @ivar body_too_large: the body went (or was announced to go) over the limit.
    """

    max_body_bytes: Optional[int] = None
    body_too_large = False
    _body_seen = 0

    def gotLength(self, length):
        limit = self.max_body_bytes
        if limit is not None and length is not None and length > limit:
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.body_too_large:
            return
        self._body_seen += len(data)
        limit = self.max_body_bytes
        if limit is not None and self._body_seen > limit:
            self.body_too_large = True
            self.content.close()
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)


class NodeSite(Site):
    """The node's Site: no access-log line per request (formatting one costs about as much as
    proxying a small request; C{/metrics} counts requests) and no form parsing of POST bodies
    (twisted.web would otherwise parse every POST's Content-Type with the C{email} package)."""

    def __init__(self, resource, **kwargs):
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)

    def log(self, request) -> None:
        pass

    def getContentFile(self, length):
        """Request bodies stay in memory (twisted.web puts any over 100 kB in a temporary
        file); L{BoundedRequest} and C{max_body_mb} bound them."""
        return io.BytesIO()


def bounded_request_factory(max_body_bytes: int) -> type:
    """A L{BoundedRequest} class for C{Site(root, requestFactory=...)}."""
    return type("BoundedRequest", (BoundedRequest,), {"max_body_bytes": int(max_body_bytes)})


def max_body_bytes(max_body_mb: float) -> int:
    """The body limit in bytes for a limit in MiB."""
    return int(max_body_mb * 1024 * 1024)


def read_body(request, limit: int) -> bytes:
    """The request body, or L{BodyTooLarge} when it (or its C{Content-Length}) exceeds C{limit}.

    Works with any Request; a L{BoundedRequest} additionally never stored the excess.
    """
    if getattr(request, "body_too_large", False):
        raise _too_large(limit)
    declared = request.getHeader(b"Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _too_large(limit)
    content = getattr(request, "content", None)
    if content is None:
        return b""
    content.seek(0, io.SEEK_END)
    if content.tell() > limit:
        raise _too_large(limit)
    content.seek(0)
    return content.read()


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"request body is larger than the limit of {limit} bytes ({limit / 1048576:g} MiB)")


def parse_json_object(body: bytes) -> dict:
    """Decode a JSON object, or raise L{BadRequest} saying what is wrong."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(value).__name__}")
    return value


#: Bodies larger than this are scanned for the routing fields instead of parsed whole.
SCAN_ABOVE = 64 * 1024

_STRUCTURE = re.compile(rb'["\[\]{}]')
_SPACE = re.compile(rb"[ \t\n\r]*")
_SCALAR = re.compile(rb"true|false|null|-?[0-9][0-9.eE+-]*")


def routing_fields(body: bytes, names: frozenset = frozenset({"model", "stream"})) -> dict:
    """The top-level members C{names} of a JSON object body, or L{BadRequest}.

    A body up to L{SCAN_ABOVE} bytes is parsed whole (L{parse_json_object}). A larger one is
    scanned: strings are skipped by searching for their closing quote, nesting is followed by
    brackets, and only the wanted members are decoded (parsing 1 MiB costs 1 to 2 ms here; the
    scan a few µs). Malformed JSON elsewhere in such a body goes unnoticed here and is left for
    the backend to refuse.
    """
    if len(body) > SCAN_ABOVE:
        try:
            return _scan(body, names)
        except (ValueError, IndexError):
            pass
    value = parse_json_object(body)
    return {name: value[name] for name in names if name in value}


#: Escaped quotes a scan steps over before it gives up and parses (each costs a Python loop
#: turn; text full of them parses faster).
_ESCAPED_QUOTES = 512


class _Scan:
    """One scan of a body for L{routing_fields}; raises ValueError where it gives up."""

    def __init__(self, text: bytes):
        self.text = text
        self.escaped = 0

    def string_end(self, start: int) -> int:
        """The index just past the closing quote of the string whose content starts at
        C{start}."""
        text = self.text
        end = text.index(b'"', start)
        while True:
            before = end - 1
            while text[before] == 0x5C:
                before -= 1
            if (end - 1 - before) % 2 == 0:
                return end + 1
            self.escaped += 1
            if self.escaped > _ESCAPED_QUOTES:
                raise ValueError("too many escaped quotes to scan")
            end = text.index(b'"', end + 1)


def _scan(text: bytes, names: frozenset) -> dict:
    string_end = _Scan(text).string_end
    position = _SPACE.match(text, 0).end()
    if text[position:position + 1] != b"{":
        raise ValueError("not an object")
    found = {}
    depth = 1
    position += 1
    while depth:
        match = _STRUCTURE.search(text, position)
        if match is None:
            raise ValueError("unterminated")
        char, position = match.group(), match.end()
        if char == b'"':
            start = position - 1
            position = string_end(position)
            if depth != 1:
                continue
            after = _SPACE.match(text, position).end()
            if text[after:after + 1] != b":":
                continue
            key = json.loads(text[start:position])
            if key in names:
                value_at = _SPACE.match(text, after + 1).end()
                if text[value_at:value_at + 1] == b'"':
                    position = string_end(value_at + 1)
                else:
                    scalar = _SCALAR.match(text, value_at)
                    if scalar is None:
                        raise ValueError("a routing member that is not a string or scalar")
                    position = scalar.end()
                found[key] = json.loads(text[value_at:position])
        elif char in b"[{":
            depth += 1
        else:
            depth -= 1
    if _SPACE.match(text, position).end() != len(text):
        raise ValueError("extra data")
    return found


class ErrorResource(Resource):
    """A leaf that answers every method with one OpenAI-shaped error (default: 404)."""

    isLeaf = True

    def __init__(self, error: Optional[NodeError] = None):
        super().__init__()
        self._error = error

    def render(self, request):
        error = self._error or NotFound(f"no such endpoint: {_path(request)}")
        return render_error(request, error)


#: Bytes a request line plus its headers may take (twisted.web's own default).
MAX_HEAD_BYTES = 16384

#: Seconds a connection may stay silent (keep-alive included), and the most a client may take to
#: send a request line and its headers.
IDLE_TIMEOUT = 60.0


class HeadTooLarge(NodeError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class RequestLineTooLong(NodeError):
    status = 414
    type = "invalid_request_error"
    code = "request_line_too_long"


class HeadTimeout(NodeError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


_REASONS = {408: b"Request Timeout", 414: b"URI Too Long",
            431: b"Request Header Fields Too Large"}


class NodeChannel(HTTPChannel):
    """An HTTP channel whose refusals of a request head are OpenAI-shaped JSON.

    A request line or header block over C{head_limit} bytes gets a 414 or 431 (twisted.web
    itself answers a bare 400 or just closes). A client that takes longer than C{head_timeout}
    seconds to send a request line and headers gets a 408, however it trickles its bytes (the
    Site's idle timeout only catches a silent one). Each refusal ends the connection; what the
    client still sends is read and dropped for up to C{linger_timeout} seconds first.
    """

    head_limit = MAX_HEAD_BYTES
    head_timeout: Optional[float] = IDLE_TIMEOUT
    MAX_LENGTH = MAX_HEAD_BYTES
    totalHeadersSize = MAX_HEAD_BYTES + 1024

    #: Seconds a refused client may go on sending before the connection is aborted.
    linger_timeout = 2.0

    _head_bytes = 0
    _head_deadline = None
    _in_head = False
    _linger = None
    _refused = False

    def lineReceived(self, line):
        if self._refused:
            return
        first = self._head_bytes == 0
        if first and self.head_timeout is not None:
            self._start_head_deadline()
        self._head_bytes += len(line) + 2
        if self._head_bytes > self.head_limit:
            self._refuse_head(first)
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line):
        self._refuse_head(self._head_bytes == 0)

    def allHeadersReceived(self):
        self._head_bytes = 0
        self._in_head = False
        super().allHeadersReceived()

    def _start_head_deadline(self) -> None:
        # One timer per connection, pushed back at each request head: cheaper than a new
        # timer per request on a kept-alive connection. It fires harmlessly between heads.
        self._in_head = True
        deadline = self._head_deadline
        if deadline is not None and deadline.active():
            deadline.reset(self.head_timeout)
        else:
            self._head_deadline = self.callLater(self.head_timeout, self._head_too_slow)

    def rawDataReceived(self, data):
        if not self._refused:
            super().rawDataReceived(data)

    # The idle timeout: twisted.web suspends it while each request is processed by cancelling
    # its timer and makes a new one when the request is done. Here one timer per connection
    # is pushed back instead; one that fires while suspended does nothing.

    _idle_call = None

    def setTimeout(self, period):
        previous, self.timeOut = self.timeOut, period
        if period is not None:
            call = self._idle_call
            if call is not None and call.active():
                call.reset(period)
            else:
                self._idle_call = self.callLater(period, self._idle_expired)
        return previous

    def resetTimeout(self):
        call = self._idle_call
        if call is not None and self.timeOut is not None and call.active():
            call.reset(self.timeOut)

    def _idle_expired(self) -> None:
        self._idle_call = None
        if self.timeOut is not None:
            self.timeoutConnection()

    def connectionLost(self, reason):
        self._cancel_deadline()
        idle, self._idle_call = self._idle_call, None
        if idle is not None and idle.active():
            idle.cancel()
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        deadline, self._head_deadline = self._head_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _refuse_head(self, request_line: bool) -> None:
        if request_line:
            self.refuse(RequestLineTooLong(
                f"request line is longer than {self.head_limit} bytes"))
        else:
            self.refuse(HeadTooLarge(
                f"request line and headers are larger than {self.head_limit} bytes"))

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if not self._in_head:
            return
        self.refuse(HeadTimeout(
            f"request line and headers not received within {self.head_timeout:g} s"))

    def refuse(self, error: NodeError) -> None:
        """Answer C{error} as JSON outside any request and close the connection."""
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        body = error.body()
        reason = _REASONS.get(error.status, b"Error")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (error.status, reason, len(body), body))
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.loseConnection()
            return
        # Closing at once with unread input would reset the connection and could destroy the
        # answer before the client reads it: end the answer, then read and drop what the
        # client still sends, for a while.
        half_close()
        self._linger = self.callLater(self.linger_timeout, self.transport.abortConnection)


def harden_site(site, *, idle_timeout: float = IDLE_TIMEOUT,
                head_timeout: Optional[float] = None) -> None:
    """Make C{site} drop idle connections after C{idle_timeout} s and use L{NodeChannel}.

    @param head_timeout: seconds allowed for a request line and headers; default
        C{idle_timeout}.
    """
    site.timeOut = idle_timeout
    limit = idle_timeout if head_timeout is None else head_timeout
    site.protocol = type("NodeChannel", (NodeChannel,), {"head_timeout": limit})
