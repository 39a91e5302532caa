"""A small asyncio HTTP/1.1 client for the benchmarks: raw sockets, timestamps on every read.

One L{Connection} carries one request at a time (keep-alive between them). A L{Response}
records when its first byte and its end arrived and, for C{text/event-stream} bodies, every
event with the time of the read that completed it and how many events that read completed.
"""

import asyncio
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"


@dataclass
class Response:
    sent: float
    status: int = 0
    headers: dict = field(default_factory=dict)
    first_byte: float = 0.0
    first_event: float = 0.0
    end: float = 0.0
    body: bytearray = field(default_factory=bytearray)
    events: list = field(default_factory=list)       # (read time, event bytes)
    read_sizes: list = field(default_factory=list)   # events completed by each read


def request_bytes(path: str, body: bytes, port: int, method: str = "POST") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Connection(asyncio.Protocol):
    """A client connection that parses responses as they arrive."""

    def __init__(self):
        self.transport = None
        self.closed = asyncio.get_running_loop().create_future()
        self._response = None
        self._done = None
        self._buffer = bytearray()
        self._stage = "idle"
        self._remaining = 0
        self._sse = False
        self._events = bytearray()
        self.keep_stream_body = True

    @classmethod
    async def open(cls, port: int) -> "Connection":
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(cls, HOST, port)
        return connection

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(None)
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError(f"connection lost in {self._stage}"))

    def send(self, raw: bytes) -> "asyncio.Future[Response]":
        """Write one request; the future gives its whole L{Response}."""
        self._response = Response(sent=time.monotonic())
        self._done = asyncio.get_running_loop().create_future()
        self._stage, self._buffer = "head", bytearray()
        self.transport.write(raw)
        return self._done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data):
        now = time.monotonic()
        response = self._response
        if response is None or self._stage == "idle":
            return
        if not response.first_byte:
            response.first_byte = now
        self._buffer += data
        if self._stage == "head":
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
            response.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                response.headers[name.strip().lower()] = value.strip()
            del self._buffer[:end + 4]
            self._sse = response.headers.get("content-type", "").startswith("text/event-stream")
            if response.headers.get("transfer-encoding", "").lower() == "chunked":
                self._stage = "size"
            else:
                self._stage, self._remaining = "length", int(
                    response.headers.get("content-length", "0"))
        before = len(response.events)
        self._body(now)
        if self._sse:
            response.read_sizes.append(len(response.events) - before)
        if self._stage == "idle":
            response.end = now
            self._done.set_result(response)

    def _body(self, now: float) -> None:
        buffer = self._buffer
        while True:
            if self._stage == "length":
                take = min(self._remaining, len(buffer))
                self._deliver(bytes(buffer[:take]), now)
                del buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._stage = "idle"
                return
            if self._stage == "size":
                eol = buffer.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(buffer[:eol]).split(b";")[0], 16)
                del buffer[:eol + 2]
                self._stage, self._remaining = ("trailer", 0) if size == 0 else ("data", size)
            elif self._stage == "data":
                take = min(self._remaining, len(buffer))
                self._deliver(bytes(buffer[:take]), now)
                del buffer[:take]
                self._remaining -= take
                if self._remaining:
                    return
                self._stage = "crlf"
            elif self._stage == "crlf":
                if len(buffer) < 2:
                    return
                del buffer[:2]
                self._stage = "size"
            elif self._stage == "trailer":
                eol = buffer.find(b"\r\n")
                if eol < 0:
                    return
                del buffer[:eol + 2]
                if eol == 0:
                    self._stage = "idle"
                    return
            else:
                return

    def _deliver(self, data: bytes, now: float) -> None:
        response = self._response
        if not self._sse:
            response.body += data
            return
        self._events += data
        while True:
            end = self._events.find(b"\n\n")
            if end < 0:
                return
            event = bytes(self._events[:end])
            del self._events[:end + 2]
            if not response.first_event:
                response.first_event = now
            response.events.append((now, event))


async def fetch(port: int, raw: bytes, timeout: float = 60.0) -> Response:
    """Connect, send one request, read the whole response, close."""
    connection = await asyncio.wait_for(Connection.open(port), timeout)
    try:
        return await asyncio.wait_for(connection.send(raw), timeout)
    finally:
        connection.close()
