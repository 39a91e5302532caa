"""CORS (C{program.cors_origins}): a browser page on another origin may call the node.

A request with an allowed C{Origin} gets C{Access-Control-Allow-Origin} (that origin) on its
answer, errors included, and the node's answer replaces any CORS header a backend sent (two
would make the browser refuse both). A preflight (C{OPTIONS} with
C{Access-Control-Request-Method}) is answered by the node itself, before any key check, since
browsers send preflights without credentials. Without C{cors_origins} nothing here runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from twisted.web.resource import Resource

from llmnode.errors import NodeError
from llmnode.web.responses import render_error

if TYPE_CHECKING:
    from llmnode.web.request import WebRequest

#: Methods a preflight may ask for.
ALLOWED_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"

#: Seconds a browser may cache a preflight's answer.
MAX_AGE = b"600"

_PREFIX = b"access-control-"


class OriginNotAllowed(NodeError):
    status = 403
    type = "invalid_request_error"
    code = "origin_not_allowed"


class Cors:
    """The node's CORS policy: which origins may call it.

    @param origins: allowed origins, lower case (C{http://host:port}), or C{"*"} for any.
    """

    def __init__(self, origins: Iterable[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origin.encode("ascii") for origin in origins if origin != "*")

    def allows(self, origin: bytes) -> bool:
        return self._any or origin.lower() in self._origins

    def check(self, request: WebRequest) -> Optional[Resource]:
        """Mark C{request}'s answer for its origin; return the resource that answers it when
        it is a preflight (else None: it goes on down the tree)."""
        origin: Optional[bytes] = request.getHeader(b"Origin")
        if origin is None:
            return None
        preflight = (request.method == b"OPTIONS"
                     and request.getHeader(b"Access-Control-Request-Method") is not None)
        if not self.allows(origin):
            return _Refused(origin) if preflight else None
        headers = {b"Access-Control-Allow-Origin": origin, b"Vary": b"Origin"}
        if preflight:
            asked = request.getHeader(b"Access-Control-Request-Headers")
            headers[b"Access-Control-Allow-Methods"] = ALLOWED_METHODS
            headers[b"Access-Control-Max-Age"] = MAX_AGE
            if asked:
                headers[b"Access-Control-Allow-Headers"] = asked
        for name, value in headers.items():
            request.setHeader(name, value)
        request.guard_response_headers(_is_cors)  # a relayed backend answer keeps them
        return _Preflight() if preflight else None


def _is_cors(lower_name: bytes) -> bool:
    return lower_name[:15] == _PREFIX


class _Preflight(Resource):
    isLeaf = True

    def render(self, request: WebRequest) -> bytes:
        request.setResponseCode(204)
        return b""


class _Refused(Resource):
    isLeaf = True

    def __init__(self, origin: bytes) -> None:
        super().__init__()
        self._origin = origin

    def render(self, request: WebRequest) -> bytes:
        return render_error(request, OriginNotAllowed(
            f"origin {self._origin.decode('latin-1')[:200]!r} is not in program.cors_origins"))
