"""Bearer-key authentication for the node's resource tree.

C{/v1}, C{/rerank}, llama.cpp's native routes and C{/upstream} take C{program.api_keys};
C{/api}, C{/metrics} and any other path take C{program.admin_api_keys}, or C{program.api_keys}
when no admin key is configured. An empty key set means no authentication on those paths.
C{/health} and C{/api/health} stay open with C{program.open_health}, C{/metrics} with
C{metrics_auth: false}.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional

from twisted.web.resource import Resource

from llmnode.errors import Unauthorized
from llmnode.web.responses import render_error

if TYPE_CHECKING:
    from twisted.logger import Logger
    from llmnode.web.request import WebRequest

    from llmnode.config import Program

#: First path segments that take the client keys (C{api_keys}); all others take admin keys.
CLIENT_SEGMENTS = frozenset({b"v1", b"rerank", b"completion", b"infill", b"tokenize",
                             b"detokenize", b"upstream"})

#: The rest of the path after C{/api}, and after C{/health}, that is the health endpoint.
_API_HEALTH_PATHS: tuple[list[bytes], ...] = ([b"health"], [b"health", b""])
_HEALTH_PATHS: tuple[list[bytes], ...] = ([], [b""])


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


@dataclass(frozen=True)
class KeySet:
    """Accepted keys, kept as SHA-256 digests so every comparison has the same length."""

    digests: tuple[bytes, ...]

    @classmethod
    def of(cls, keys: Iterable[str]) -> "KeySet":
        return cls(tuple(_digest(key.encode("utf-8")) for key in keys))

    def __bool__(self) -> bool:
        return bool(self.digests)

    def accepts(self, token: bytes) -> bool:
        """Whether C{token} is one of the keys; compares against every key, whatever matches."""
        offered = _digest(token)
        found = False
        for digest in self.digests:
            found |= hmac.compare_digest(offered, digest)
        return found


def bearer_token(request: WebRequest) -> Optional[bytes]:
    """The token of an C{Authorization: Bearer TOKEN} header, or None."""
    value: Optional[bytes] = request.getHeader(b"Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


class Guard:
    """Decides, from a request's first path segment, which keys it needs and whether it has one.

    @param program: the L{llmnode.config.Program} with the key settings.
    """

    def __init__(self, program: Program) -> None:
        self.client = KeySet.of(program.api_keys)
        self.admin = KeySet.of(program.admin_api_keys) or self.client
        self.open_health = program.open_health
        self.metrics_auth = program.metrics_auth
        #: Whether any path needs a key at all.
        self.closed = bool(self.client) or bool(self.admin)

    def keys_for(self, segment: bytes, rest: list[bytes]) -> Optional[KeySet]:
        """The keys that open C{/segment/rest...}, or None when the path is open."""
        if segment in CLIENT_SEGMENTS:
            keys = self.client
        elif self.open_health and (segment == b"api" and rest in _API_HEALTH_PATHS
                                   or segment == b"health" and rest in _HEALTH_PATHS):
            return None
        elif segment == b"metrics" and not self.metrics_auth:
            return None
        else:
            keys = self.admin
        return keys or None

    def check(self, segment: bytes, request: WebRequest) -> Optional[UnauthorizedResource]:
        """None when the request may go on, else the resource answering its 401.

        An accepted C{Authorization} header is removed: the node's key is not the backend's.
        """
        keys = self.keys_for(segment, request.postpath)
        if keys is None:
            return None
        token = bearer_token(request)
        if token is not None and keys.accepts(token):
            request.requestHeaders.removeHeader(b"Authorization")
            return None
        return UnauthorizedResource(missing=token is None)


class UnauthorizedResource(Resource):
    """An OpenAI-shaped 401 with a C{WWW-Authenticate: Bearer} challenge."""

    isLeaf = True

    def __init__(self, missing: bool) -> None:
        super().__init__()
        self.missing = missing

    def refusal(self) -> tuple[Unauthorized, bytes]:
        """The error and the C{WWW-Authenticate} challenge to answer with."""
        if self.missing:
            return (Unauthorized("missing API key: send it as 'Authorization: Bearer KEY'"),
                    b'Bearer realm="llmnode"')
        return Unauthorized("invalid API key"), b'Bearer realm="llmnode", error="invalid_token"'

    def render(self, request: WebRequest) -> bytes:
        error, challenge = self.refusal()
        request.setHeader(b"WWW-Authenticate", challenge)
        return render_error(request, error)


def is_loopback(host: str) -> bool:
    """Whether listening on C{host} is reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def open_paths_warning(host: str, program: Program) -> Optional[str]:
    """What a node on C{host} serves to anyone without a key, as a warning; None if nothing."""
    if is_loopback(host):
        return None
    if not program.api_keys and not program.admin_api_keys:
        return (f"llmnode listens on {host} without API keys: anyone who can reach it may use "
                f"/v1 and start or stop models via /api; set program.api_keys")
    if not program.api_keys:
        return (f"llmnode listens on {host} without program.api_keys: anyone who can reach it "
                f"may use /v1")
    return None


def warn_if_open(host: str, program: Program, log: Logger) -> None:
    """Log a warning when a non-loopback node serves any path without a key."""
    warning = open_paths_warning(host, program)
    if warning is not None:
        log.warn("{warning}", warning=warning)
