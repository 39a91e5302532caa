"""The node's HTTP/1.1 server: requests parsed with C{httptools}, routed through the Resource tree.

twisted.web's C{HTTPChannel} and C{Request} cost about 40 µs of CPU per request here (a line
parser in Python, a C{Headers} object per side, argument parsing, a timer per request); a
proxied chat request is otherwise a few tens of µs. This server keeps the part of twisted.web
the node is built on, the C{Resource} tree (C{getChildForRequest}, C{render}, C{NOT_DONE_YET})
and the request methods its resources use, and does the HTTP itself:

- the request head and body are parsed by C{httptools} (llhttp); headers stay a list of
  byte pairs until someone asks for a C{Headers} object;
- the body is kept in memory up to C{max_body_bytes}; a body announced or growing beyond that
  is answered 413 at once and the connection ends (nothing more of it is read); a large one
  is handed on in the pieces it arrived in, for the resource to join off the reactor; a large
  upload that the root resource's C{streams_body} wants streamed is dispatched when its
  headers end, its body following through a L{BodyStream} as it arrives (a request answered
  before its body is complete ends the connection);
- a request with a body that the root resource's C{refuse_early} refuses (a missing or wrong
  key) is answered when its headers end, before any of its body is read, and the connection
  ends;
- one timer per connection covers the idle timeout (suspended while a request is being
  answered, so a long stream is never cut for idleness), the time allowed for a request head
  (408; counted from the connection's accept for its first request) and for a request body
  (408), pushed along by timestamps rather than rescheduled per request;
- a head over C{head_limit} bytes gets 414 (request line) or 431 (headers), malformed HTTP a
  400, all as OpenAI-shaped JSON, and the connection ends after the answer;
- pipelined requests are answered in order: while one is answered, the next ones wait parsed
  and reading from the socket is paused;
- responses without a C{Content-Length} are chunked (HTTP/1.1) or end with the connection
  (HTTP/1.0); C{Expect: 100-continue} is answered.

No access-log line is written per request (C{/metrics} counts requests).
"""

from __future__ import annotations

import io
import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, cast
from urllib.parse import parse_qs, unquote_to_bytes

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET

from llmnode.errors import (BadRequest, HeadTooLarge, MethodNotAllowed, NodeError,
                            RequestLineTooLong, RequestTimeout)
from llmnode.web.upload import BodyStream

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IPullProducer, IPushProducer
    from twisted.web.resource import Resource

    from llmnode.web.request import HeaderGuard
    from llmnode.web.sockets import ITCPConnection
from llmnode.web.body import body_too_large
from llmnode.web.headers import headers_of, pairs_of
from llmnode.web.responses import render_error
from llmnode.web.sockets import SocketWriter

log = Logger()

_REASONS = {code: phrase for code, phrase in RESPONSES.items()}
_NO_BODY_CODES = frozenset({204, 304})
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}

#: Bytes a request line plus its headers may take (twisted.web's own default).
MAX_HEAD_BYTES = 16384

#: Seconds a connection may stay silent (keep-alive included), and the most a client may take to
#: send a request line and its headers.
IDLE_TIMEOUT = 60.0

#: The most seconds a client may take to send a request body (C{program.body_timeout}).
BODY_TIMEOUT = 300.0

#: Bodies larger than this reach the resource as the pieces they arrived in
#: (L{NodeRequest.body_parts}): joining 50 MB takes the reactor some 30 to 60 ms.
JOIN_ABOVE = 1024 * 1024


class _DateCache:
    """The C{Date} header value, formatted once a second."""

    second = -1
    value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = formatdate(second, usegmt=True).encode("ascii")
        return self.value


_date = _DateCache()


class ResponseHeaders:
    """The response headers: the part of C{twisted.web.http_headers.Headers} that resources
    use, kept as a dict of lower-case names to C{(name, values)}."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[bytes, tuple[bytes, list[bytes]]] = {}

    def setRawHeaders(self, name: bytes | str, values: Sequence[bytes | str]) -> None:
        if type(name) is not bytes:
            name = _as_bytes(name)
        self._items[name.lower()] = (name, [_as_bytes(v) for v in values])

    def addRawHeader(self, name: bytes | str, value: bytes | str) -> None:
        if type(name) is not bytes or type(value) is not bytes:
            name, value = _as_bytes(name), _as_bytes(value)
        lower = name.lower()
        entry = self._items.get(lower)
        if entry is None:
            self._items[lower] = (name, [value])
        else:
            entry[1].append(value)

    def getRawHeaders(self, name: bytes | str,
                      default: Optional[list[bytes]] = None) -> Optional[list[bytes]]:
        entry = self._items.get(_as_bytes(name).lower())
        return default if entry is None else list(entry[1])

    def hasHeader(self, name: bytes | str) -> bool:
        return _as_bytes(name).lower() in self._items

    def removeHeader(self, name: bytes | str) -> None:
        self._items.pop(_as_bytes(name).lower(), None)

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, list[bytes]]]:
        return iter(self._items.values())


class _GuardedHeaders(ResponseHeaders):
    """Response headers whose guarded names keep their values (see
    L{llmnode.web.request.WebRequest.guard_response_headers})."""

    __slots__ = ("_guarded",)

    def __init__(self, items: dict[bytes, tuple[bytes, list[bytes]]],
                 guarded: HeaderGuard) -> None:
        self._items = items
        self._guarded = guarded

    def setRawHeaders(self, name: bytes | str, values: Sequence[bytes | str]) -> None:
        if not self._guarded(_as_bytes(name).lower()):
            super().setRawHeaders(name, values)

    def addRawHeader(self, name: bytes | str, value: bytes | str) -> None:
        if not self._guarded(_as_bytes(name).lower()):
            super().addRawHeader(name, value)


def _one_line(text: bytes) -> bytes:
    return text.replace(b"\r\n", b" ").replace(b"\r", b" ").replace(b"\n", b" ")


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


class NodeRequest:
    """One HTTP request: this server's L{llmnode.web.request.WebRequest} (the methods of
    C{twisted.web.server.Request} that the node's resources use, and the proxy's own).

    @ivar body_parts: a large body (over L{JOIN_ABOVE} bytes) as the pieces it arrived in,
        until something asks for L{raw_body}; None otherwise. Joining is left to whoever can
        do it off the reactor (C{bytes.join} of many pieces releases the GIL).
    """

    #: The body as it arrives (L{llmnode.web.upload.BodyStream}) when the request was
    #: dispatched at the end of its headers; None when it was read whole.
    body_stream: Optional[BodyStream] = None

    def __init__(self, channel: "NodeChannel", method: bytes, uri: bytes, version: bytes,
                 headers: list[tuple[bytes, bytes]], body: bytes | list[bytes],
                 keep_alive: bool) -> None:
        self.channel = channel
        self.transport = channel.transport
        self.site = channel.factory
        self.method = method
        self.uri = uri
        self.clientproto = version
        self._raw_headers = headers
        self._headers: Optional[Headers] = None
        if type(body) is list:
            self.body_parts: Optional[list[bytes]] = body
            self._raw_body: Optional[bytes] = None
        else:
            self.body_parts = None
            self._raw_body = body  # type: ignore[assignment]  # bytes, not a list
        self.keep_alive = keep_alive
        path, _, self._query = uri.partition(b"?")
        self.path = path
        self.prepath: list[bytes] = []
        segments = path[1:].split(b"/")
        self.postpath = ([unquote_to_bytes(segment) for segment in segments] if b"%" in path
                         else segments)
        self._args: Optional[dict[bytes, list[bytes]]] = None
        self._content: Optional[io.BytesIO] = None
        self.code = 200
        self.code_message = b"OK"
        self.responseHeaders = ResponseHeaders()
        self.startedWriting = False
        self.finished = False
        self.gone = False
        self._chunked = False
        self._finish_waiters: Optional[list[Callable[[Optional[Failure]], object]]] = None
        self._producer: Optional[IPushProducer | IPullProducer] = None

    # -- what arrived -----------------------------------------------------------------------

    @property
    def raw_body(self) -> bytes:
        """The body as received (joined here, on first use, if it came as L{body_parts})."""
        body = self._raw_body
        if body is None:
            body = self._raw_body = b"".join(cast("list[bytes]", self.body_parts))
            self.body_parts = None
        return body

    def body_joined(self, body: bytes) -> None:
        """L{body_parts} were joined elsewhere into C{body}: keep that, let the pieces go."""
        self._raw_body = body
        self.body_parts = None

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        if self._args is None:
            self._args = parse_qs(self._query, keep_blank_values=True) if self._query else {}
        return self._args

    @property
    def requestHeaders(self) -> Headers:
        """The request headers as a C{Headers} object (made on first use)."""
        if self._headers is None:
            self._headers = headers_of(self._raw_headers)
        return self._headers

    def header_items(self) -> list[tuple[bytes, bytes]]:
        """The request headers as C{(name, value)} pairs, in arrival order (changes made
        through L{requestHeaders} included)."""
        if self._headers is None:
            return self._raw_headers
        return pairs_of(self._headers)

    def getHeader(self, name: bytes | str) -> Optional[bytes]:
        if self._headers is not None:
            values = self._headers.getRawHeaders(name)
            return values[-1] if values else None  # type: ignore[return-value]
        wanted = _as_bytes(name).lower()
        found = None
        for key, value in self._raw_headers:
            if key.lower() == wanted:
                found = value
        return found

    @property
    def content(self) -> io.BytesIO:
        """The body as a file (twisted.web's C{request.content})."""
        if self._content is None:
            self._content = io.BytesIO(self.raw_body)
        return self._content

    def getClientAddress(self) -> IAddress:
        return self.transport.getPeer()

    getPeer = getClientAddress

    def getHost(self) -> IAddress:
        return self.transport.getHost()

    def isSecure(self) -> bool:
        return False

    # -- the answer -------------------------------------------------------------------------

    def setResponseCode(self, code: int, message: Optional[bytes] = None) -> None:
        if self.startedWriting:
            return
        self.code = code
        self.code_message = message or _REASONS.get(code, b"Unknown Status")

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        if type(name) is not bytes or type(value) is not bytes:
            name, value = _as_bytes(name), _as_bytes(value)
        self.responseHeaders._items[name.lower()] = (name, [value])

    def guard_response_headers(self, guarded: HeaderGuard) -> None:
        self.responseHeaders = _GuardedHeaders(self.responseHeaders._items, guarded)

    def write(self, data: bytes) -> None:
        if self.finished or self.gone:
            return
        if not self.startedWriting:
            self.startedWriting = True
            head = self._head()
            if self.method == b"HEAD":
                self.channel.send(head)
            elif self._chunked:
                self.channel.send(head + b"%x\r\n%s\r\n" % (len(data), data) if data else head)
            else:
                self.channel.send(head + data)
            return
        if not data or self.method == b"HEAD":
            return
        if self._chunked:
            self.channel.send(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.channel.send(data)

    def _head(self) -> bytes:
        items = self.responseHeaders._items
        lines = [b"HTTP/1.1 %d %s" % (self.code, self.code_message)]
        lines += [name + b": " + value for name, values in items.values() for value in values]
        if b"content-length" not in items and self.code not in _NO_BODY_CODES:
            if self.clientproto == b"HTTP/1.1":
                self._chunked = self.method != b"HEAD"
                if self._chunked:
                    lines.append(b"Transfer-Encoding: chunked")
            else:
                self.keep_alive = False
        if b"date" not in items:
            lines.append(b"Date: " + _date.now())
        if not self.keep_alive:
            lines.append(b"Connection: close")
        lines.append(b"\r\n")
        head = b"\r\n".join(lines)
        if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines):
            # A value with a line break of its own would end the header early (or forge one).
            lines[:-1] = [_one_line(line) for line in lines[:-1]]
            head = b"\r\n".join(lines)
        return head

    def finish(self) -> None:
        if self.finished or self.gone:
            return
        if not self.startedWriting:
            if (b"content-length" not in self.responseHeaders._items
                    and self.code not in _NO_BODY_CODES):
                self.responseHeaders.setRawHeaders(b"Content-Length", [b"0"])
            self.write(b"")
        elif self._chunked:
            self.channel.send(b"0\r\n\r\n")
        self.finished = True
        waiters, self._finish_waiters = self._finish_waiters, None
        if waiters:
            for waiter in waiters:
                _call(waiter, None)
        self.channel.request_done(self)

    def when_finished(self, callback: Callable[[Optional[Failure]], object]) -> None:
        """Call C{callback(None)} once the response is finished, or C{callback(failure)} if
        the connection is lost first (L{notifyFinish} without a Deferred)."""
        if self.finished:
            _call(callback, None)
        elif self.gone:
            _call(callback, Failure(ConnectionLost("the client went away")))
        elif self._finish_waiters is None:
            self._finish_waiters = [callback]
        else:
            self._finish_waiters.append(callback)

    def notifyFinish(self) -> Deferred[None]:
        """Fires None once the response is finished, or fails if the connection is lost
        first."""
        waiter: Deferred[None] = Deferred()
        self.when_finished(lambda result: waiter.callback(result) if result is None
                           else waiter.errback(result))
        return waiter

    def registerProducer(self, producer: IPushProducer | IPullProducer, streaming: bool) -> None:
        self._producer = producer
        if not self.gone:
            self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._producer is not None:
            self._producer = None
            if not self.gone:
                self.transport.unregisterProducer()

    def connection_lost(self, reason: Failure) -> None:
        """The connection ended before this request was finished."""
        if self.finished or self.gone:
            return
        self.gone = True
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        waiters, self._finish_waiters = self._finish_waiters, None
        for waiter in waiters or ():
            _call(waiter, reason)

    # -- dispatch ---------------------------------------------------------------------------

    def process(self) -> None:
        """Find the resource for this request and render it (twisted.web's C{process})."""
        try:
            resource = getChildForRequest(self.site.resource, self)
            body = resource.render(self)
        except Exception as e:
            self._failed(e)
            return
        if body is NOT_DONE_YET:
            return
        if not isinstance(body, bytes):
            self._failed(TypeError(f"{resource!r} rendered {type(body).__name__}, not bytes"))
            return
        self.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        self.write(body)
        self.finish()

    def _failed(self, error: Exception) -> None:
        if not self.startedWriting:
            self.responseHeaders = ResponseHeaders()
        allowed = getattr(error, "allowedMethods", None)
        if allowed is not None:
            names = [m.decode("ascii") for m in allowed]
            self.setHeader(b"Allow", ", ".join(names).encode("ascii"))
            answer: NodeError = MethodNotAllowed(
                f"{self.method.decode('ascii', 'replace')} is not allowed on "
                f"{self.path.decode('utf-8', 'replace')[:200]}; use {' or '.join(names)}")
        else:
            log.failure("rendering {path} failed", Failure(error),
                        path=self.path.decode("utf-8", "replace")[:200])
            answer = NodeError("internal error")
        if self.startedWriting:
            self.transport.loseConnection()
            return
        body = render_error(self, answer)
        self.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        self.write(body)
        self.finish()


def _call(callback: Callable[[Optional[Failure]], object], result: Optional[Failure]) -> None:
    try:
        callback(result)
    except Exception:
        log.failure("a request's end callback failed")


class NodeChannel(Protocol):
    """One client connection (see the module's docstring)."""

    #: Seconds a refused (or timed-out) client may go on sending before the connection is
    #: aborted.
    linger_timeout = 2.0

    transport: ITCPConnection

    def __init__(self, factory: "NodeSite") -> None:
        self.factory = factory
        self._clock = factory.clock
        self._parser = HttpRequestParser(self)
        self._current: Optional[NodeRequest] = None
        self._waiting: list[NodeRequest] = []
        self._paused = False
        self._closing = False
        self._refused = False
        self._last_read = False
        self._timer = None
        self._abort_timer = None
        self._last_activity = 0.0
        self._in_head = False
        self._head_began = 0.0
        self._first_message = True
        self._in_body = False
        self._body_began = 0.0
        self._head_raw = 0
        self._ended_in_chunk = False
        self._in_url = False
        self._feeding = 0
        self.send: Callable[[bytes], None] = None  # type: ignore[assignment]  # connectionMade
        self.llmnode_no_delay = False
        self._reset_message()

    def _reset_message(self) -> None:
        self._stream: Optional[BodyStream] = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._chunked_body = False
        self._declared: Optional[bytes] = None
        self._expect: Optional[bytes] = None

    # -- the connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.channels.add(self)
        # Each response goes out in as few writes as it has parts: Nagle's algorithm would
        # only hold the last part of a stream back.
        try:
            self.transport.setTcpNoDelay(True)
            self.llmnode_no_delay = True
        except Exception:
            pass
        self.send = SocketWriter(self.transport).write
        # A client that never sends a byte is timed like one that stopped halfway through a
        # request head: from the accept.
        now = self._last_activity = self._head_began = self._clock.seconds()
        self._in_head = True
        self._schedule(now)

    def dataReceived(self, data: bytes) -> None:
        if self._refused or self._closing or self._last_read:
            return
        self._last_activity = self._clock.seconds()
        self._feeding = len(data)
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            # Upgrade (h2c, websocket) is not offered: the request is answered as a plain
            # one (a server may ignore Upgrade), and it is the connection's last.
            self._stop_reading()
            return
        except HttpParserError as e:
            if not (self._refused or self._last_read):
                self._refuse(BadRequest(f"malformed HTTP request: {e}"))
            return
        if self._in_head and not self._ended_in_chunk:
            # httptools keeps a header's bytes until the header is complete: bound what a
            # single endless header can make it hold. (A chunk that also ended a message is
            # not counted: its start belongs to that message.)
            self._head_raw += len(data)
            if self._in_url and b"\n" in data:
                self._in_url = False
            if self._head_raw > self.factory.head_limit:
                self._head_too_large()
        self._ended_in_chunk = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.channels.discard(self)
        for name in ("_timer", "_abort_timer"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
        current, self._current = self._current, None
        self._waiting = []
        if self._stream is not None:
            self._stream.lost(Failure(ConnectionLost(str(reason.value))))
        if current is not None:
            current.connection_lost(Failure(ConnectionLost(str(reason.value))))
        lost = self.factory.lost_waiters.pop(self, None)
        if lost is not None:
            lost.callback(None)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._in_url = True
        self._head_raw = 0
        if self._first_message:
            self._first_message = False  # its head has been timed since the accept
        else:
            self._head_began = self._last_activity
        if self._timer is None:
            self._schedule(self._last_activity)
        elif self._timer.getTime() > self._head_began + self.factory.head_timeout:
            self._timer.reset(self.factory.head_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.factory.head_limit:
            self._head_too_large()
            raise HttpParserError("request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if name[0] in b"cCeEtT":
            lower = name.lower()
            if lower == b"content-length":
                self._declared = value
            elif lower == b"expect":
                self._expect = value
            elif lower == b"transfer-encoding":
                self._chunked_body = True

    def _head_too_large(self) -> None:
        if self._refused:
            return
        self._in_head = False
        limit = self.factory.head_limit
        if self._in_url:
            self._refuse(RequestLineTooLong(f"request line is longer than {limit} bytes"))
        else:
            self._refuse(HeadTooLarge(f"request line and headers are larger than {limit} bytes"))

    def on_headers_complete(self) -> None:
        self._in_url = False
        limit = self.factory.head_limit
        # The head came in the bytes counted so far plus the chunk being parsed: only when
        # those could exceed the limit is the head itself measured.
        if self._head_raw + self._feeding > limit and len(self._url) + sum(
                len(n) + len(v) + 4 for n, v in self._headers) > limit:
            self._head_too_large()
            raise HttpParserError("request head too large")
        self._in_head = False
        declared = self._declared
        limit = self.factory.max_body_bytes
        if declared is not None:
            if limit is not None and declared.strip().isdigit() and int(declared) > limit:
                # Nothing of a body announced over the limit is read: answered at once.
                self._refuse(body_too_large(limit))
                raise HttpParserError("request body too large")
            has_body = declared.strip() not in (b"0", b"")
        else:
            has_body = self._chunked_body
        if has_body:
            refusal = self._early_refusal()
            if refusal is not None:
                self._refuse(*refusal)
                raise HttpParserError("request refused before its body")
            self._in_body = True
            self._body_began = self._last_activity
        expect = self._expect
        if expect is not None and expect.lower() == b"100-continue":
            if self._parser.get_http_version() == "1.1":
                self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if has_body and declared is not None and declared[6:] and self._current is None:
            self._dispatch_streaming(declared)  # 7 digits or more: a megabyte or more

    def _dispatch_streaming(self, declared: bytes) -> None:
        """Render the request now, its body to follow through a L{BodyStream}, when the
        root resource's C{streams_body} wants that (a large upload); else do nothing."""
        streams_body = getattr(self.factory.resource, "streams_body", None)
        if streams_body is None or not declared.strip().isdigit():
            return
        length = int(declared)
        parser = self._parser
        head = NodeRequest(self, parser.get_method(), self._url, b"HTTP/1.1", self._headers,
                           b"", False)
        if not streams_body(head, length):
            return
        version = parser.get_http_version()
        request = NodeRequest(
            self, parser.get_method(), self._url,
            _VERSIONS.get(version) or b"HTTP/" + version.encode("ascii"), self._headers, b"",
            parser.should_keep_alive())
        self._stream = request.body_stream = BodyStream(self.transport, length)
        self._current = request
        request.process()

    def _early_refusal(self) -> Optional[tuple[NodeError, bytes]]:
        """(error, extra header lines) when the root resource refuses this request from its
        head alone (C{refuse_early}), so that its body need not be read; else None."""
        refuse_early = getattr(self.factory.resource, "refuse_early", None)
        if refuse_early is None:
            return None
        parser = self._parser
        head = NodeRequest(self, parser.get_method(), self._url, b"HTTP/1.1", self._headers,
                           b"", False)
        refusal: Optional[tuple[NodeError, bytes]] = refuse_early(head)
        return refusal

    def on_body(self, data: bytes) -> None:
        stream = self._stream
        if stream is not None:
            stream.received(data)
            return
        self._body_bytes += len(data)
        limit = self.factory.max_body_bytes
        if limit is not None and self._body_bytes > limit:
            self._body = []
            self._refuse(body_too_large(limit))
            raise HttpParserError("request body too large")
        self._body.append(data)

    def on_message_complete(self) -> None:
        self._ended_in_chunk = True
        self._in_body = False
        if self._closing or self._refused or self._last_read:
            return
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        if not keep_alive:
            # Nothing after a request that ends the connection is read (RFC 9112 9.6).
            self._last_read = True
        stream = self._stream
        if stream is not None:
            # Its request was dispatched when its headers ended.
            self._reset_message()
            stream.completed()
            return
        version = parser.get_http_version()
        body = self._body
        request = NodeRequest(
            self, parser.get_method(), self._url,
            _VERSIONS.get(version) or b"HTTP/" + version.encode("ascii"), self._headers,
            body if self._body_bytes > JOIN_ABOVE else
            body[0] if len(body) == 1 else b"".join(body), keep_alive)
        self._reset_message()
        if self._current is None:
            self._current = request
            request.process()
        else:
            self._waiting.append(request)
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()

    def _stop_reading(self) -> None:
        """Read no more requests on this connection: end it once what was read is answered."""
        self._last_read = True
        if self._waiting:
            self._waiting[-1].keep_alive = False
        elif self._current is not None:
            self._current.keep_alive = False
        else:
            self._closing = True
            self.transport.loseConnection()

    # -- requests ---------------------------------------------------------------------------

    def _start(self, request: NodeRequest) -> None:
        self._current = request
        request.process()

    def request_done(self, request: NodeRequest) -> None:
        """L{NodeRequest.finish} was called: end the connection, or go on with the next
        request."""
        if request is not self._current:
            return
        self._current = None
        self._last_activity = self._clock.seconds()
        if request.body_stream is not None and self._stream is request.body_stream:
            # Answered before its body arrived whole: the rest is not worth reading.
            request.keep_alive = False
            request.body_stream.stopProducing()
        if not request.keep_alive:
            self._closing = True
            self._waiting = []
            self.transport.loseConnection()
            return
        if self._waiting:
            self._start(self._waiting.pop(0))
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if self._timer is None:
            self._schedule(self._last_activity)

    # -- timeouts and refusals --------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        if self._current is not None:
            return
        deadline = self._last_activity + self.factory.idle_timeout
        if self._in_head:
            deadline = min(deadline, self._head_began + self.factory.head_timeout)
        elif self._in_body:
            deadline = min(deadline, self._body_began + self.factory.body_timeout)
        self._timer = self._clock.callLater(max(0.0, deadline - now), self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        if self._refused or self._closing:
            return
        now = self._clock.seconds()
        factory = self.factory
        if self._current is not None:
            return
        if now - self._last_activity >= factory.idle_timeout:
            # Silent for the whole idle timeout (also halfway through a request head).
            self._closing = True
            self.transport.loseConnection()
            self._abort_timer = self._clock.callLater(
                self.linger_timeout, self.transport.abortConnection)
            return
        if self._in_head and now - self._head_began >= factory.head_timeout:
            self._refuse(RequestTimeout(
                f"request line and headers not received within {factory.head_timeout:g} s"))
            return
        if self._in_body and now - self._body_began >= factory.body_timeout:
            self._refuse(RequestTimeout(
                f"request body not received within {factory.body_timeout:g} s "
                f"(program.body_timeout)"))
            return
        self._schedule(now)

    def _refuse(self, error: NodeError, headers: bytes = b"") -> None:
        """Answer C{error} as JSON outside any request, then end the connection (reading and
        dropping what the client still sends for a while, so that the answer is not lost to
        a reset).

        @param headers: extra header lines, each ending in CRLF.
        """
        if self._refused:
            return
        self._refused = True
        self._in_body = False
        body = error.body()
        reason = _REASONS.get(error.status, b"Error")
        transport = self.transport
        if self._current is None:
            transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"%sConnection: close\r\n\r\n%s"
                % (error.status, reason, len(body), headers, body))
        if self._paused:
            self._paused = False
            transport.resumeProducing()
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None or self._current is not None:
            transport.loseConnection()
        else:
            half_close()
        self._abort_timer = self._clock.callLater(self.linger_timeout,
                                                  transport.abortConnection)


class NodeSite(ServerFactory):
    """Serves C{resource} (a twisted.web Resource tree) with L{NodeChannel}.

    @param max_body_bytes: request bodies over this are not kept (413 from the resource).
    @param idle_timeout: seconds a connection may stay silent between requests.
    @param head_timeout: seconds allowed for a request line and headers (default
        C{idle_timeout}).
    @param body_timeout: seconds allowed for a request body, from the end of its headers.
    @param clock: C{callLater}/C{seconds} provider (the reactor).
    """

    noisy = False
    head_limit = MAX_HEAD_BYTES

    def __init__(self, resource: Resource, *, max_body_bytes: Optional[int] = None,
                 idle_timeout: float = IDLE_TIMEOUT, head_timeout: Optional[float] = None,
                 body_timeout: float = BODY_TIMEOUT, clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.resource = resource
        self.max_body_bytes = max_body_bytes
        self.idle_timeout = idle_timeout
        self.head_timeout = idle_timeout if head_timeout is None else head_timeout
        self.body_timeout = body_timeout
        self.clock = clock
        self.channels: set[NodeChannel] = set()
        self.lost_waiters: dict[NodeChannel, Deferred[None]] = {}

    def buildProtocol(self, addr: Optional[IAddress]) -> NodeChannel:
        return NodeChannel(self)

    def close_all(self) -> Deferred[Any]:
        """Abort every open connection; fire once all are gone."""
        waiting = []
        for channel in list(self.channels):
            lost: Deferred[None] = Deferred()
            self.lost_waiters[channel] = lost
            waiting.append(lost)
            channel.transport.abortConnection()
        return DeferredList(waiting) if waiting else succeed(None)
