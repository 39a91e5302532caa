"""A deliberately fast fake OpenAI backend for the benchmarks (raw asyncio, HTTP/1.1 keep-alive).

Usage: python benchmarks/fast_backend.py --port N [--host 127.0.0.1] [--events FILE]

It must be much faster than the node, so that a benchmark through the node measures the node.
Endpoints:

  GET  /health, /v1/models          200 with a tiny JSON
  POST /v1/chat/completions         a fixed small JSON answer; with C{"stream": true} an SSE
                                    stream (chunked) of C{bench_chunks} events, one every
                                    C{bench_interval} s, each carrying its send time C{"t"}
                                    (time.monotonic(), comparable across processes on Linux);
                                    C{bench_hold}: seconds to hold the stream open after the
                                    first event (ends early when the peer leaves)

Bodies over 16 KiB are not parsed: they get the fixed answer, with the body size in
C{X-Body-Bytes}. With C{--events FILE} it appends, one line each, C{start T PID},
C{listening T}, C{health200 T} (first answered /health) and C{v1 T} (first /v1 request), so a
benchmark can time a cold start and count spawns. Only imports the standard library, to start
fast; C{--alarm S} ends it after S seconds whatever happens.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time

STARTED = time.monotonic()

CHAT = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}, separators=(",", ":")).encode()
HEALTH = b'{"status":"ok"}'
MODELS = b'{"object":"list","data":[{"id":"bench","object":"model","owned_by":"bench"}]}'
SMALL_BODY = 16 * 1024
MAX_HEAD = 64 * 1024


def response(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


CHAT_RESPONSE = response(b"200 OK", CHAT)
HEALTH_RESPONSE = response(b"200 OK", HEALTH)
MODELS_RESPONSE = response(b"200 OK", MODELS)
NOT_FOUND = response(b"404 Not Found", b'{"error":{"message":"not found"}}')
BAD = response(b"400 Bad Request", b'{"error":{"message":"bad request"}}',
               b"Connection: close\r\n")
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


class Events:
    """The one-line-per-fact log the benchmark reads (or nothing without a path)."""

    def __init__(self, path):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
        self._seen = set()

    def note(self, what: str, once: bool = False, extra: str = "") -> None:
        if self._fd is None or (once and what in self._seen):
            return
        self._seen.add(what)
        os.write(self._fd, f"{what} {time.monotonic():.6f} {extra}\n".encode())


class HTTPServerProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; one stream at a time per connection."""

    def __init__(self, events: Events):
        self.events = events
        self.buffer = bytearray()
        self.transport = None
        self.streaming = None
        self.gone = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.gone = True
        if self.streaming is not None:
            self.streaming.cancel()

    def data_received(self, data):
        self.buffer += data
        if self.streaming is None:
            self.process()

    def process(self):
        while not self.gone and self.streaming is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.fail()
                return
            head = bytes(self.buffer[:end]).split(b"\r\n")
            try:
                method, target, _ = head[0].split(b" ", 2)
            except ValueError:
                return self.fail()
            length, chunked, close = 0, False, False
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    close = b"close" in value.lower()
            start = end + 4
            if chunked:
                parsed = dechunk(self.buffer, start)
                if parsed is None:
                    return
                body, used = parsed
            else:
                if len(self.buffer) - start < length:
                    return
                body, used = bytes(self.buffer[start:start + length]), start + length
            del self.buffer[:used]
            self.answer(method, target.split(b"?", 1)[0], body)
            if close:
                self.transport.close()
                self.gone = True

    def fail(self):
        self.transport.write(BAD)
        self.transport.close()
        self.gone = True

    def answer(self, method: bytes, path: bytes, body: bytes) -> None:
        write = self.transport.write
        if path == b"/health":
            write(HEALTH_RESPONSE)
            self.events.note("health200", once=True)
            return
        if path.startswith(b"/v1/"):
            self.events.note("v1", once=True)
        if path == b"/v1/models":
            write(MODELS_RESPONSE)
        elif method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            if len(body) > SMALL_BODY:
                write(response(b"200 OK", CHAT, b"X-Body-Bytes: %d\r\n" % len(body)))
                return
            try:
                request = json.loads(body)
            except ValueError:
                write(response(b"400 Bad Request", b'{"error":{"message":"bad json"}}'))
                return
            if isinstance(request, dict) and request.get("stream"):
                self.streaming = asyncio.get_running_loop().create_task(self.stream(request))
            else:
                write(CHAT_RESPONSE)
        else:
            write(NOT_FOUND)

    async def stream(self, request: dict) -> None:
        chunks = int(request.get("bench_chunks", 8))
        interval = float(request.get("bench_interval", 0.01))
        hold = float(request.get("bench_hold", 0))
        write = self.transport.write
        try:
            write(SSE_HEAD)
            for i in range(chunks):
                if i:
                    await asyncio.sleep(interval if i > 1 or not hold else hold)
                event = ('data: {"id":"chatcmpl-bench","object":"chat.completion.chunk",'
                         '"choices":[{"index":0,"delta":{"content":"x"}}],"i":%d,"t":%.6f}\n\n'
                         % (i, time.monotonic())).encode()
                write(b"%x\r\n%s\r\n" % (len(event), event))
            if not hold:
                await asyncio.sleep(interval)
            done = b"data: [DONE]\n\n"
            write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        except asyncio.CancelledError:
            return
        self.streaming = None
        if self.buffer:
            self.process()


def dechunk(buffer: bytearray, start: int):
    """(body, bytes used) of a complete chunked body at C{start}, or None if incomplete."""
    parts, pos = [], start
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buffer[pos:eol]).split(b";")[0], 16)
        if size == 0:
            end = buffer.find(b"\r\n\r\n", eol)
            if end < 0:
                return None
            return b"".join(parts), end + 4
        if len(buffer) < eol + 2 + size + 2:
            return None
        parts.append(bytes(buffer[eol + 2:eol + 2 + size]))
        pos = eol + 2 + size + 2


async def serve(args) -> None:
    events = Events(args.events)
    events.note("start", extra=str(os.getpid()))
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_server(lambda: HTTPServerProtocol(events), args.host, args.port,
                                      backlog=4096, reuse_address=True)
    events.note("listening")
    print(f"listening on {args.host}:{args.port} pid {os.getpid()}", flush=True)
    await stop
    server.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="fast fake OpenAI backend for benchmarks")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--events", help="append start/listening/health200/v1 lines here")
    parser.add_argument("--alarm", type=int, default=1800, help="exit after this many seconds")
    args = parser.parse_args(argv)
    signal.alarm(args.alarm)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
