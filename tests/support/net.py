"""Real sockets for tests: free ports, sites that clean up their connections, HTTP clients."""

from __future__ import annotations

import socket
from http.cookiejar import CookieJar, DefaultCookiePolicy

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from llmnode.web.server import NodeSite


#: The ports L{free_port} handed out in this process.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking), and that this
    process was not given before: two calls before anything listens get two ports (the kernel
    may offer a port it just offered again)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class TrackedSite(Site):
    """A Site that remembers its open channels, so a test can close them all."""

    noisy = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channels: dict = {}

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        lost: Deferred = Deferred()
        self.channels[channel] = lost
        original = channel.connectionLost

        def connectionLost(reason):
            self.channels.pop(channel, None)
            try:
                original(reason)
            finally:
                lost.callback(None)

        channel.connectionLost = connectionLost
        return channel

    def close_all(self) -> Deferred:
        """Abort every open connection; fire once all are gone."""
        waiting = list(self.channels.values())
        for channel in list(self.channels):
            transport = getattr(getattr(channel, "_channel", channel), "transport", None)
            if transport is not None:
                transport.abortConnection()
        return DeferredList(waiting) if waiting else succeed(None)


def listen(testcase, resource, **site_kwargs) -> tuple[TrackedSite, int]:
    """Serve C{resource} on 127.0.0.1:0 until the test ends; return the site and its port."""
    site = TrackedSite(resource, **site_kwargs)
    return site, _serve(testcase, site)


def _serve(testcase, site) -> int:
    port = reactor.listenTCP(0, site, interface="127.0.0.1")

    async def close():
        await port.stopListening()
        await site.close_all()

    testcase.addCleanup(lambda: Deferred.fromCoroutine(close()))
    return port.getHost().port


def listen_node(testcase, resource, *, max_body_bytes=None) -> tuple[NodeSite, int]:
    """Serve C{resource} with the node's own server (L{NodeSite}) on 127.0.0.1:0 until the
    test ends; return the site and its port."""
    site = NodeSite(resource, max_body_bytes=max_body_bytes)
    return site, _serve(testcase, site)


def http_client(testcase) -> HTTPClient:
    """A treq client with its own persistent pool and a jar that keeps no cookies; the pool is
    closed when the test ends. The same shape as the node's own client."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.retryAutomatically = False
    testcase.addCleanup(pool.closeCachedConnections)
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return HTTPClient(Agent(reactor, pool=pool), cookiejar=jar)


class RawClient(Protocol):
    """A bare TCP client that records every read with its arrival time.

    @ivar reads: C{(seconds, bytes)} per C{dataReceived} call.
    @ivar lost: fires (with None) once the connection is closed; C{reason} says why.
    """

    def __init__(self):
        self.reads: list[tuple[float, bytes]] = []
        self.lost: Deferred = Deferred()
        self.connected_ = False
        self.reason = None
        self._received = bytearray()
        self._watch: list[tuple[bytes, Deferred]] = []

    def connectionMade(self):
        self.connected_ = True

    def dataReceived(self, data):
        now = reactor.seconds()
        self.reads.append((now, data))
        self._received += data
        if not self._watch:
            return
        still = []
        for needle, waiter in self._watch:
            if needle in self._received:
                waiter.callback(now)
            else:
                still.append((needle, waiter))
        self._watch = still

    def connectionLost(self, reason):
        self.connected_ = False
        self.reason = reason
        self.lost.callback(None)

    @property
    def data(self) -> bytes:
        return bytes(self._received)

    def when_received(self, needle: bytes) -> Deferred:
        """Fire with the time once C{needle} has arrived (at once if it already has)."""
        if needle in self._received:
            return succeed(reactor.seconds())
        waiter: Deferred = Deferred()
        self._watch.append((needle, waiter))
        return waiter


async def raw_connect(testcase, port: int) -> RawClient:
    """Connect a L{RawClient} to 127.0.0.1:C{port}; it is aborted when the test ends."""
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)

    def close():
        if client.connected_:
            client.transport.abortConnection()
        return client.lost

    testcase.addCleanup(close)
    return client


def http_request(method: str, path: str, body: bytes = b"", headers: dict | None = None,
                 chunked: bool = False) -> bytes:
    """The bytes of one HTTP/1.1 request (C{Content-Length} or chunked body)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
            for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def decode_chunked(data: bytes) -> tuple[bytes, bool]:
    """The body of a chunked HTTP/1.1 response (headers included in C{data}), and whether
    it ended with the terminating zero-length chunk."""
    _, _, rest = data.partition(b"\r\n\r\n")
    body = []
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return b"".join(body), False
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return b"".join(body), rest.startswith(b"\r\n")
        if len(rest) < size + 2:
            body.append(rest[:size])
            return b"".join(body), False
        body.append(rest[:size])
        rest = rest[size + 2:]


def parse_response(data: bytes) -> tuple[int, dict, bytes, bool]:
    """Status, headers (lower-case name -> list of values), body and whether the body is
    complete, from the raw bytes of one HTTP/1.1 response."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
        body, complete = decode_chunked(data)
        return status, headers, body, complete
    if "content-length" in headers:
        length = int(headers["content-length"][0])
        return status, headers, rest[:length], len(rest) >= length
    return status, headers, rest, True
