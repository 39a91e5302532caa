"""The request as the node's resources see it: one typed seam in front of two HTTP servers.

L{WebRequest} is what a resource may use of a request. The node's own server
(L{llmnode.web.server.NodeSite}; its requests are L{llmnode.web.server.NodeRequest}s) provides it
natively; twisted.web provides it through L{TwistedRequest}, the request factory of
L{TwistedSite}. The resources (the proxy, the relay, the management API) talk to the
protocol only: no type checks, no probing for attributes.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from llmnode.web.headers import pairs_of

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IAddress, IPullProducer, IPushProducer, ITransport
    from twisted.python.failure import Failure

    from llmnode.web.upload import BodyStream

#: Whether a response header name is guarded (see L{WebRequest.guard_response_headers}).
HeaderGuard = Callable[[bytes], bool]


class ResponseHeaderMap(Protocol):
    """The part of C{twisted.web.http_headers.Headers} the resources use on a response."""

    def setRawHeaders(self, name: bytes | str, values: Sequence[bytes | str]) -> None: ...

    def addRawHeader(self, name: bytes | str, value: bytes | str) -> None: ...

    def getRawHeaders(self, name: bytes | str,
                      default: Optional[list[bytes]] = None) -> Optional[list[bytes]]: ...

    def hasHeader(self, name: bytes | str) -> bool: ...

    def removeHeader(self, name: bytes | str) -> None: ...


class WebRequest(Protocol):
    """One HTTP request and its answer, as the node's resources use them.

    The attributes are twisted.web's (C{method}, C{uri}, C{path}, C{prepath}/C{postpath},
    C{code}, C{getHeader}, C{setResponseCode}, C{setHeader}, C{write}, C{finish},
    C{notifyFinish}, C{registerProducer}, ...); the rest is what a proxy needs without
    copying: the body as bytes (L{raw_body}) or in pieces, the headers as pairs, a finish
    callback without a Deferred, and response headers a backend cannot overwrite.
    """

    method: bytes
    uri: bytes
    path: bytes
    prepath: list[bytes]
    postpath: list[bytes]
    code: int

    #: A large body as the pieces it arrived in, to be joined off the reactor (then
    #: L{body_joined}); None when L{raw_body} has it whole.
    body_parts: Optional[list[bytes]]

    #: The body still arriving (an upload dispatched when its headers ended); None when the
    #: body was read whole.
    body_stream: Optional[BodyStream]

    @property
    def startedWriting(self) -> bool | int: ...

    @property
    def args(self) -> dict[bytes, list[bytes]]: ...

    @property
    def requestHeaders(self) -> Headers: ...

    @property
    def responseHeaders(self) -> ResponseHeaderMap: ...

    @property
    def transport(self) -> Optional[ITransport]: ...

    @property
    def raw_body(self) -> bytes:
        """The whole body (joined on first use if it came in L{body_parts})."""

    def body_joined(self, body: bytes) -> None:
        """L{body_parts} were joined elsewhere into C{body}: keep that."""

    def header_items(self) -> list[tuple[bytes, bytes]]:
        """The request headers as C{(name, value)} pairs, in arrival order."""

    def getHeader(self, name: bytes) -> Optional[bytes]: ...

    def getClientAddress(self) -> IAddress: ...

    def setResponseCode(self, code: int, message: Optional[bytes] = None) -> None: ...

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def guard_response_headers(self, guarded: HeaderGuard) -> None:
        """From now on, C{setRawHeaders}/C{addRawHeader} on L{responseHeaders} leave the
        headers C{guarded(lower_case_name)} says are guarded as they are (the node's CORS
        headers, which a relayed backend answer must not replace)."""

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def when_finished(self, callback: Callable[[Optional[Failure]], object]) -> None:
        """Call C{callback(None)} once the response is finished, or C{callback(failure)} if
        the connection is lost first (C{notifyFinish} without a Deferred)."""

    def notifyFinish(self) -> Deferred[None]: ...

    def registerProducer(self, producer: IPushProducer | IPullProducer,
                         streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


class GuardedHeaders(Headers):
    """twisted.web response headers whose guarded names keep their values (see
    L{WebRequest.guard_response_headers})."""

    def __init__(self, headers: Headers, guarded: HeaderGuard) -> None:
        super().__init__()
        for name, values in headers.getAllRawHeaders():
            super().setRawHeaders(name, values)
        self._guarded = guarded

    def setRawHeaders(self, name: Any, values: Any) -> None:
        if not self._guarded(_lower(name)):
            super().setRawHeaders(name, values)

    def addRawHeader(self, name: Any, value: Any) -> None:
        if not self._guarded(_lower(name)):
            super().addRawHeader(name, value)


def _lower(name: bytes | str) -> bytes:
    return (name.encode("latin-1") if isinstance(name, str) else name).lower()


class TwistedRequest(Request):
    """twisted.web's C{Request} as a L{WebRequest}: the body was read whole (into
    C{content})."""

    body_parts: Optional[list[bytes]] = None
    body_stream: Optional[BodyStream] = None

    @property
    def raw_body(self) -> bytes:
        content = self.content
        if content is None:
            return b""
        content.seek(0, io.SEEK_SET)
        data: bytes = content.read()
        content.seek(0, io.SEEK_SET)
        return data

    def body_joined(self, body: bytes) -> None:
        pass  # twisted.web hands the body whole: there are never parts

    def header_items(self) -> list[tuple[bytes, bytes]]:
        return pairs_of(self.requestHeaders)

    def guard_response_headers(self, guarded: HeaderGuard) -> None:
        self.responseHeaders = GuardedHeaders(self.responseHeaders, guarded)

    def when_finished(self, callback: Callable[[Optional[Failure]], object]) -> None:
        self.notifyFinish().addBoth(callback)


class _NoDelayChannel(HTTPChannel):
    """twisted.web's channel, sending small writes at once (no Nagle delay): streamed tokens
    are small writes."""

    def connectionMade(self) -> None:
        super().connectionMade()
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)  # TCP only
        if set_no_delay is not None:
            set_no_delay(True)


class TwistedSite(Site):
    """A twisted.web C{Site} whose requests are L{TwistedRequest}s: the node's resource tree
    served by twisted.web's own HTTP server."""

    requestFactory = TwistedRequest
    # HTTP/1.1 channels, without twisted.web's wrapper that would negotiate HTTP/2 over TLS
    # (the node serves no TLS).
    protocol = _NoDelayChannel  # type: ignore[assignment]
