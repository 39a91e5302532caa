"""Finding a JSON request body's routing members (C{model}, C{stream}) without parsing a
large body whole, and rewriting its C{model} in place."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Optional

from llmnode.web.body import parse_json_object


#: Bodies larger than this are scanned for the routing fields instead of parsed whole.
SCAN_ABOVE = 64 * 1024

#: The members the proxy routes by.
ROUTING_NAMES = frozenset({"model", "stream"})

_STRUCTURE = re.compile(rb'["\[\]{}]')
_SPACE = re.compile(rb"[ \t\n\r]*")  # matches anywhere: its match is never None
_SCALAR = re.compile(rb"true|false|null|-?[0-9][0-9.eE+-]*")
_SCALAR_END = re.compile(rb"[0-9a-zA-Z.+-]+\Z")
_SPACE_BYTES = b" \t\n\r"

#: Escaped quotes a scan steps over before it gives up (each costs a Python loop turn; text
#: full of them parses faster).
_ESCAPED_QUOTES = 512

#: Loop turns (strings and brackets) of a scan between two short sleeps, and their length: a
#: scan through a large body runs in a worker thread, and a pause gives the GIL to the reactor
#: at once (otherwise it waits up to the interpreter's 5 ms switch interval each time it wakes).
#: About 2 ms of scanning, then 0.1 ms.
_PAUSE_EVERY = 4096
_PAUSE = 0.0001

#: The longest scalar (number, true, false, null) the backward scan reads.
_LONGEST_SCALAR = 64


@dataclass(frozen=True)
class Routing:
    """The routing members of a request body, and where the C{model} member's value lies in
    it (so that L{with_model} can rewrite it without decoding the body).

    @ivar members: member name -> decoded value, for the wanted names present.
    @ivar model_span: C{(start, end)} of the C{model} value's bytes, or None when unknown.
    """

    members: dict[str, Any]
    model_span: Optional[tuple[int, int]] = None


def routing_fields(body: bytes, names: frozenset[str] = ROUTING_NAMES) -> dict[str, Any]:
    """The top-level members C{names} of a JSON object body, or L{BadRequest}.

    Exact, however long it takes: the proxy calls L{quick_routing} on the reactor and this
    (through L{full_routing}) in a worker thread only when that cannot tell.
    """
    return full_routing(body, names).members


def quick_routing(body: bytes, names: frozenset[str] = ROUTING_NAMES) -> Optional[Routing]:
    """The routing members of C{body} at a cost that does not grow with its nesting, or None
    when only a full scan can tell (L{full_routing}, for a worker thread).

    A body up to L{SCAN_ABOVE} bytes is parsed whole. In a larger one only the top level is
    read: forward from the start and backward from the end, each up to the first nested
    member value (strings are skipped by searching for their closing quote, at C speed). The
    part in between — typically C{messages} — is searched (at C speed) for the quoted member
    names only: where none occurs there, the members found at the ends are the answer. So
    the usual body, with C{model} and C{stream} before or after its large members, costs a
    few ms however large it is; a name spelt with escapes (C{"mod\\u0065l"}) in the middle
    goes unseen. Malformed JSON elsewhere in a large body is left for the backend to refuse.

    @raise BadRequest: a small body that is not a JSON object.
    """
    if len(body) <= SCAN_ABOVE:
        return _parsed(body, names)
    try:
        scan = _Scan(body)
        found, head_end = scan.forward(names, nested=False)
        if head_end is None:
            return _routing(found)
        tail, tail_start = scan.backward(names)
    except (ValueError, IndexError):
        return None
    for name in names:
        if name in tail:
            found[name] = tail[name]
        elif _occurs(body, name.encode("utf-8"), head_end, tail_start):
            return None
    return _routing(found)


def read_large_body(parts: list[bytes],
                    names: frozenset[str] = ROUTING_NAMES) -> tuple[bytes, Routing]:
    """Join a large body from the pieces it arrived in and find its routing members; for a
    worker thread (joining many pieces releases the GIL, and so do the scans between the
    steps they take), so that the reactor goes on answering meanwhile.

    @raise BadRequest: the body is not a JSON object.
    """
    body = b"".join(parts)
    return body, quick_routing(body, names) or full_routing(body, names)


#: Bytes searched by one C{find} call, so that a thread searching a large body gives the GIL
#: back in between.
_WINDOW = 1024 * 1024

#: Hits of a name's first bytes not followed by its closing quote that a search steps over
#: before it answers "maybe there".
_LOOKALIKES = 1000


def _occurs(body: bytes, name: bytes, start: int, end: int) -> bool:
    """Whether C{"name"} occurs in C{body[start:end]}; True also when unsure (too many
    lookalikes). Searches for C{"name} (a rarer last byte than the quote: twice as fast)."""
    needle = b'"' + name
    lookalikes = 0
    while start < end:
        stop = min(end, start + _WINDOW + len(needle))
        found = body.find(needle, start, stop)
        if found < 0:
            start += _WINDOW
            continue
        after = found + len(needle)
        if after < end and body[after] == 0x22:
            return True
        lookalikes += 1
        if lookalikes > _LOOKALIKES:
            return True
        start = found + 1
    return False


def full_routing(body: bytes, names: frozenset[str] = ROUTING_NAMES) -> Routing:
    """The routing members of C{body}, exactly: a large body is scanned through (a Python
    loop turn per string and bracket: seconds for 50 MB of small objects), then parsed if
    the scan gives up.

    @raise BadRequest: the body is not a JSON object (or, when parsed, not valid JSON).
    """
    if len(body) > SCAN_ABOVE:
        try:
            found, _ = _Scan(body).forward(names, nested=True)
            return _routing(found)
        except (ValueError, IndexError):
            pass
    return _parsed(body, names)


def with_model(body: bytes, routing: Routing, model: str) -> bytes:
    """C{body} with its C{model} member set to C{model}: spliced in where the scan found it
    (one copy of the body), else decoded and encoded again."""
    if routing.model_span is not None:
        start, end = routing.model_span
        return b"".join([*_slices(body, 0, start), json.dumps(model).encode("utf-8"),
                         *_slices(body, end, len(body))])
    value = parse_json_object(body)
    value["model"] = model
    return json.dumps(value).encode("utf-8")


def _slices(body: bytes, start: int, end: int) -> list[bytes]:
    """C{body[start:end]} as slices of at most L{_WINDOW} bytes: each copy is short, and
    joining them releases the GIL."""
    return [body[i:min(end, i + _WINDOW)] for i in range(start, end, _WINDOW)]


def _parsed(body: bytes, names: frozenset[str]) -> Routing:
    value = parse_json_object(body)
    return Routing({name: value[name] for name in names if name in value})


def _routing(found: dict[str, tuple[Any, int, int]]) -> Routing:
    """A L{Routing} of C{name -> (value, start, end)}."""
    model = found.get("model")
    return Routing({name: member[0] for name, member in found.items()},
                   None if model is None else model[1:])


class _Scan:
    """Scans of one body for the routing members; a method raises ValueError (or IndexError)
    where it gives up. Members are found as C{name -> (value, start, end)}."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.escaped = 0

    def _escaped_quote(self) -> None:
        self.escaped += 1
        if self.escaped > _ESCAPED_QUOTES:
            raise ValueError("too many escaped quotes to scan")

    def string_end(self, start: int) -> int:
        """The index just past the closing quote of the string whose content starts at
        C{start}."""
        text = self.text
        end = text.index(b'"', start)
        while True:
            before = end - 1
            while text[before] == 0x5C:
                before -= 1
            if (end - 1 - before) % 2 == 0:
                return end + 1
            self._escaped_quote()
            end = text.index(b'"', end + 1)

    def string_start(self, last: int) -> int:
        """The index of the opening quote of the string whose closing quote is at C{last}:
        the first quote before it not escaped (inside a string every quote is)."""
        text = self.text
        start = text.rindex(b'"', 0, last)
        while True:
            before = start - 1
            while text[before] == 0x5C:
                before -= 1
            if (start - 1 - before) % 2 == 0:
                return start
            self._escaped_quote()
            start = text.rindex(b'"', 0, start)

    def forward(self, names: frozenset[str],
                nested: bool) -> tuple[dict[str, tuple[Any, int, int]], Optional[int]]:
        """The wanted top-level members from the start: through the whole object when
        C{nested}, else up to the first member value that is an object or array.

        @return: the members found, and where that nested value begins (None when the scan
            reached the object's end).
        """
        text = self.text
        string_end = self.string_end
        position = _SPACE.match(text, 0).end()  # type: ignore[union-attr]
        if text[position:position + 1] != b"{":
            raise ValueError("not an object")
        found = {}
        depth = 1
        position += 1
        turns = 0
        while depth:
            turns += 1
            if not turns % _PAUSE_EVERY:
                time.sleep(_PAUSE)
            match = _STRUCTURE.search(text, position)
            if match is None:
                raise ValueError("unterminated")
            char, position = match.group(), match.end()
            if char == b'"':
                start = position - 1
                position = string_end(position)
                if depth != 1:
                    continue
                after = _SPACE.match(text, position).end()  # type: ignore[union-attr]
                if text[after:after + 1] != b":":
                    continue
                key = json.loads(text[start:position])
                if key in names:
                    value_at = _SPACE.match(text, after + 1).end()  # type: ignore[union-attr]
                    if text[value_at:value_at + 1] == b'"':
                        position = string_end(value_at + 1)
                    else:
                        scalar = _SCALAR.match(text, value_at)
                        if scalar is None:
                            raise ValueError("a routing member that is not a string or scalar")
                        position = scalar.end()
                    found[key] = (json.loads(text[value_at:position]), value_at, position)
            elif char in b"[{":
                if depth == 1 and not nested:
                    return found, position - 1
                depth += 1
            else:
                depth -= 1
        if _SPACE.match(text, position).end() != len(text):  # type: ignore[union-attr]
            raise ValueError("extra data")
        return found, None

    def backward(self, names: frozenset[str]) -> tuple[dict[str, tuple[Any, int, int]], int]:
        """The wanted top-level members after the last member value that is an object or
        array, read backward from the end (the last of a name written twice is found).

        @return: the members found, and the index just past that nested value.
        """
        text = self.text
        found: dict[str, tuple[Any, int, int]] = {}
        end = len(text.rstrip(_SPACE_BYTES))
        if text[end - 1:end] != b"}":
            raise ValueError("not an object")
        last = self._skip_space_back(end - 1)
        while True:
            char = text[last]
            if char in b"]}":
                return found, last + 1
            if char == 0x22:
                value_start = self.string_start(last)
            else:
                scalar = _SCALAR_END.search(text, max(0, last + 1 - _LONGEST_SCALAR), last + 1)
                if scalar is None or scalar.end() - scalar.start() >= _LONGEST_SCALAR:
                    raise ValueError("not a scalar")
                value_start = scalar.start()
            colon = self._skip_space_back(value_start)
            if text[colon] != 0x3A:
                raise ValueError("expected ':'")
            key_last = self._skip_space_back(colon)
            if text[key_last] != 0x22:
                raise ValueError("expected a key")
            key_start = self.string_start(key_last)
            key = json.loads(text[key_start:key_last + 1])
            if key in names and key not in found:
                found[key] = (json.loads(text[value_start:last + 1]), value_start, last + 1)
            before = self._skip_space_back(key_start)
            if text[before] == 0x7B:
                raise ValueError("no nested member value")  # forward() reads such a body
            if text[before] != 0x2C:
                raise ValueError("expected ','")
            last = self._skip_space_back(before)

    def _skip_space_back(self, index: int) -> int:
        """The index of the last byte before C{index} that is not white space."""
        text = self.text
        index -= 1
        while index >= 0 and text[index] in _SPACE_BYTES:
            index -= 1
        if index < 0:
            raise IndexError("start of the body")
        return index
