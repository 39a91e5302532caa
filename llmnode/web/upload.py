"""A large upload handed to its backend as it arrives, never held whole in the node.

The server (L{llmnode.web.server}) dispatches a request whose body is to be streamed once its
headers are read, with a L{BodyStream} in place of the body. The proxy reads the beginning of
the body from it until the routing fields are known (an audio or image upload names its model
in a form field, usually before the file), then hands it to the backend request as that
request's body producer: what was held so far goes first, the rest is written to the backend
as it arrives, and reading from the client pauses while the backend connection is full.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConsumer

    from llmnode.web.sockets import ITCPConnection

#: Uploads with a C{Content-Length} above this many bytes are streamed; smaller ones are read
#: whole, like any request body.
STREAM_ABOVE = 1024 * 1024

#: Bytes held for a routed upload while nobody consumes it yet (its model is starting):
#: beyond it, reading from the client pauses.
HOLD_LIMIT = 1024 * 1024


@implementer(IBodyProducer)
class BodyStream:
    """The body of one request, as it arrives: held until a consumer takes it, then relayed.

    The channel calls L{received}, L{completed} and L{lost}; the reader looks at L{held}
    (watching arrivals with L{watch}), and the backend request consumes it as an
    C{IBodyProducer}.

    @param transport: the client connection (paused and resumed for backpressure).
    @param length: the body's C{Content-Length}.
    @ivar complete: the whole body has arrived.
    @ivar failure: why the body will never be complete (the client left), or None.
    """

    def __init__(self, transport: ITCPConnection, length: int) -> None:
        self.length = length
        self.complete = False
        self.failure: Optional[Failure] = None
        self._transport = transport
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._hold_limit: Optional[int] = None
        self._watcher: Optional[Callable[[], None]] = None
        self._consumer: Optional[IConsumer] = None
        self._done: Optional[Deferred[None]] = None
        self._stopped = False
        self._holding_back = False  # reading paused because too much is held
        self._backend_full = False  # reading paused because the backend is

    # -- the channel's side ------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        if self._consumer is not None:
            self._consumer.write(data)
            return
        if self._stopped:
            return
        self._held.append(data)
        self._held_bytes += len(data)
        self._limit_holding()
        self._tell()

    def completed(self) -> None:
        self.complete = True
        self._read_on()
        if self._consumer is not None:
            self._finish(None)
        else:
            self._tell()

    def lost(self, reason: Failure) -> None:
        """The client left before the whole body arrived."""
        if self.complete or self.failure is not None:
            return
        self.failure = reason
        if self._consumer is not None:
            self._finish(reason)
        else:
            self._tell()

    # -- the reader's side -------------------------------------------------------------------

    def held(self) -> bytes:
        """What arrived and was not consumed yet."""
        if len(self._held) > 1:
            self._held = [b"".join(self._held)]
        return self._held[0] if self._held else b""

    def replace_held(self, data: bytes) -> None:
        """Send C{data} instead of what is held (an edited beginning of the body); the
        body's length changes by as much as the held part's."""
        self.length += len(data) - self._held_bytes
        self._held = [data]
        self._held_bytes = len(data)

    def watch(self, watcher: Optional[Callable[[], None]]) -> None:
        """Call C{watcher()} whenever more arrived, the body completed or the client left."""
        self._watcher = watcher

    def hold_at_most(self, limit: int) -> None:
        """From now on, pause reading from the client while more than C{limit} bytes are
        held (until a consumer takes them)."""
        self._hold_limit = limit
        self._limit_holding()

    # -- IBodyProducer -------------------------------------------------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._watcher = None
        held, self._held, self._held_bytes = self._held, [], 0
        for data in held:
            consumer.write(data)
        if self.failure is not None:
            return fail(self.failure)
        if self.complete:
            return succeed(None)
        self._consumer = consumer  # which registered this as its producer (IBodyProducer)
        self._done = Deferred()
        if self._holding_back:
            self._holding_back = False
            self._resume_reading()
        return self._done

    def pauseProducing(self) -> None:
        if not self._backend_full and self._reading():
            self._backend_full = True
            self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._backend_full:
            self._backend_full = False
            self._resume_reading()

    def stopProducing(self) -> None:
        """Nobody wants the rest (the backend request ended, or the answer was given before
        the body arrived whole): what arrives from now on is dropped, and a backend request
        still sending this body fails."""
        self._stopped = True
        self._held, self._held_bytes = [], 0
        self._consumer = None
        done, self._done = self._done, None
        if done is not None:
            done.errback(Failure(BodyAbandoned()))
        if not self.complete and self.failure is None:
            self._read_on()

    def _read_on(self) -> None:
        """Resume reading from the client if this paused it: the body is complete (the
        next request follows), or nobody wants the rest."""
        paused = self._backend_full or self._holding_back
        self._backend_full = self._holding_back = False
        if paused:
            self._transport.resumeProducing()

    # -- inside ------------------------------------------------------------------------------

    def _reading(self) -> bool:
        return not (self.complete or self.failure is not None or self._stopped)

    def _resume_reading(self) -> None:
        if self._reading() and not (self._backend_full or self._holding_back):
            self._transport.resumeProducing()

    def _limit_holding(self) -> None:
        limit = self._hold_limit
        if (limit is not None and not self._holding_back and self._held_bytes > limit
                and self._reading()):
            self._holding_back = True
            if not self._backend_full:
                self._transport.pauseProducing()

    def _tell(self) -> None:
        watcher = self._watcher
        if watcher is not None:
            watcher()

    def _finish(self, failure: Optional[Failure]) -> None:
        self._consumer = None
        done, self._done = self._done, None
        if done is not None:
            if failure is None:
                done.callback(None)
            else:
                done.errback(failure)


class BodyAbandoned(Exception):
    """The rest of a streamed request body will not be sent."""
