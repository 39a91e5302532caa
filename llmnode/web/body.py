"""A request's body: its size limit, and reading it as a JSON object."""

from __future__ import annotations

import json
import json.scanner
from typing import TYPE_CHECKING, Any

from llmnode.errors import BadRequest, BodyTooLarge

if TYPE_CHECKING:
    from llmnode.web.request import WebRequest


def max_body_bytes(max_body_mb: float) -> int:
    """The body limit in bytes for a limit in MiB."""
    return int(max_body_mb * 1024 * 1024)


def read_body(request: WebRequest, limit: int) -> bytes:
    """The request body, or L{BodyTooLarge} when it exceeds C{limit} bytes.

    The node's own server never hands on a body over its limit (it answers 413 itself);
    twisted.web's has read all of it first.
    """
    raw = request.raw_body
    if len(raw) > limit:
        raise body_too_large(limit)
    return raw


def body_too_large(limit: int) -> BodyTooLarge:
    """The 413 for a body over C{limit} bytes."""
    return BodyTooLarge(
        f"request body is larger than the limit of {limit} bytes ({limit / 1048576:g} MiB)")


#: The C scanner under C{json.loads}, called directly for the usual body (an object, no
#: surrounding whitespace): C{json.loads} adds a few Python calls around it.
_scan_value = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a JSON object, or raise L{BadRequest} saying what is wrong."""
    try:
        try:
            text: str | bytes = body.decode("utf-8")
        except UnicodeDecodeError:
            text = body  # json detects UTF-16 and UTF-32 itself
        if text[:1] == "{" and text[-1:] == "}":
            try:
                value, end = _scan_value(text, 0)  # type: ignore[arg-type]
            except (StopIteration, ValueError):
                pass  # json.loads below says what is wrong
            else:
                if end == len(text):
                    found: dict[str, Any] = value  # an object: it began with {
                    return found
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {str(e)[:200]}") from None
    except RecursionError:
        # Python's parser recurses once per level of nesting.
        raise BadRequest("request body is nested too deeply to parse") from None
    if not isinstance(value, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(value).__name__}")
    return value
