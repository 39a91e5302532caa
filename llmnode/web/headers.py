"""HTTP header lists: C{(name, value)} pairs, as the node's server and client keep them, and
twisted.web's C{Headers}."""

from __future__ import annotations

from typing import Iterable

from twisted.web.http_headers import Headers


def headers_of(pairs: Iterable[tuple[bytes, bytes]]) -> Headers:
    """A C{Headers} object holding the C{(name, value)} C{pairs}."""
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


def pairs_of(headers: Headers) -> list[tuple[bytes, bytes]]:
    """The C{(name, value)} pairs of a C{Headers} object."""
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
