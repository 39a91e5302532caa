"""The streaming relay: a backend's response body copied to the client as it arrives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, cast

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from llmnode.web.headers import headers_of, pairs_of
from llmnode.web.responses import PendingResponse

if TYPE_CHECKING:
    from llmnode.web.backend_http import BackendAnswer
    from llmnode.web.request import WebRequest

log = Logger()

#: Headers that describe one connection, never the message (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})


def end_to_end(headers: Headers, also_drop: frozenset[bytes] = frozenset()) -> Headers:
    """A copy of C{headers} without hop-by-hop ones, those named in C{Connection}, and
    C{also_drop} (lower-case names)."""
    return headers_of(end_to_end_pairs(pairs_of(headers), also_drop))


def end_to_end_pairs(pairs: list[tuple[bytes, bytes]],
                     also_drop: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """The C{(name, value)} pairs that L{end_to_end} would keep, from raw pairs."""
    dropped = _DROPPED.get(also_drop)
    if dropped is None:
        dropped = _DROPPED[also_drop] = HOP_BY_HOP | also_drop
    kept = []
    named = None
    for pair in pairs:
        lower = pair[0].lower()
        if lower not in dropped:
            kept.append(pair)
        elif lower == b"connection":
            named = (named or set()) | {token.strip().lower() for token in pair[1].split(b",")}
    if named:
        kept = [pair for pair in kept if pair[0].lower() not in named]
    return kept


#: HOP_BY_HOP with each set of names also dropped by a caller.
_DROPPED: dict[frozenset[bytes], frozenset[bytes]] = {}


def forwarded_headers(request: WebRequest,
                      also_drop: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """The end-to-end headers of a client's request (see L{end_to_end}) as C{(name, value)}
    pairs, as L{llmnode.web.backend_http.BackendHTTP.send} takes them."""
    return end_to_end_pairs(request.header_items(), also_drop)


#: Response headers the relay sets itself.
_NOT_RELAYED = frozenset({b"content-length"})


def is_event_stream(pairs: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response's content type (in its header C{pairs}) is C{text/event-stream}."""
    for name, value in pairs:
        if name.lower() == b"content-type":
            return _is_event_stream_type(value)
    return False


def _is_event_stream_type(value: bytes) -> bool:
    return value.split(b";")[0].strip().lower() == b"text/event-stream"


@implementer(IPushProducer)
class StreamRelay(Protocol):
    """Copies one backend response to a client, chunk by chunk, with backpressure.

    It is the response body's protocol (its transport is the backend connection) and the
    client request's push producer: a slow client pauses reading from the backend. The client
    leaving, or the backend staying silent for C{idle_timeout} seconds, closes the backend
    connection. A body that ends in error cuts the client's connection, so the client sees an
    incomplete body, never a clean end.

    @param on_end: called once with None (whole body relayed) or the Failure that ended it.
    """

    def __init__(self, pending: PendingResponse, clock: IReactorTime, idle_timeout: float,
                 on_end: Optional[Callable[[Optional[Failure]], object]] = None) -> None:
        self._pending = pending
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._on_end = on_end
        self._idle: Optional[IDelayedCall] = None
        self._paused = False
        self._stalled = False
        self._done = False
        self._registered = False
        self._delivering = False

    def start(self, response: BackendAnswer, headers_sent: bool = False) -> None:
        """Send C{response}'s status and headers to the client (unless C{headers_sent}
        already), then relay its body."""
        request = self._pending.request
        if not headers_sent:
            request.setResponseCode(response.code, response.phrase)
            kept = request.responseHeaders
            typed = event_stream = False
            for name, value in end_to_end_pairs(response.raw_headers, _NOT_RELAYED):
                if name[0] in b"cC":  # a cheap test first: most headers are neither
                    lower = name.lower()
                    if lower == b"content-encoding" and not value.strip():
                        # treq's gzip decoding leaves an empty one behind when the backend
                        # sent none.
                        continue
                    if lower == b"content-type" and not typed:
                        typed, event_stream = True, _is_event_stream_type(value)
                kept.addRawHeader(name, value)
            if response.length is not UNKNOWN_LENGTH:
                request.setHeader(b"Content-Length",
                                  b"%d" % response.length)  # type: ignore[str-format]  # known
            if event_stream:
                request.setHeader(b"X-Accel-Buffering", b"no")
        body = response.complete_body()
        if body is not None:
            # The whole answer is already here (most non-streamed answers): one write.
            self._done = True
            request.write(body)
            self._pending.finish()
            if self._on_end is not None:
                self._report(None)
            return
        self._pending.on_gone(self._client_gone)
        # What already arrived is relayed at once; a body that is not complete then gets
        # backpressure and the idle timer (none of which a small answer needs).
        self._delivering = True
        response.deliverBody(self)
        self._delivering = False
        if self._done or not self._pending.open:
            return
        if not request.startedWriting:
            request.write(b"")
        request.registerProducer(self, True)
        self._registered = True
        self._arm()

    # The backend side (IProtocol).

    def connectionMade(self) -> None:
        if not self._pending.open:
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self._pending.open:
            return
        if not self._delivering:
            self._arm()
        self._pending.request.write(data)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self._done = True
        self._disarm()
        if self._stalled:
            reason = Failure(StreamStalled(self._idle_timeout))
        clean = reason is None or isinstance(reason.value, (ResponseDone, PotentialDataLoss))
        if self._pending.open:
            if self._registered:
                self._pending.request.unregisterProducer()
            if clean:
                self._pending.finish()
            else:
                log.info("backend response ended in error: {why}",
                         why=str(cast(Failure, reason).value)[:300])
                self._pending.cut()
        self._report(None if clean else reason)

    def _report(self, result: Optional[Failure]) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            try:
                on_end(result)
            except Exception:
                log.failure("relay end callback failed")

    # The client side (IPushProducer, called by twisted.web's channel).

    def pauseProducing(self) -> None:
        self._paused = True
        self._disarm()
        if self.transport is not None:
            cast(IPushProducer, self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self.transport is not None and not self._done:
            self._arm()
            cast(IPushProducer, self.transport).resumeProducing()

    def stopProducing(self) -> None:
        self._abort_backend()

    # Timers and teardown.

    def _arm(self) -> None:
        if self._done or self._paused:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        else:
            self._idle = self._clock.callLater(self._idle_timeout, self._stall)

    def _disarm(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _stall(self) -> None:
        self._idle = None
        log.warn("backend silent for {seconds}s mid-response; aborting it",
                 seconds=self._idle_timeout)
        self._stalled = True
        self._abort_backend()

    def _client_gone(self) -> None:
        self._disarm()
        self._abort_backend()

    def _abort_backend(self) -> None:
        if self.transport is not None and not self._done:
            cast(IPushProducer, self.transport).stopProducing()


class StreamStalled(Exception):
    """The backend sent nothing for the stream idle timeout."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"backend sent nothing for {seconds:g} s")
