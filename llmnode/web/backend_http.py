"""How the proxy talks to backends: one typed seam in front of two HTTP clients.

The proxy sends each request through a L{BackendHTTP} and reads the answer as a
L{BackendAnswer}. The node's own client (L{llmnode.web.client.BackendClient}, a
C{treq.HTTPClient} over the lean L{llmnode.web.client.BackendAgent}) provides both natively;
any other C{treq.HTTPClient} (twisted.web's C{Agent} under it) is adapted once, by
L{TreqBackends}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, cast

from treq import collect
from twisted.internet.defer import Deferred, succeed

from llmnode.web.headers import headers_of, pairs_of

if TYPE_CHECKING:
    from treq.client import HTTPClient
    from twisted.internet.interfaces import IProtocol
    from twisted.web.iweb import IBodyProducer, IResponse

    from llmnode.web.client import BackendURL

#: Header pairs, in the order they are sent or arrived.
Pairs = list[tuple[bytes, bytes]]


class BackendAnswer(Protocol):
    """A backend's response, once its head arrived."""

    code: int
    phrase: bytes
    #: The body's length, or C{twisted.web.iweb.UNKNOWN_LENGTH}.
    length: int | str

    @property
    def raw_headers(self) -> Pairs:
        """The response headers as C{(name, value)} pairs, as received."""

    def complete_body(self) -> Optional[bytes]:
        """The whole body when all of it arrived already (and was not delivered); else None.
        The body can be delivered afterwards either way."""

    def deliverBody(self, protocol: IProtocol) -> None:
        """Hand the body to C{protocol} (C{IResponse.deliverBody}): its transport pauses,
        resumes and stops the backend connection."""


class BackendHTTP(Protocol):
    """Sends one request to a backend."""

    def send(self, method: bytes, url: BackendURL, headers: Pairs,
             body: bytes | IBodyProducer) -> Deferred[BackendAnswer]:
        """Send C{method url} with C{headers} (end-to-end ones; the client adds C{Host} and
        the framing) and C{body} (bytes, or a producer streaming an upload). Fires with the
        answer once its head arrived; cancelling it drops the request's connection."""


class TreqAnswer:
    """An C{IResponse} from twisted.web's client as a L{BackendAnswer}."""

    def __init__(self, response: IResponse) -> None:
        self._response = response
        self.code = response.code
        self.phrase = response.phrase
        self.length = response.length

    @property
    def raw_headers(self) -> Pairs:
        return pairs_of(self._response.headers)

    def complete_body(self) -> Optional[bytes]:
        return None  # twisted.web's client does not say; the body is delivered

    def deliverBody(self, protocol: IProtocol) -> None:
        self._response.deliverBody(protocol)


class TreqBackends:
    """Any C{treq.HTTPClient} as a L{BackendHTTP}: requests go as they are (no redirects
    followed, no cookies kept, the body unbuffered)."""

    def __init__(self, http: HTTPClient) -> None:
        self._http = http

    def send(self, method: bytes, url: BackendURL, headers: Pairs,
             body: bytes | IBodyProducer) -> Deferred[BackendAnswer]:
        sending = self._http.request(
            method.decode("ascii"), url, headers=headers_of(headers), data=body or None,
            allow_redirects=False, unbuffered=True)
        return cast("Deferred[BackendAnswer]", sending.addCallback(TreqAnswer))


def read_answer(answer: BackendAnswer) -> Deferred[bytes]:
    """The whole body of C{answer}: the part that already arrived, else collected by treq."""
    complete = answer.complete_body()
    if complete is not None:
        return succeed(complete)
    parts: list[bytes] = []
    collecting = collect(answer, parts.append)  # type: ignore[arg-type]  # deliverBody is all
    return collecting.addCallback(lambda _: b"".join(parts))
