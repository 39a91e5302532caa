"""A lean HTTP/1.1 agent for the node's local backends, under C{treq.HTTPClient}.

Twisted's C{Agent} with its connection pool costs several times more CPU per request than the
proxying around it. This agent keeps only what a proxy in front of local backends needs:
plain-TCP keep-alive connections pooled per host and port, the request head and an in-memory
body written in one go, the response parsed with C{httptools}, and body bytes handed to the
body protocol as they arrive, with pause/resume/stop reaching the backend connection.

A pooled connection is checked before reuse (a non-blocking peek): one the backend has closed
is dropped and the request goes on another, so nothing of it was sent. Once a request was
written, a connection that closes without an answer fails it (L{ResponseNeverReceived}); it is
never sent again, since a model request is not idempotent.

Build the client with L{make_client}.
"""

from __future__ import annotations

import socket
from collections import deque
from enum import Enum
from functools import lru_cache
from http.client import HTTPResponse
from http.cookiejar import Cookie, CookieJar
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from httptools import HttpParserError, HttpResponseParser
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (IAddress, IConnector, IConsumer, IProducer, IProtocol,
                                         IPushProducer, IReactorTCP)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed, ResponseDone, ResponseFailed,
    ResponseNeverReceived)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IClientRequest, IResponse
from zope.interface import implementer

from llmnode.lifecycle import InvalidTransition
from llmnode.web.headers import headers_of, pairs_of
from llmnode.web.sockets import SocketWriter

if TYPE_CHECKING:
    import urllib.request

    from llmnode.web.backend_http import BackendAnswer

    from llmnode.web.sockets import ITCPConnection

_log = Logger()

#: A backend's (host, port): the key of its pool of connections.
Origin = tuple[str, int]

#: Request headers the agent writes itself.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"host"})

#: Request bodies up to this size are sent in one write with their head.
_JOIN_BODY_UP_TO = 64 * 1024

#: Methods whose request carries a C{Content-Length: 0} when they have no body.
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory: the agent writes it together with the head."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def body_producer(data: object) -> IBodyProducer:
    """treq's C{data_to_body_producer}: bytes become a L{BytesBody}, the rest as treq does."""
    if isinstance(data, bytes):
        return BytesBody(data)
    return IBodyProducer(data)


class NoCookies(CookieJar):
    """A cookie jar that never holds a cookie and does no work per request: a backend's cookies
    must never reach another user's request, and the standard jar, even empty or with a policy
    that refuses everything, inspects every request and response (about a tenth of a small
    proxied request's CPU)."""

    def add_cookie_header(self, request: urllib.request.Request) -> None:
        pass

    def extract_cookies(self, response: HTTPResponse,
                        request: urllib.request.Request) -> None:
        pass

    def set_cookie(self, cookie: Cookie) -> None:
        pass

    def set_cookie_if_ok(self, cookie: Cookie, request: urllib.request.Request) -> None:
        pass


class BackendClient(HTTPClient):
    """C{treq.HTTPClient} over a L{BackendAgent}, and the proxy's L{BackendHTTP}.

    treq's own methods (C{get}, C{request}, ...) work as usual (the health probes use them).
    The proxy's requests go through L{send}, straight to the agent: treq would wrap each in a
    cookie agent, a redirect agent and a gzip-decoding agent (which also adds
    C{Accept-Encoding: gzip} to what the backend receives), about 20 µs of CPU a request and
    all of it wrong for a proxy, which relays the backend's bytes and redirects as they are
    and keeps no cookies.
    """

    def send(self, method: bytes, url: BackendURL, headers: list[tuple[bytes, bytes]],
             body: bytes | IBodyProducer) -> Deferred[BackendAnswer]:
        """L{BackendHTTP.send}: the answer is the agent's L{BackendResponse}."""
        producer: Optional[IBodyProducer]
        if isinstance(body, bytes):
            producer = BytesBody(body) if body else None
        else:
            producer = body
        agent = cast(BackendAgent, self._agent)
        answer = agent.request(method, url.as_bytes(), headers, producer)
        return cast("Deferred[BackendAnswer]", answer)


def make_client(reactor: IReactorTCP, *, cookiejar: Optional[CookieJar] = None,
                connect_timeout: float = 10.0,
                connect_burst: Optional[int] = None) -> tuple[BackendClient, "BackendAgent"]:
    """A L{BackendClient} (C{treq.HTTPClient}) over a L{BackendAgent}, and the agent (close it
    on shutdown with C{closeCachedConnections}). Without C{cookiejar}, cookies are neither kept
    nor sent (L{NoCookies})."""
    agent = BackendAgent(reactor, connect_timeout=connect_timeout, connect_burst=connect_burst)
    if cookiejar is None:
        cookiejar = NoCookies()
    client = BackendClient(agent, cookiejar=cookiejar,  # type: ignore[arg-type]
                           data_to_body_producer=body_producer)
    return client, agent


class BackendURL(EncodedURL):
    """A backend's URL that is a URI already (an IP or ASCII host, a request target as it
    arrived on the wire): treq's conversion to a URI (IDNA for the host, re-quoting the target,
    about 30 µs a request) has nothing to do, and the target is forwarded byte for byte."""

    _text: Optional[str] = None
    _bytes: Optional[bytes] = None

    def to_uri(self) -> "BackendURL":
        return self

    def to_text(self, with_password: bool = False) -> str:
        if self._text is None:
            self._text = super().to_text(with_password)
        return self._text

    def as_bytes(self) -> bytes:
        """The URL as the agent takes it."""
        if self._bytes is None:
            self._bytes = self.to_text().encode("ascii")
        return self._bytes


@lru_cache(maxsize=512)
def backend_url(host: str, port: int, target: bytes) -> BackendURL:
    """The URL of C{target} (an ASCII request target: path and query) on a backend."""
    host_text = f"[{host}]" if ":" in host else host
    return cast(BackendURL,
                BackendURL.from_text(f"http://{host_text}:{port}{target.decode('ascii')}"))


@implementer(IClientRequest)
class _RequestInfo:
    def __init__(self, method: bytes, uri: bytes,
                 headers: Headers | list[tuple[bytes, bytes]]) -> None:
        self.method = method
        self.absoluteURI = uri
        self.headers = headers_of(headers) if type(headers) is list else headers


class _Request:
    """One request on its way: where it is (connecting, or sent on a connection) and the
    Deferred its response fires."""

    __slots__ = ("method", "uri", "path", "key", "authority", "headers", "body", "deferred",
                 "connector", "connection", "body_pending", "backlog")

    def __init__(self, method: bytes, uri: bytes, path: bytes, key: Origin, authority: bytes,
                 headers: Headers | list[tuple[bytes, bytes]],
                 body: Optional[IBodyProducer]) -> None:
        self.method = method
        self.uri = uri
        self.path = path
        self.key = key
        self.authority = authority
        self.headers = headers
        self.body = body
        self.connector: Optional[IConnector] = None
        self.connection: Optional[_Connection] = None
        self.body_pending = False
        self.backlog: Optional[deque[_Request]] = None
        self.deferred: Deferred[IResponse] = Deferred(self._cancel)

    def _cancel(self, deferred: Deferred[IResponse]) -> None:
        if self.backlog is not None:
            self.backlog.remove(self)
            self.backlog = None
        elif self.connection is not None:
            self.connection.abort()
        elif self.connector is not None:
            self.connector.stopConnecting()
        self.stop_body()

    def stop_body(self) -> None:
        """Stop a streamed body that is still being written."""
        if self.body_pending:
            self.body_pending = False
            cast(IBodyProducer, self.body).stopProducing()  # a pending body

    def head(self, framing: bytes) -> bytes:
        """The request line and headers; C{framing} is the body's length header line(s)."""
        parts = [self.method, b" ", self.path, b" HTTP/1.1\r\n"]
        has_host = False
        headers = self.headers
        for name, value in (headers if type(headers) is list
                            else pairs_of(headers)):  # type: ignore[arg-type]
            lower = name.lower()
            if lower in _FRAMING:
                if lower != b"host":
                    continue
                has_host = True
            parts += (name, b": ", value, b"\r\n")
        if not has_host:
            parts += (b"Host: ", self.authority, b"\r\n")
        parts += (framing, b"\r\n")
        return b"".join(parts)


@implementer(IAgent)
class BackendAgent:
    """An C{IAgent} for C{http://} URLs of local backends, with its own keep-alive pool.

    @param reactor: an C{IReactorTCP}.
    @param connect_timeout: seconds a TCP connect may take.
    @param max_idle: idle connections kept per host and port.
    @param connect_burst: most connections being opened to one host and port at once (None:
        no limit). A request that finds none idle while that many are being opened waits for
        the first connection to come free or to be opened: a backend that just became ready
        is never sent more connection attempts at once than its listen backlog may hold.
    """

    def __init__(self, reactor: IReactorTCP, *, connect_timeout: float = 10.0, max_idle: int = 64,
                 connect_burst: Optional[int] = None) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._burst = connect_burst
        self._connecting: dict[Origin, int] = {}
        self._backlog: dict[Origin, deque[_Request]] = {}
        self._idle: dict[Origin, list[_Connection]] = {}
        self._targets: dict[bytes, tuple[Origin, bytes, bytes]] = {}
        self._closing = False

    def request(self, method: bytes, uri: bytes,
                headers: Headers | list[tuple[bytes, bytes]] | None = None,
                bodyProducer: Optional[IBodyProducer] = None) -> Deferred[IResponse]:
        """C{IAgent.request}; C{headers} may also be a list of C{(name, value)} pairs."""
        target = self._targets.get(uri)
        if target is None:
            try:
                target = self._split(uri)
            except ValueError as e:
                return fail(SchemeNotSupported(str(e)))
            if len(self._targets) >= 1024:
                self._targets.clear()
            self._targets[uri] = target
        key, authority, path = target
        if headers is None:
            headers = []
        request = _Request(method, uri, path, key, authority, headers, bodyProducer)
        connection = self._checkout(key)
        if connection is not None:
            connection.send(request)
        elif self._burst is None or self._connecting.get(key, 0) < self._burst:
            self._connect(request)
        else:
            backlog = self._backlog.get(key)
            if backlog is None:
                backlog = self._backlog[key] = deque()
            request.backlog = backlog
            backlog.append(request)
        return request.deferred

    def _split(self, uri: bytes) -> tuple[Origin, bytes, bytes]:
        """(host, port), the authority and the request target of an C{http://} URL."""
        scheme, sep, rest = uri.partition(b"://")
        if not sep or scheme.lower() != b"http":
            raise ValueError(f"only http:// URLs are supported, not {uri[:100]!r}")
        slash = rest.find(b"/")
        if slash < 0:
            authority, path = rest, b"/"
        else:
            authority, path = rest[:slash], rest[slash:]
        path = path.partition(b"#")[0]
        return _origin(authority), authority, path

    def _checkout(self, key: Origin) -> Optional["_Connection"]:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.alive():
                return connection
            connection.abort()
        return None

    def _connect(self, request: _Request) -> None:
        host, port = request.key
        factory = _ConnectionFactory(self, request)
        if self._burst is not None:
            self._connecting[request.key] = self._connecting.get(request.key, 0) + 1
        request.connector = self._reactor.connectTCP(host, port, factory,
                                                     timeout=self._connect_timeout)

    def _connect_ended(self, key: Origin) -> None:
        """A connection attempt succeeded or failed: start the next waiting one."""
        if self._burst is None:
            return
        left = self._connecting.get(key, 1) - 1
        if left > 0:
            self._connecting[key] = left
        else:
            self._connecting.pop(key, None)
        backlog = self._backlog.get(key)
        while backlog and self._connecting.get(key, 0) < self._burst:
            request = backlog.popleft()
            request.backlog = None
            connection = self._checkout(key)
            if connection is not None:
                connection.send(request)
            else:
                self._connect(request)
        if backlog is not None and not backlog:
            self._backlog.pop(key, None)

    def _waiting(self, key: Origin) -> Optional[_Request]:
        """The oldest request waiting for a connection to C{key}, taken off the backlog."""
        backlog = self._backlog.get(key)
        if not backlog:
            return None
        request = backlog.popleft()
        request.backlog = None
        if not backlog:
            self._backlog.pop(key, None)
        return request

    def _recycle(self, connection: "_Connection") -> None:
        """Give an IDLE connection the oldest waiting request, else pool or close it."""
        waiting = self._waiting(connection.key)
        if waiting is not None:
            connection.send(waiting)
            return
        idle = self._idle.setdefault(connection.key, [])
        if self._closing or len(idle) >= self._max_idle:
            connection.close()
            return
        idle.append(connection)

    def _forget(self, connection: "_Connection") -> None:
        """An IDLE connection closes or was lost: out of the pool with it (if there)."""
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def closeCachedConnections(self) -> Deferred[None]:
        """Close the idle connections (and any that turn idle later); fires when they are
        closed."""
        self._closing = True
        closing = []
        for idle in self._idle.values():
            while idle:
                connection = idle.pop()
                closing.append(connection.when_lost())
                connection.close()
        if not closing:
            return succeed(None)
        done: Deferred[None] = Deferred()
        remaining = [len(closing)]

        def one(_: object) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.callback(None)

        for d in closing:
            d.addBoth(one)
        return done


def _origin(authority: bytes) -> Origin:
    if authority.startswith(b"["):
        host, _, rest = authority[1:].partition(b"]")
        port = rest[1:] if rest.startswith(b":") else b""
    else:
        host, _, port = authority.partition(b":")
    if not host:
        raise ValueError(f"no host in {authority[:100]!r}")
    try:
        return host.decode("ascii"), int(port) if port else 80
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"bad host or port in {authority[:100]!r}") from None


class _ConnectionFactory(ClientFactory):
    noisy = False

    def __init__(self, agent: BackendAgent, request: _Request) -> None:
        self._agent = agent
        self._request = request

    def buildProtocol(self, addr: Optional[IAddress]) -> _Connection:
        return _Connection(self._agent, self._request)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        request = self._request
        request.connector = None
        self._agent._connect_ended(request.key)
        if not request.deferred.called:
            request.deferred.errback(reason)


@implementer(IResponse)
class BackendResponse:
    """A response whose body is handed to the body protocol as it arrives.

    The body protocol's transport is a L{_BodyTransport}: pausing it pauses reading from the
    backend, stopping it closes the backend connection.

    @ivar raw_headers: the headers as C{(name, value)} pairs, as received (C{headers}, the
        C{Headers} object, is made from them on first use).
    """

    version = (b"HTTP", 1, 1)
    previousResponse = None

    def __init__(self, info: tuple[bytes, bytes, Headers | list[tuple[bytes, bytes]]],
                 code: int, phrase: bytes, raw_headers: list[tuple[bytes, bytes]],
                 length: int | str,
                 connection: "_Connection") -> None:
        self._info = info
        self.code = code
        self.phrase = phrase
        self.raw_headers = raw_headers
        self._headers: Optional[Headers] = None
        self.length = length
        self._connection: Optional[_Connection] = connection
        self._protocol: Any = None  # the body's protocol, then _DELIVERED
        self._buffer: list[bytes] = []
        self._end: Optional[Failure] = None
        self._complete = False

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            self._headers = headers_of(self.raw_headers)
        return self._headers

    def complete_body(self) -> Optional[bytes]:
        """The whole body, if all of it arrived and it was not delivered yet; else None.
        Either way the body can still be delivered (L{deliverBody}) afterwards."""
        if not self._complete or self._protocol is not None:
            return None
        return b"".join(self._buffer)

    @property
    def request(self) -> IClientRequest:
        return _RequestInfo(*self._info)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: IProtocol) -> None:
        if self._protocol is not None:
            raise RuntimeError("the body of a response can be delivered only once")
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self))  # type: ignore[arg-type]  # a producer
        buffered, self._buffer = self._buffer, []
        for data in buffered:
            protocol.dataReceived(data)
        if self._complete:
            self._protocol = _DELIVERED
            protocol.connectionLost(Failure(ResponseDone()))
        elif self._end is not None:
            self._protocol = _DELIVERED
            protocol.connectionLost(self._end)

    def _data(self, data: bytes) -> None:
        if self._protocol is None:
            self._buffer.append(data)
        else:
            self._protocol.dataReceived(data)

    def _finish(self, reason: Optional[Failure] = None) -> None:
        """The body ended: completely (no C{reason}), or with C{reason}."""
        self._connection = None
        protocol = self._protocol
        if protocol is not None:
            # The body protocol refers to this response through its transport: letting go
            # of it here lets both die without the cyclic garbage collector.
            self._protocol = _DELIVERED
        if reason is None:
            self._complete = True
            if protocol is not None:
                protocol.connectionLost(Failure(ResponseDone()))
            return
        self._end = reason
        if protocol is not None:
            protocol.connectionLost(reason)


#: The body protocol of a response whose body was delivered to the end.
_DELIVERED = object()


@implementer(IPushProducer)
class _BodyTransport:
    """The transport a response's body protocol sees: the backend connection, while the body
    is still arriving on it."""

    def __init__(self, response: BackendResponse) -> None:
        self._response = response

    def pauseProducing(self) -> None:
        connection = self._response._connection
        if connection is not None:
            connection.pause()

    def resumeProducing(self) -> None:
        connection = self._response._connection
        if connection is not None:
            connection.resume()

    def stopProducing(self) -> None:
        connection = self._response._connection
        if connection is not None:
            connection.abort()

    def loseConnection(self) -> None:
        self.stopProducing()


class _Unexpected(Exception):
    """The backend sent bytes that belong to no request."""


class ConnectionState(str, Enum):
    """Where a backend connection is in its life; compares equal to its value ('idle').

    A str-Enum, as L{llmnode.lifecycle.State}: its members hash in C, so checking a move
    against L{CONNECTION_MOVES} makes no Python call."""

    CONNECTING = "connecting"
    IDLE = "idle"
    AWAITING_HEAD = "awaiting-head"
    READING_BODY = "reading-body"
    COMPLETE = "complete"
    CLOSING = "closing"
    CLOSED = "closed"

    def __str__(self) -> str:
        return self.value


CONNECTING, IDLE, AWAITING_HEAD, READING_BODY, COMPLETE, CLOSING, CLOSED = ConnectionState

#: The moves a connection may make; see L{_Connection} for when each happens.
CONNECTION_MOVES: dict[ConnectionState, frozenset[ConnectionState]] = {
    CONNECTING: frozenset({AWAITING_HEAD, IDLE, CLOSED}),
    IDLE: frozenset({AWAITING_HEAD, CLOSING, CLOSED}),
    AWAITING_HEAD: frozenset({READING_BODY, COMPLETE, CLOSING, CLOSED}),
    READING_BODY: frozenset({COMPLETE, CLOSING, CLOSED}),
    COMPLETE: frozenset({IDLE, CLOSING, CLOSED}),
    CLOSING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}

#: A connection's transition hook: C{(connection, old, new)}.
ConnectionMoveHook = Callable[["_Connection", ConnectionState, ConnectionState], None]


class _Connection(Protocol):
    """One keep-alive connection to a backend; carries one request at a time.

    Its life is C{state}, moved only along L{CONNECTION_MOVES}::

        CONNECTING    -> AWAITING_HEAD  connected: the first request is written
        CONNECTING    -> IDLE           connected, but the first request was cancelled
        IDLE          -> AWAITING_HEAD  a request from the pool or the backlog is written
        IDLE          -> CLOSING        pool full or closed, found dead at checkout, or
                                        the backend sent bytes nobody asked for
        AWAITING_HEAD -> READING_BODY   a final (non-1xx) status line and headers arrived
        AWAITING_HEAD -> COMPLETE       ... the answer to a HEAD request (it has no body)
        AWAITING_HEAD -> CLOSING        cancelled, unparsable answer, or upload failed
        READING_BODY  -> COMPLETE       the whole body arrived
        READING_BODY  -> CLOSING        the body's reader stopped it, unparsable body, or
                                        upload failed
        COMPLETE      -> IDLE           keep-alive: back to the agent (pool or backlog)
        COMPLETE      -> CLOSING        no keep-alive, or the upload is still being sent
        any but CLOSED -> CLOSED        the connection is lost (C{connectionLost})

    The response is handed out at the end of the read that brought its head (with whatever
    body came along), so READING_BODY and COMPLETE without a response last only until that
    read's end, and COMPLETE never outlives the read that completed the message. A connection
    the agent pools is IDLE, and leaves the pool as it closes or is lost. CLOSING means we asked the transport to close (an abort may
    follow a graceful close); a body aborted by its reader that still completes within the
    same read is finished there.

    Every move goes through L{_move} (checks the table, raises L{InvalidTransition} on a bug,
    calls C{on_move} when set), except the four every request makes, which assign C{state}
    directly when the move is legal and nobody watches: same effect, no call.

    Not lifecycle, so kept as data: the message's framing (C{_length}, C{_chunked},
    C{_keep_alive}), flow control (C{_paused}: reading from the backend is paused) and the
    exchange itself (C{_request}, C{_response}).

    @ivar on_move: called with C{(connection, old, new)} after every move (tests watch
        with it); None (the class default) in the node.
    """

    transport: ITCPConnection
    on_move: Optional[ConnectionMoveHook] = None

    def __init__(self, agent: BackendAgent, first: _Request) -> None:
        self._agent = agent
        self.key = first.key
        self.state = CONNECTING
        self._first: Optional[_Request] = first
        self._parser = HttpResponseParser(self)
        self._request: Optional[_Request] = None
        self._response: Optional[BackendResponse] = None
        self._lost: list[Deferred[None]] = []
        self._paused = False
        self._socket: Optional[socket.socket] = None
        self._writer: SocketWriter = None  # type: ignore[assignment]  # connectionMade sets it

    def _move(self, new: ConnectionState) -> None:
        """Go to C{new} and tell C{on_move}.

        @raise InvalidTransition: the table has no such move (a bug; logged as well, since
            the parser's callbacks would hide it in a parse error)."""
        old = self.state
        if new not in CONNECTION_MOVES[old]:
            message = f"backend connection to {self.key}: {old} -> {new}"
            _log.critical("illegal move: {message}", message=message)
            raise InvalidTransition(message)
        self.state = new
        if self.on_move is not None:
            self.on_move(self, old, new)

    # Connection life.

    def connectionMade(self) -> None:
        handle = getattr(self.transport, "getHandle", None)
        if handle is not None and isinstance(handle(), socket.socket):
            self._socket = handle()
        self._writer = SocketWriter(self.transport)
        first, self._first = cast(_Request, self._first), None
        first.connector = None
        self._agent._connect_ended(self.key)
        if first.deferred.called:
            self._move(IDLE)
            self._agent._recycle(self)
        else:
            self.send(first)

    def alive(self) -> bool:
        """Whether this idle connection is still open at the backend's end (and the backend
        sent nothing on it)."""
        if self.state is not IDLE:
            return False
        if self._socket is None:
            return True
        try:
            self._socket.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires once the connection is CLOSED."""
        d: Deferred[None] = Deferred()
        if self.state is CLOSED:
            d.callback(None)
        else:
            self._lost.append(d)
        return d

    def close(self) -> None:
        """Close once what was written is sent (IDLE or COMPLETE)."""
        if self.state is IDLE:
            self._agent._forget(self)
        self._move(CLOSING)
        self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection now (also one that is closing); nothing if already lost."""
        state = self.state
        if state is CLOSED:
            return
        if state is not CLOSING:
            if state is IDLE:
                self._agent._forget(self)
            self._move(CLOSING)
        self.transport.abortConnection()

    def pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    # Sending.

    def send(self, request: _Request) -> None:
        """Write C{request} (from CONNECTING or IDLE) and wait for its answer."""
        if self.on_move is None and AWAITING_HEAD in CONNECTION_MOVES[self.state]:
            self.state = AWAITING_HEAD
        else:
            self._move(AWAITING_HEAD)
        request.connection = self
        self._request = request
        self._response = None
        self._status = 0
        self._phrase = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._length: Optional[int] = None
        self._chunked = False
        self._keep_alive = False
        self._pending_body: list[bytes] = []
        body = request.body
        if body is None:
            framing = b"Content-Length: 0\r\n" if request.method in _BODY_METHODS else b""
            self._writer.write(request.head(framing))
        elif isinstance(body, BytesBody):
            head = request.head(b"Content-Length: %d\r\n" % body.length)
            if body.length > _JOIN_BODY_UP_TO:
                self._writer.write(head)  # not joined: a copy of a large body blocks
                self._writer.write(body.body)
            else:
                self._writer.write(head + body.body)
        else:
            self._send_producer(request, body)

    def _send_producer(self, request: _Request, body: IBodyProducer) -> None:
        self._writer.buffered()
        chunked = body.length is UNKNOWN_LENGTH
        self.transport.write(request.head(
            b"Transfer-Encoding: chunked\r\n" if chunked
            else b"Content-Length: %d\r\n" % body.length))
        request.body_pending = True
        consumer = _BodyConsumer(self.transport, chunked)
        # As twisted's HTTP client does: the body is the connection's producer while it is
        # sent, so that a full connection pauses it.
        self.transport.registerProducer(body, True)
        done = maybeDeferred(body.startProducing, consumer)

        def sent(_: object) -> None:
            if request.body_pending:
                request.body_pending = False
                self.transport.unregisterProducer()
                consumer.finish()

        def failed(reason: Failure) -> None:
            if not request.body_pending:
                return
            request.body_pending = False
            self.transport.unregisterProducer()
            if not request.deferred.called:
                request.deferred.errback(RequestGenerationFailed([reason]))
            if request is self._request:
                self.abort()

        done.addCallbacks(sent, failed)

    # Receiving (httptools callbacks, then what follows a feed).

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state is not AWAITING_HEAD and state is not READING_BODY:
            self.abort()  # bytes that answer no request
            return
        try:
            self._parser.feed_data(data)
        except HttpParserError as e:
            if self.state is not COMPLETE:
                cause = e.__context__ if isinstance(e.__context__, _Unexpected) else e
                self._broken(Failure(cause))
                return
            self._keep_alive = False
        state = self.state
        if state is COMPLETE:
            if self._response is None:
                # The whole answer is here: its user gets a finished response, and the
                # connection is free again before any of the user's code runs.
                request: _Request = self._request  # type: ignore[assignment]
                response = self._make_response()
                self._finish_message()
                if not request.deferred.called:
                    request.deferred.callback(response)
            else:
                self._finish_message()
        elif state is READING_BODY and self._response is None:
            request = self._request  # type: ignore[assignment]
            response = self._make_response()
            if not request.deferred.called:
                request.deferred.callback(response)

    def on_message_begin(self) -> None:
        if self.state is not AWAITING_HEAD:
            raise _Unexpected("the backend sent more than one response")

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            try:
                self._length = int(value)
            except ValueError:
                raise _Unexpected("bad Content-Length") from None
        elif lower == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise _Unexpected("the backend switched protocols")
            self._phrase = b""
            self._headers = []
            self._length = None
            self._chunked = False
            return
        self._status = status
        self._keep_alive = self._parser.should_keep_alive()
        request: _Request = self._request  # type: ignore[assignment]
        new = COMPLETE if request.method == b"HEAD" else READING_BODY
        if self.on_move is None and new in CONNECTION_MOVES[self.state]:
            self.state = new
        else:
            self._move(new)

    def on_body(self, data: bytes) -> None:
        if self._response is None:
            self._pending_body.append(data)
        else:
            self._response._data(data)

    def on_message_complete(self) -> None:
        state = self.state
        if state is READING_BODY:
            if self.on_move is None:
                self.state = COMPLETE
            else:
                self._move(COMPLETE)
        elif state is CLOSING and self._response is not None:
            # The body's reader stopped it during this read, yet all of it came.
            self._finish_message()

    def _make_response(self) -> BackendResponse:
        request: _Request = self._request  # type: ignore[assignment]
        status = self._status
        length: int | str  # or UNKNOWN_LENGTH
        if request.method == b"HEAD" or status in (204, 304):
            length = 0
        elif self._chunked or self._length is None:
            length = UNKNOWN_LENGTH
        else:
            length = self._length
        response = BackendResponse((request.method, request.uri, request.headers), status,
                                   self._phrase.strip(), self._headers, length, self)
        self._response = response
        for data in self._pending_body:
            response._data(data)
        self._pending_body = []
        return response

    def _finish_message(self) -> None:
        """The message is complete: end the response and reuse or close the connection
        (COMPLETE), or only end the response (CLOSING: its reader stopped it)."""
        # Annotations rather than cast(): this runs for every response.
        response: BackendResponse = self._response  # type: ignore[assignment]
        request: _Request = self._request  # type: ignore[assignment]
        self._request = None
        self._response = None
        request.connection = None
        if self.state is not COMPLETE:
            request.stop_body()
        elif request.body_pending:
            request.stop_body()
            self.close()
        elif self._keep_alive and request.method != b"HEAD":
            if self._paused:
                self.resume()
            if self.on_move is None:
                self.state = IDLE
            else:
                self._move(IDLE)
            self._agent._recycle(self)
        else:
            self.close()
        response._finish()

    def _broken(self, reason: Failure) -> None:
        """The backend's answer cannot be parsed: fail what waits on it and close."""
        request, response = self._request, self._response
        self._request = None
        self._response = None
        self.abort()
        if request is not None:
            request.stop_body()
        if response is not None:
            response._finish(Failure(ResponseFailed([reason])))
        elif request is not None and not request.deferred.called:
            request.deferred.errback(ResponseFailed([reason]))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        old = self.state
        self._move(CLOSED)
        if old is IDLE:
            self._agent._forget(self)
        request, response = self._request, self._response
        self._request = None
        self._response = None
        if request is not None:
            request.stop_body()
        if response is not None:
            until_eof = not self._chunked and self._length is None
            if old is COMPLETE:
                response._finish()
            elif until_eof and reason.check(ConnectionDone):
                response._finish(Failure(PotentialDataLoss()))
            else:
                response._finish(Failure(ResponseFailed([reason])))
        elif request is not None and not request.deferred.called:
            request.deferred.errback(ResponseNeverReceived([reason]))
        lost, self._lost = self._lost, []
        for d in lost:
            d.callback(None)


@implementer(IConsumer)
class _BodyConsumer:
    """Writes a streamed request body to the connection, chunk-encoded when its length is
    unknown."""

    def __init__(self, transport: ITCPConnection, chunked: bool) -> None:
        self._transport = transport
        self._chunked = chunked

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            self._transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self._transport.write(data)

    def finish(self) -> None:
        if self._chunked:
            self._transport.write(b"0\r\n\r\n")
