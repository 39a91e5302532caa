"""Helpers shared by the web resources: JSON answers, OpenAI-shaped errors, bounded bodies,
routing fields read from a body, and the limits on request heads and slow clients."""

from __future__ import annotations

import io
import json
import json.scanner
import math
import re
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, cast

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from llmnode.errors import BadRequest, BodyTooLarge, MethodNotAllowed, NodeError, NotFound

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport, ITransport
    from llmnode.web.server import WebRequest

    class ITCPConnection(ITCPTransport, IPushProducer, IConsumer):
        """A TCP connection's transport as the fast server and client use it: written to,
        throttled (a push producer) and given producers (a consumer)."""

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


def headers_of(pairs: Iterable[tuple[bytes, bytes]]) -> Headers:
    """A C{Headers} object holding the C{(name, value)} C{pairs}."""
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


def pairs_of(headers: Headers) -> list[tuple[bytes, bytes]]:
    """The C{(name, value)} pairs of a C{Headers} object."""
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


class SocketWriter:
    """Writes to a TCP transport's socket at once, as long as the socket takes all of it.

    Twisted's transport sends what is written only at the reactor's next turn, after two
    epoll registrations: for a small request or answer, more than the rest of its writing
    costs. Once the socket takes only part of something (or L{buffered} is called), that rest
    and every later write go to the transport, whose buffer was empty until then, so order
    is kept and the transport's flow control (producers) takes over.
    """

    __slots__ = ("transport", "_socket")

    #: Larger writes go to the transport whole: the rest of a partly sent one would be
    #: copied, on the reactor, for a saving that no longer counts.
    direct_up_to = 256 * 1024

    def __init__(self, transport: ITCPConnection) -> None:
        self.transport = transport
        handle = getattr(transport, "getHandle", None)
        sock = handle() if handle is not None else None
        self._socket = sock if isinstance(sock, socket.socket) else None

    def write(self, data: bytes) -> None:
        sock = self._socket
        if sock is not None and len(data) > self.direct_up_to:
            self._socket = sock = None
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            self._socket = None
        self.transport.write(data)

    def buffered(self) -> None:
        """From now on, write through the transport only."""
        self._socket = None


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
        when_finished = getattr(request, "when_finished", None)
        if when_finished is not None:
            when_finished(self._finished)
        else:
            request.notifyFinish().addBoth(self._finished)

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
        transport = cast("ITransport", getattr(self.request, "transport", None)
                         or self.request.channel)
        transport.loseConnection()
        return True


def max_body_bytes(max_body_mb: float) -> int:
    """The body limit in bytes for a limit in MiB."""
    return int(max_body_mb * 1024 * 1024)


def read_body(request: WebRequest, limit: int) -> bytes:
    """The request body, or L{BodyTooLarge} when it (or its C{Content-Length}) exceeds C{limit}.

    Works with any Request; the node's own (L{llmnode.web.server.NodeRequest}) never stored
    an excess.
    """
    if getattr(request, "body_too_large", False):
        raise body_too_large(limit)
    raw: Optional[bytes] = getattr(request, "raw_body", None)
    if raw is not None:
        if len(raw) > limit:
            raise body_too_large(limit)
        return raw
    declared = request.getHeader(b"Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    content = getattr(request, "content", None)
    if content is None:
        return b""
    content.seek(0, io.SEEK_END)
    if content.tell() > limit:
        raise body_too_large(limit)
    content.seek(0)
    body: bytes = content.read()
    return body


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


class ErrorResource(Resource):
    """A leaf that answers every method with one OpenAI-shaped error (default: 404)."""

    isLeaf = True

    def __init__(self, error: Optional[NodeError] = None) -> None:
        super().__init__()
        self._error = error

    def render(self, request: WebRequest) -> bytes:
        error = self._error or NotFound(f"no such endpoint: {_path(request)}")
        return render_error(request, error)


#: Bytes a request line plus its headers may take (twisted.web's own default).
MAX_HEAD_BYTES = 16384

#: Seconds a connection may stay silent (keep-alive included), and the most a client may take to
#: send a request line and its headers.
IDLE_TIMEOUT = 60.0

#: The most seconds a client may take to send a request body (C{program.body_timeout}).
BODY_TIMEOUT = 300.0


class HeadTooLarge(NodeError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class RequestLineTooLong(NodeError):
    status = 414
    type = "invalid_request_error"
    code = "request_line_too_long"


class RequestTimeout(NodeError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
