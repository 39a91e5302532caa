"""In-process backends with precise, scripted behaviour (streams, stalls, deaths)."""

from __future__ import annotations

import json
from typing import Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer


class BackendExchange:
    """One request as the backend saw it.

    @ivar closed: fires with the time the client (the proxy) went away, if it did.
    @ivar body: the request body.
    """

    def __init__(self, request):
        self.request = request
        self.body = request.content.read()
        self.gone = False
        self.closed: Deferred = Deferred()
        self._calls = []
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, _):
        self.gone = True
        for call in self._calls:
            if call.active():
                call.cancel()
        self.closed.callback(reactor.seconds())

    def later(self, seconds: float, function, *args) -> None:
        """Call C{function} after C{seconds} unless the client has left by then."""
        self._calls.append(reactor.callLater(seconds, self._unless_gone, function, *args))

    def _unless_gone(self, function, *args):
        if not self.gone:
            function(*args)

    def die(self) -> None:
        """Drop the connection mid-response."""
        self.request.transport.abortConnection()


class ScriptedBackend(Resource):
    """Answers every request with C{script(exchange)}; remembers every exchange."""

    isLeaf = True

    def __init__(self, script: Callable[[BackendExchange], None]):
        super().__init__()
        self._script = script
        self.exchanges: list[BackendExchange] = []
        self.arrived: Deferred = Deferred()

    def render(self, request):
        request.transport.setTcpNoDelay(True)
        exchange = BackendExchange(request)
        self.exchanges.append(exchange)
        self._script(exchange)
        if not self.arrived.called:
            self.arrived.callback(exchange)
        return NOT_DONE_YET


def sse_event(index: int) -> bytes:
    """One SSE event carrying its index and the time it was sent."""
    return b"data: " + json.dumps({"index": index, "sent": reactor.seconds()}).encode() + b"\n\n"


def sse_script(count: int, interval: float, end: str = "finish"):
    """Send C{count} events C{interval} apart, then C{end}: "finish", "die" or "hang"."""
    def script(exchange: BackendExchange) -> None:
        exchange.request.setHeader(b"Content-Type", b"text/event-stream")

        def send(index: int) -> None:
            if index == count:
                if end == "finish":
                    exchange.request.finish()
                elif end == "die":
                    exchange.die()
                return
            exchange.request.write(sse_event(index))
            exchange.later(interval, send, index + 1)

        send(0)
    return script


@implementer(IPushProducer)
class BulkWriter:
    """Writes C{total} bytes in blocks as fast as the transport lets it (a push producer).

    @ivar produced: bytes written so far; C{pauses}: how often the transport paused it.
    """

    def __init__(self, exchange: BackendExchange, total: int, block: int = 65536):
        self._exchange = exchange
        self._total = total
        self._block = b"z" * block
        self.produced = 0
        self.pauses = 0
        self.paused = False
        self._call = None

    def start(self) -> None:
        request = self._exchange.request
        request.setHeader(b"Content-Length", b"%d" % self._total)
        request.registerProducer(self, True)
        self._schedule()

    def _schedule(self):
        if self._call is None and not self.paused:
            self._call = reactor.callLater(0, self._write)

    def _write(self):
        self._call = None
        if self.paused or self._exchange.gone:
            return
        request = self._exchange.request
        for _ in range(16):
            if self.paused or self.produced >= self._total:
                break
            data = self._block[:self._total - self.produced]
            self.produced += len(data)
            request.write(data)
        if self.produced >= self._total:
            request.unregisterProducer()
            request.finish()
            return
        self._schedule()

    def pauseProducing(self):
        self.pauses += 1
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._schedule()

    def stopProducing(self):
        self.paused = True
