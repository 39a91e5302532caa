"""How the node answers a client: JSON bodies, OpenAI-shaped errors, and a pending
(C{NOT_DONE_YET}) response that ends along exactly one path.

Every L{NodeError} becomes an HTTP answer here: L{render_error} for a resource's answer,
L{error_event} for a stream already begun, and L{refusal} for the server's own answers to a
request it will not read (a head too large, a body too slow).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from llmnode.errors import MethodNotAllowed, NodeError, NotFound

if TYPE_CHECKING:
    from llmnode.web.request import WebRequest

log = Logger()

JSON_TYPE = b"application/json"


def render_json(request: WebRequest, status: int, body: Any) -> bytes:
    """Set C{status} and a JSON content type on C{request}; return C{body} encoded.

    C{body} may be bytes already encoded, or anything C{json.dumps} takes.
    """
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_TYPE)
    if isinstance(body, bytes):
        return body
    return json.dumps(body).encode("utf-8")


def render_error(request: WebRequest, error: NodeError) -> bytes:
    """Set the status (and C{Retry-After}) of C{error} on C{request}; return its JSON body."""
    if error.retry_after is not None:
        request.setHeader(b"Retry-After", b"%d" % max(0, math.ceil(error.retry_after)))
    return render_json(request, error.status, error.body())


def method_not_allowed(request: WebRequest, allowed: tuple[str, ...]) -> bytes:
    """A 405 with an C{Allow} header listing C{allowed} methods."""
    request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
    method = request.method.decode("ascii", "replace")
    return render_error(request, MethodNotAllowed(
        f"{method} is not allowed on {_path(request)}; use {' or '.join(allowed)}"))


def _path(request: WebRequest) -> str:
    path: bytes = request.path
    return path.decode("utf-8", "replace")[:200]


class ErrorResource(Resource):
    """A leaf that answers every method with one OpenAI-shaped error (default: 404)."""

    isLeaf = True

    def __init__(self, error: Optional[NodeError] = None) -> None:
        super().__init__()
        self._error = error

    def render(self, request: WebRequest) -> bytes:
        error = self._error or NotFound(f"no such endpoint: {_path(request)}")
        return render_error(request, error)


class PendingResponse:
    """A C{NOT_DONE_YET} response that ends along exactly one path.

    Whether the client left is decided from C{notifyFinish()} only; once it has left, or once
    the response was ended here, nothing more is written.

    @ivar gone: the client went away before the response was finished.
    @ivar ended: this object finished the response (or cut the connection).
    """

    def __init__(self, request: WebRequest, on_gone: Optional[Callable[[], Any]] = None,
                 on_end: Optional[Callable[[Optional[Failure]], Any]] = None) -> None:
        self.request = request
        self.gone = False
        self.ended = False
        self._on_gone: list[Callable[[], Any]] = [] if on_gone is None else [on_gone]
        self._on_end: list[Callable[[Optional[Failure]], Any]] = (
            [] if on_end is None else [on_end])
        request.when_finished(self._finished)

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

    def _finished(self, result: Optional[Failure]) -> None:
        if isinstance(result, Failure):
            self._lost(result)
        # The client can no longer leave early: its listeners (which refer back to their
        # owners, and so to this object) go, and a request's objects die without the cyclic
        # garbage collector.
        self._on_gone = []
        callbacks, self._on_end = self._on_end, []
        for callback in callbacks:
            try:
                callback(result)
            except Exception:
                log.failure("end-of-response callback failed")

    def _lost(self, failure: Failure) -> None:
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
        transport = self.request.transport
        if transport is not None:
            transport.loseConnection()
        return True
