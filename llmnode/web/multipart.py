"""Reading the routing fields of a C{multipart/form-data} body (RFC 7578) without parsing it.

Audio and image uploads name their model in a form field, not in JSON. The proxy needs that
field (and C{stream}) and nothing else: the parts are found by searching for the boundary
(C{bytes.find}, in C), only the part headers are read, and a file part's bytes are never
copied or decoded.
"""

from __future__ import annotations

import re
from typing import Optional, cast

from llmnode.errors import BadRequest

_BOUNDARY = re.compile(rb';\s*boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.IGNORECASE)
_NAME = re.compile(rb';\s*name=(?:"([^"]*)"|([^\s;"]+))', re.IGNORECASE)

#: Bytes of headers one part may have.
_MAX_PART_HEAD = 16384


def is_form(content_type: Optional[bytes]) -> bool:
    """Whether C{content_type} is C{multipart/form-data}."""
    return (content_type is not None
            and content_type.split(b";", 1)[0].strip().lower() == b"multipart/form-data")


#: Where each field's content lies in the body: C{{name: (start, end)}}.
Fields = dict[bytes, tuple[int, int]]


def boundary_of(content_type: Optional[bytes]) -> bytes:
    """The boundary of a C{multipart/form-data} content type, or L{BadRequest}."""
    if not is_form(content_type):
        raise BadRequest("this endpoint takes a multipart/form-data body (a file upload); "
                         f"got Content-Type {(content_type or b'(none)')[:100]!r}")
    match = _BOUNDARY.search(cast(bytes, content_type))  # a form has one
    if match is None:
        raise BadRequest("the multipart/form-data Content-Type has no boundary parameter")
    return match.group(1) or match.group(2)


def form_fields(body: bytes, boundary: bytes, names: frozenset[bytes]) -> Fields:
    """Where the values of the form fields C{names} (bytes) lie in C{body}: name -> (start,
    end). A field given twice counts once (the first). Raises L{BadRequest} for a body that
    is not a complete multipart body with this boundary."""
    return _scan(body, boundary, names, whole=True)


def leading_fields(prefix: bytes, boundary: bytes, names: frozenset[bytes]) -> Fields:
    """L{form_fields} for the beginning of a body still arriving: the fields among C{names}
    whose parts are complete in C{prefix}. Raises L{BadRequest} where the prefix already
    shows the body is broken."""
    return _scan(prefix, boundary, names, whole=False)


def _scan(body: bytes, boundary: bytes, names: frozenset[bytes], whole: bool) -> Fields:
    delimiter = b"\r\n--" + boundary
    if body.startswith(delimiter[2:]):
        position = len(delimiter) - 2
    else:
        found = body.find(delimiter)
        if found < 0:
            if whole:
                raise BadRequest("broken multipart body: the boundary never appears")
            return {}
        position = found + len(delimiter)
    fields: Fields = {}
    while True:
        if body.startswith(b"--", position):
            return fields
        line_end = body.find(b"\r\n", position)
        if line_end < 0 and not whole and len(body) - position < 2:
            return fields
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise BadRequest("broken multipart body: a boundary is not followed by a line end")
        head_end = body.find(b"\r\n\r\n", line_end, line_end + _MAX_PART_HEAD)
        if head_end < 0:
            if not whole and len(body) - line_end < _MAX_PART_HEAD:
                return fields
            raise BadRequest("broken multipart body: a part's headers never end")
        start = head_end + 4
        end = body.find(delimiter, start)
        if end < 0:
            if not whole:
                return fields
            raise BadRequest("broken multipart body: the last part has no closing boundary")
        name = _field_name(body[line_end + 2:head_end])
        if name in names and name not in fields:
            fields[name] = (start, end)
        position = end + len(delimiter)


def _field_name(head: bytes) -> Optional[bytes]:
    for line in head.split(b"\r\n"):
        label, _, value = line.partition(b":")
        if label.strip().lower() == b"content-disposition":
            match = _NAME.search(value)
            if match is not None:
                return match.group(1) if match.group(1) is not None else match.group(2)
    return None


def form_text(body: bytes, span: tuple[int, int]) -> str:
    """The text of a field found by L{form_fields}, or L{BadRequest} if it is not UTF-8."""
    try:
        return body[span[0]:span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("a form field is not UTF-8 text") from None
