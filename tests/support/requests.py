"""A request in memory for resource tests: twisted.web's C{DummyRequest} as a WebRequest."""

from __future__ import annotations

from typing import Optional

from twisted.internet.testing import StringTransport
from twisted.web.test.requesthelper import DummyRequest

from llmnode.web.headers import pairs_of
from llmnode.web.request import GuardedHeaders


class MemoryRequest(DummyRequest):
    """A C{DummyRequest} with what L{llmnode.web.request.WebRequest} adds: C{body} is the
    request body, C{transport} a C{StringTransport} (C{transport.disconnecting} tells whether
    the response was cut)."""

    body_parts: Optional[list[bytes]] = None
    body_stream = None

    def __init__(self, postpath: list[bytes], body: bytes = b"", method: bytes = b"GET",
                 uri: bytes = b"/") -> None:
        super().__init__(postpath)
        self.method = method
        self.uri = uri
        self.path = uri.partition(b"?")[0]
        self.body = body
        self.transport = StringTransport()

    @property
    def code(self) -> int:
        return self.responseCode or 200

    @property
    def startedWriting(self) -> bool:
        return bool(self.written)

    @property
    def raw_body(self) -> bytes:
        return self.body

    def body_joined(self, body: bytes) -> None:
        self.body = body

    def header_items(self) -> list[tuple[bytes, bytes]]:
        return pairs_of(self.requestHeaders)

    def guard_response_headers(self, guarded) -> None:
        self.responseHeaders = GuardedHeaders(self.responseHeaders, guarded)

    def when_finished(self, callback) -> None:
        self.notifyFinish().addBoth(callback)
