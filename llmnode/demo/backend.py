"""A fake OpenAI-compatible model server: cheap, deterministic answers for demos and tests.

Run it as C{python -m llmnode.demo.backend --port N}. It answers chat completions, completions
(JSON or SSE), embeddings and rerank requests like a real backend would; responses, Anthropic
messages, llama.cpp's native routes, audio transcriptions and translations (uploads), speech
(WAV bytes), image generations and edits with fixed, cheap answers; and a few pages of its own
(C{/}, C{/props}, C{/slots}, C{/debug/echo} for any method). Its flags make it
misbehave on purpose (slow start, crash, die mid-stream, ignore SIGTERM, leave a child behind,
speak garbage) so the node's supervision and proxy paths can be exercised with real processes.

Every JSON answer carries an C{llmnode_echo} object describing the request as the backend saw
it (path, query, body size and hash, model, headers), so a test can check what a proxy
forwarded. C{GET /debug/stats} reports requests served, open connections and the times at
which clients went away mid-request.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import re
import signal
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

#: What C{--garbage} answers on every connection before closing it.
GARBAGE = b"this is not http\r\n\r\n"

#: Exit statuses for the deliberate failures.
CRASH_STATUS = 3
DIE_MID_STREAM_STATUS = 4

#: How long a deliberate exit waits for the last bytes to reach the socket.
_FLUSH_GRACE = 2.0

_MAX_ECHOED_MESSAGE = 200
_MAX_CHUNKS = 100_000
_WORD = re.compile(r"\w+")
_UNCOUNTED_PATHS = ("/health", "/debug/stats")
_RERANK_PATHS = ("/v1/rerank", "/v1/reranking", "/rerank")
_NATIVE_PATHS = ("/completion", "/infill", "/tokenize", "/detokenize")

#: A 1x1 transparent PNG, the image every image request gets.
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAA"
    "AABJRU5ErkJggg==")

#: Speech: mono 16-bit PCM at this rate, this many seconds per word of input.
SPEECH_RATE = 16000
SPEECH_SECONDS_PER_WORD = 0.05

_log = Logger()


@dataclass(frozen=True)
class BackendOptions:
    """The command line, parsed. Defaults match the CLI's."""

    port: int = 0
    host: str = "127.0.0.1"
    model_name: str = "demo"
    start_delay: float = 0.0
    health_delay: float = 0.0
    no_health: bool = False
    crash_after: Optional[int] = None
    die_mid_stream: Optional[int] = None
    ignore_sigterm: bool = False
    fork_child: bool = False
    exit_at_once: Optional[str] = None
    long_line: int = 0
    chunks: int = 8
    chunk_interval: float = 0.02
    garbage: bool = False
    slow_headers: float = 0.0
    alarm: int = 3600
    embedding_dim: int = 16
    rss_mb: int = 0


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_args(argv: list[str]) -> BackendOptions:
    """Parse the command line (without the program name); exits 2 on a bad one."""
    parser = argparse.ArgumentParser(
        prog="python -m llmnode.demo.backend",
        description="A fake OpenAI-compatible backend for llmnode demos and tests.",
    )
    parser.add_argument("--port", type=_non_negative_int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-name", default="demo")
    parser.add_argument("--start-delay", type=_non_negative_float, default=0.0)
    parser.add_argument("--health-delay", type=_non_negative_float, default=0.0)
    parser.add_argument("--no-health", action="store_true")
    parser.add_argument("--crash-after", type=_positive_int, default=None)
    parser.add_argument("--die-mid-stream", type=_non_negative_int, default=None)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--fork-child", action="store_true")
    parser.add_argument("--exit-at-once", metavar="MSG", default=None)
    parser.add_argument("--long-line", metavar="KB", type=_non_negative_int, default=0)
    parser.add_argument("--chunks", type=_non_negative_int, default=8)
    parser.add_argument("--chunk-interval", type=_non_negative_float, default=0.02)
    parser.add_argument("--garbage", action="store_true")
    parser.add_argument("--slow-headers", type=_non_negative_float, default=0.0)
    parser.add_argument("--alarm", type=_non_negative_float, default=3600.0)
    parser.add_argument("--embedding-dim", type=_positive_int, default=16)
    parser.add_argument("--rss-mb", type=_non_negative_int, default=0,
                        help="hold this much real memory (touched) while running, like a "
                             "loaded model")
    args = parser.parse_args(argv)
    return BackendOptions(
        port=args.port,
        host=args.host,
        model_name=args.model_name,
        start_delay=args.start_delay,
        health_delay=args.health_delay,
        no_health=args.no_health,
        crash_after=args.crash_after,
        die_mid_stream=args.die_mid_stream,
        ignore_sigterm=args.ignore_sigterm,
        fork_child=args.fork_child,
        exit_at_once=args.exit_at_once,
        long_line=args.long_line,
        chunks=args.chunks,
        chunk_interval=args.chunk_interval,
        garbage=args.garbage,
        slow_headers=args.slow_headers,
        alarm=math.ceil(args.alarm),
        embedding_dim=args.embedding_dim,
        rss_mb=args.rss_mb,
    )


# Pure helpers: the deterministic "model".


def embedding_vector(text: str, dim: int) -> list[float]:
    """A unit vector of C{dim} floats derived from a hash of C{text}: same text, same vector."""
    values: list[float] = []
    block = 0
    while len(values) < dim:
        digest = hashlib.sha256(b"%d:" % block + text.encode("utf-8")).digest()
        for (word,) in struct.iter_unpack(">I", digest):
            values.append(word / 2**31 - 1.0)
        block += 1
    values = values[:dim]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def relevance_score(query: str, document: str) -> float:
    """A score in [0, 1): mostly the share of query words found in the document, plus a
    small hash-derived part so that ties are rare but still deterministic."""
    query_words = set(_WORD.findall(query.lower()))
    document_words = set(_WORD.findall(document.lower()))
    overlap = len(query_words & document_words) / len(query_words) if query_words else 0.0
    digest = hashlib.sha256(query.encode("utf-8") + b"\0" + document.encode("utf-8")).digest()
    jitter = int.from_bytes(digest[:4], "big") / 2**32
    return round(0.9 * overlap + 0.0999 * jitter, 6)


def rank(query: str, documents: list[str], top_n: Optional[int] = None) -> list[dict[str, Any]]:
    """Rerank results, best first: C{[{"index": i, "relevance_score": s}, ...]}."""
    scored = [
        {"index": index, "relevance_score": relevance_score(query, document)}
        for index, document in enumerate(documents)
    ]
    scored.sort(key=lambda result: (-result["relevance_score"], result["index"]))
    return scored if top_n is None else scored[:top_n]


def split_text(text: str, pieces: int) -> list[str]:
    """Cut C{text} into C{pieces} consecutive parts of near-equal length (some may be empty)."""
    if pieces <= 0:
        return []
    size, extra = divmod(len(text), pieces)
    parts, start = [], 0
    for index in range(pieces):
        end = start + size + (1 if index < extra else 0)
        parts.append(text[start:end])
        start = end
    return parts


def count_tokens(text: str) -> int:
    """A cheap stand-in for a tokenizer: the number of words, at least 1."""
    return max(1, len(_WORD.findall(text)))


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def last_user_message(messages: Any) -> str:
    """The text of the last C{user} message of a chat request ("" if there is none)."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _message_text(message.get("content"))
    return ""


def prompt_text(prompt: Any) -> str:
    """The text of a completions C{prompt} (a string or a list of strings)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return " ".join(item for item in prompt if isinstance(item, str))
    return ""


def answer_text(seen: str, echo_bytes: Optional[int]) -> str:
    """The generated text: C{echo: <seen, cut to 200 chars>}, or exactly C{echo_bytes} bytes."""
    if echo_bytes is not None:
        filler = "echo_bytes "
        return (filler + "x" * echo_bytes)[:echo_bytes]
    return "echo: " + seen[:_MAX_ECHOED_MESSAGE]


def _echo_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class BadRequest(Exception):
    """A request the backend refuses with a 400; C{param} names the offending field."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _optional_int(body: dict[str, Any], name: str) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{name} must be an integer >= 0", name)
    return value


def _optional_interval(body: dict[str, Any], name: str) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 3600:
        raise BadRequest(f"{name} must be a number of seconds >= 0", name)
    return float(value)


def _error_body(message: str, kind: str, param: Optional[str] = None,
                code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BackendStats:
    """What C{/debug/stats} reports; mutated by the resource and the channels."""

    def __init__(self, pid: int, started: float) -> None:
        self.pid = pid
        self.started = started
        self.requests = 0
        self.open_connections = 0
        self.disconnects: list[float] = []

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "requests": self.requests,
            "open_connections": self.open_connections,
            "disconnects": list(self.disconnects),
            "started": self.started,
        }


class _Exchange:
    """One request in flight: whether the client left, and the timer it waits on."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.channel: Any = getattr(request, "channel", None)
        self.gone = False
        self.done = False
        self.dying = False
        self.pending: Optional[IDelayedCall] = None
        self.path = "/"
        self.query = ""
        self.echo: Optional[dict[str, Any]] = None

    def cancel_pending(self) -> None:
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None


class DemoResource(Resource):
    """The whole URL space of the fake backend (a leaf that routes on the path).

    @param options: the parsed command line.
    @param clock: schedules stream chunks, slow headers and the health delay.
    @param stats: counters shared with the channels.
    @param exit: called with an exit status for the deliberate crashes (never returns in
        production; tests pass a recorder).
    @param wallclock: Unix time, for C{created} fields and chunk timestamps.
    """

    isLeaf = True

    def __init__(
        self,
        options: BackendOptions,
        clock: IReactorTime,
        stats: BackendStats,
        exit: Callable[[int], Any],
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self._options = options
        self._clock = clock
        self._stats = stats
        self._exit = exit
        self._wallclock = wallclock
        self._started = clock.seconds()
        self._counter = 0
        self._exiting = False
        self._routes: dict[tuple[str, str], Callable[..., Any]] = {
            ("GET", "/health"): self._health,
            ("GET", "/debug/stats"): self._debug_stats,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
        }
        self._routes.update({("POST", path): self._rerank for path in _RERANK_PATHS})
        self._routes.update({
            ("POST", "/v1/responses"): self._responses,
            ("POST", "/v1/messages"): self._messages,
            ("POST", "/v1/messages/count_tokens"): self._count_tokens,
            ("POST", "/completion"): self._native_completion,
            ("POST", "/infill"): self._native_completion,
            ("POST", "/tokenize"): self._tokenize,
            ("POST", "/detokenize"): self._detokenize,
            ("POST", "/v1/audio/speech"): self._speech,
            ("POST", "/v1/images/generations"): self._image_generations,
            ("GET", "/"): self._home,
            ("GET", "/props"): self._props,
            ("GET", "/slots"): self._slots,
        })
        #: Routes whose body is not JSON: the handler gets the raw body.
        self._raw_routes = {
            ("POST", "/v1/audio/transcriptions"): self._transcription,
            ("POST", "/v1/audio/translations"): self._transcription,
            ("POST", "/v1/images/edits"): self._image_edits,
        }
        self._routes.update(self._raw_routes)
        self._paths = {path for _, path in self._routes} | {"/debug/echo"}

    def render(self, request: Request) -> int:
        exchange = _Exchange(request)
        request.notifyFinish().addErrback(lambda _: self._client_gone(exchange))
        if self._options.slow_headers > 0:
            exchange.pending = self._clock.callLater(
                self._options.slow_headers, self._dispatch, exchange
            )
        else:
            self._dispatch(exchange)
        return NOT_DONE_YET

    def _client_gone(self, exchange: _Exchange) -> None:
        exchange.gone = True
        exchange.cancel_pending()
        if not exchange.dying:
            self._stats.disconnects.append(self._wallclock())

    def _dispatch(self, exchange: _Exchange) -> None:
        exchange.pending = None
        if exchange.gone:
            return
        try:
            self._route(exchange)
        except Exception:
            _log.failure("demo backend failed to answer {path}", path=exchange.path)
            self._fail(exchange)

    def _fail(self, exchange: _Exchange) -> None:
        """Answer 500 after a bug, or cut the connection if the answer had already begun."""
        if exchange.gone or exchange.done:
            return
        try:
            if getattr(exchange.request, "startedWriting", False):
                exchange.done = True
                exchange.channel.transport.abortConnection()
            else:
                error = _error_body("internal error in the demo backend", "server_error")
                self._send_json(exchange, 500, error)
        except Exception:
            _log.failure("demo backend could not report its own failure")

    def _route(self, exchange: _Exchange) -> None:
        request = exchange.request
        path, _, query = request.uri.partition(b"?")
        if b"://" in path:
            path = b"/" + path.split(b"://", 1)[1].partition(b"/")[2]
        exchange.path = path.decode("utf-8", "replace")
        exchange.query = query.decode("utf-8", "replace")
        content = getattr(request, "content", None)
        raw = content.read() if content is not None else b""
        method = request.method.decode("ascii", "replace").upper()
        handler = self._routes.get((method, exchange.path))
        if exchange.path not in _UNCOUNTED_PATHS:
            exchange.echo = self._echo(exchange, request, raw)
        if exchange.path == "/debug/echo":
            self._send_json(exchange, 200, {"method": method})
            return
        raw_handler = self._raw_routes.get((method, exchange.path))
        if raw_handler is not None:
            try:
                raw_handler(exchange, raw, request.getHeader(b"content-type"))
            except BadRequest as error:
                self._send_error(exchange, 400, error.message, error.param)
            return
        if handler is None:
            if exchange.path in self._paths:
                self._send_error(exchange, 405, f"method {method} not allowed here")
            else:
                self._send_error(exchange, 404, f"no route {exchange.path}", code="not_found")
            return
        if method != "POST":
            handler(exchange, None)
            return
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            self._send_error(exchange, 400, f"could not parse the JSON body: {error}"[:300])
            return
        if not isinstance(body, dict):
            self._send_error(exchange, 400, "the JSON body must be an object")
            return
        if exchange.echo is not None and isinstance(body.get("model"), str):
            exchange.echo["model"] = body["model"]
        try:
            handler(exchange, body)
        except BadRequest as error:
            self._send_error(exchange, 400, error.message, error.param)

    def _echo(self, exchange: _Exchange, request: Request, raw: bytes) -> dict[str, Any]:
        headers: dict[str, str] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            key = name.decode("latin-1").lower()
            value = ", ".join(v.decode("latin-1") for v in values)
            headers[key] = headers[key] + ", " + value if key in headers else value
        return {
            "method": request.method.decode("ascii", "replace"),
            "path": exchange.path,
            "query": exchange.query,
            "body_bytes": len(raw),
            "body_sha256": hashlib.sha256(raw).hexdigest(),
            "model": None,
            "headers": headers,
        }

    # Sending.

    def _send_json(self, exchange: _Exchange, code: int, payload: dict[str, Any]) -> None:
        if exchange.echo is not None:
            payload = dict(payload, llmnode_echo=exchange.echo)
        data = json.dumps(payload).encode("utf-8")
        request = exchange.request
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(data))
        request.write(data)
        self._finish(exchange)

    def _send_error(
        self,
        exchange: _Exchange,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Any = None,
        kind: str = "invalid_request_error",
    ) -> None:
        self._send_json(exchange, status, _error_body(message, kind, param, code))

    def _finish(self, exchange: _Exchange) -> None:
        exchange.done = True
        exchange.request.finish()
        if not (exchange.path.startswith("/v1/") or exchange.path in _RERANK_PATHS
                or exchange.path in _NATIVE_PATHS):
            return
        self._stats.requests += 1
        crash_after = self._options.crash_after
        if crash_after is not None and self._stats.requests >= crash_after:
            self._exit_after_flush(exchange, CRASH_STATUS)

    def _exit_after_flush(self, exchange: _Exchange, status: int) -> None:
        """Exit with C{status} once this exchange's bytes have left (or after a grace)."""
        if self._exiting:
            return
        self._exiting = True
        exchange.dying = True
        channel = exchange.channel
        transport = getattr(channel, "transport", None)
        when_lost = getattr(channel, "when_lost", None)
        if transport is None or when_lost is None:
            self._exit(status)
            return
        when_lost().addCallback(lambda _: self._exit(status))
        self._clock.callLater(_FLUSH_GRACE, self._exit, status)
        transport.loseConnection()

    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-demo-{self._counter}"

    def _model(self, body: Optional[dict[str, Any]]) -> str:
        model = body.get("model") if body else None
        return model if isinstance(model, str) else self._options.model_name

    # Handlers.

    def _health(self, exchange: _Exchange, body: None) -> None:
        if self._options.no_health:
            self._send_error(exchange, 404, "no health endpoint", code="not_found")
        elif self._clock.seconds() - self._started < self._options.health_delay:
            self._send_json(exchange, 503, {"status": "loading"})
        else:
            self._send_json(exchange, 200, {"status": "ok"})

    def _debug_stats(self, exchange: _Exchange, body: None) -> None:
        self._send_json(exchange, 200, self._stats.snapshot())

    def _models(self, exchange: _Exchange, body: None) -> None:
        model = {
            "id": self._options.model_name,
            "object": "model",
            "created": int(self._stats.started),
            "owned_by": "llmnode-demo",
        }
        self._send_json(exchange, 200, {"object": "list", "data": [model]})

    def _chat(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        seen = last_user_message(body.get("messages"))
        self._generate(exchange, body, seen, chat=True)

    def _completions(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        seen = prompt_text(body.get("prompt"))
        self._generate(exchange, body, seen, chat=False)

    def _generate(self, exchange: _Exchange, body: dict[str, Any], seen: str, chat: bool) -> None:
        text = answer_text(seen, _optional_int(body, "echo_bytes"))
        chunks = _optional_int(body, "chunks")
        interval = _optional_interval(body, "chunk_interval")
        if chunks is not None and chunks > _MAX_CHUNKS:
            raise BadRequest(f"chunks must be at most {_MAX_CHUNKS}", "chunks")
        prompt_tokens, completion_tokens = count_tokens(seen), count_tokens(text)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if body.get("stream") is True:
            options = body.get("stream_options")
            wants_usage = isinstance(options, dict) and options.get("include_usage") is True
            _Stream(
                self,
                exchange,
                pieces=split_text(text, self._options.chunks if chunks is None else chunks),
                interval=self._options.chunk_interval if interval is None else interval,
                template=self._chunk_template(body, chat),
                chat=chat,
                usage=usage if wants_usage else None,
            ).start()
            return
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
        self._send_json(
            exchange,
            200,
            {
                "id": self._next_id("chatcmpl" if chat else "cmpl"),
                "object": "chat.completion" if chat else "text_completion",
                "created": int(self._wallclock()),
                "model": self._model(body),
                "choices": [choice],
                "usage": usage,
            },
        )

    def _chunk_template(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        return {
            "id": self._next_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(self._wallclock()),
            "model": self._model(body),
        }

    def _embeddings(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        given = body.get("input")
        if isinstance(given, str):
            texts = [given]
        elif isinstance(given, list) and given and all(isinstance(t, str) for t in given):
            texts = given
        elif isinstance(given, list) and given:
            texts = [_echo_text(item) for item in given]
        else:
            raise BadRequest("input must be a string or a non-empty list of strings", "input")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest("encoding_format must be float or base64", "encoding_format")
        data = []
        for index, text in enumerate(texts):
            vector: Any = embedding_vector(text, self._options.embedding_dim)
            if encoding == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = sum(count_tokens(text) for text in texts)
        self._send_json(
            exchange,
            200,
            {
                "object": "list",
                "data": data,
                "model": self._model(body),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def _rerank(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        query = body.get("query")
        if not isinstance(query, str):
            raise BadRequest("query must be a string", "query")
        documents = body.get("documents")
        if not isinstance(documents, list):
            raise BadRequest("documents must be a list", "documents")
        texts = []
        for document in documents:
            if isinstance(document, dict) and isinstance(document.get("text"), str):
                texts.append(document["text"])
            elif isinstance(document, str):
                texts.append(document)
            else:
                raise BadRequest("each document must be a string or {\"text\": ...}", "documents")
        top_n = _optional_int(body, "top_n")
        results = rank(query, texts, top_n)
        if body.get("return_documents") is True:
            for result in results:
                result["document"] = {"text": texts[result["index"]]}
        tokens = count_tokens(query) + sum(count_tokens(text) for text in texts)
        self._send_json(
            exchange,
            200,
            {
                "id": self._next_id("rerank"),
                "object": "list",
                "model": self._model(body),
                "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )


    def _responses(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        given = body.get("input")
        seen = given if isinstance(given, str) else last_user_message(given)
        text = answer_text(seen, _optional_int(body, "echo_bytes"))
        if body.get("stream") is True:
            raise BadRequest("the demo backend answers responses without streaming", "stream")
        input_tokens, output_tokens = count_tokens(seen), count_tokens(text)
        response_id = self._next_id("resp")
        message = {"type": "message", "id": "msg" + response_id[4:], "status": "completed",
                   "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        self._send_json(exchange, 200, {
            "id": response_id, "object": "response", "created_at": int(self._wallclock()),
            "status": "completed", "model": self._model(body), "output": [message],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "total_tokens": input_tokens + output_tokens,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
        })

    def _messages(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        seen = last_user_message(body.get("messages"))
        text = answer_text(seen, None)
        self._send_json(exchange, 200, {
            "id": self._next_id("msg"), "type": "message", "role": "assistant",
            "model": self._model(body), "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": count_tokens(seen), "output_tokens": count_tokens(text)},
        })

    def _count_tokens(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        seen = last_user_message(body.get("messages"))
        self._send_json(exchange, 200, {"input_tokens": count_tokens(seen)})

    def _native_completion(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        if exchange.path == "/infill":
            prefix, suffix = body.get("input_prefix", ""), body.get("input_suffix", "")
            seen = f"{_echo_text(prefix)}|{_echo_text(suffix)}"
        else:
            seen = prompt_text(body.get("prompt"))
        text = answer_text(seen, None)
        self._send_json(exchange, 200, {
            "content": text, "stop": True, "model": self._model(body),
            "tokens_evaluated": count_tokens(seen), "tokens_predicted": count_tokens(text),
        })

    def _tokenize(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        content = body.get("content")
        if not isinstance(content, str):
            raise BadRequest("content must be a string", "content")
        self._send_json(exchange, 200, {"tokens": [token_id(word) for word in
                                                   _WORD.findall(content)]})

    def _detokenize(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise BadRequest("tokens must be a list of integers", "tokens")
        self._send_json(exchange, 200, {"content": " ".join(f"<{t}>" for t in tokens)})

    def _speech(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        text = body.get("input")
        if not isinstance(text, str) or not text:
            raise BadRequest("input must be a non-empty string", "input")
        chunks = _optional_int(body, "chunks")
        if chunks is not None and not 1 <= chunks <= _MAX_CHUNKS:
            raise BadRequest(f"chunks must be 1 to {_MAX_CHUNKS}", "chunks")
        interval = _optional_interval(body, "chunk_interval")
        audio = speech_wav(text)
        request = exchange.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"audio/wav")
        request.setHeader(b"content-length", b"%d" % len(audio))
        size = -(-len(audio) // (chunks or 1))
        pieces = [audio[start:start + size] for start in range(0, len(audio), size)]
        _Pieces(self, exchange, pieces, interval or 0.0).start()

    def _image_generations(self, exchange: _Exchange, body: dict[str, Any]) -> None:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string", "prompt")
        self._send_images(exchange, prompt, body.get("n"), body.get("response_format"))

    def _image_edits(self, exchange: _Exchange, raw: bytes, content_type: Optional[bytes]) -> None:
        form = _form(exchange, raw, content_type,
                     (b"model", b"prompt", b"image", b"image[]", b"n", b"response_format"))
        image = form.get(b"image", form.get(b"image[]"))
        if image is None:
            raise BadRequest("an image file is required", "image")
        prompt = form.get(b"prompt", b"").decode("utf-8", "replace")
        n = form.get(b"n")
        self._send_images(exchange, f"edit of {len(image)} bytes: {prompt}",
                          int(n) if n is not None and n.isdigit() else None,
                          form.get(b"response_format", b"b64_json").decode("ascii", "replace"))

    def _send_images(self, exchange: _Exchange, prompt: str, n: Any,
                     response_format: Any) -> None:
        count = 1 if n is None else n
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10:
            raise BadRequest("n must be 1 to 10", "n")
        image = base64.b64encode(PNG_1X1).decode("ascii")
        if response_format == "url":
            item = {"url": "data:image/png;base64," + image}
        else:
            item = {"b64_json": image}
        item["revised_prompt"] = prompt[:_MAX_ECHOED_MESSAGE]
        self._send_json(exchange, 200, {"created": int(self._wallclock()),
                                        "data": [dict(item) for _ in range(count)]})

    def _transcription(self, exchange: _Exchange, raw: bytes,
                       content_type: Optional[bytes]) -> None:
        form = _form(exchange, raw, content_type,
                     (b"model", b"file", b"response_format", b"language"))
        audio = form.get(b"file")
        if audio is None:
            raise BadRequest("a file is required", "file")
        task = "translate" if exchange.path.endswith("translations") else "transcribe"
        text = f"{task}: {len(audio)} bytes, sha256 {hashlib.sha256(audio).hexdigest()}"
        response_format = form.get(b"response_format", b"json")
        if response_format == b"text":
            self._send_text(exchange, 200, text + "\n")
        elif response_format == b"verbose_json":
            self._send_json(exchange, 200, {"task": task, "language": "english",
                                            "duration": 0.0, "text": text, "segments": []})
        else:
            self._send_json(exchange, 200, {"text": text})

    def _home(self, exchange: _Exchange, body: None) -> None:
        page = (f"<!doctype html><title>demo backend</title><h1>llmnode demo backend "
                f"{self._options.model_name}</h1><a href=\"props\">props</a>\n")
        self._send_text(exchange, 200, page, b"text/html; charset=utf-8")

    def _props(self, exchange: _Exchange, body: None) -> None:
        self._send_json(exchange, 200, {"model_alias": self._options.model_name,
                                        "total_slots": 1})

    def _slots(self, exchange: _Exchange, body: None) -> None:
        self._send_json(exchange, 200, {"slots": [{"id": 0, "is_processing": False}]})

    def _send_text(self, exchange: _Exchange, code: int, text: str,
                   content_type: bytes = b"text/plain; charset=utf-8") -> None:
        data = text.encode("utf-8")
        request = exchange.request
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % len(data))
        request.write(data)
        self._finish(exchange)


def token_id(word: str) -> int:
    """A stand-in token id for C{word}: a hash, below 32000."""
    return int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:4], "big") % 32000


def speech_wav(text: str) -> bytes:
    """A WAV file of a tone, L{SPEECH_SECONDS_PER_WORD} per word of C{text}, its pitch
    derived from the text: same text, same bytes."""
    samples = int(SPEECH_RATE * SPEECH_SECONDS_PER_WORD * count_tokens(text))
    pitch = 200 + hashlib.sha256(text.encode("utf-8")).digest()[0] * 2
    step = 2 * math.pi * pitch / SPEECH_RATE
    pcm = struct.pack(f"<{samples}h", *(int(8000 * math.sin(step * i)) for i in range(samples)))
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, 1,
                         1, SPEECH_RATE, SPEECH_RATE * 2, 2, 16, b"data", len(pcm))
    return header + pcm


def _form(exchange: _Exchange, raw: bytes, content_type: Optional[bytes],
          names: tuple[bytes, ...]) -> dict[bytes, bytes]:
    """The fields C{names} of a multipart/form-data body: name -> value bytes. Its C{model}
    goes into the echo."""
    from llmnode.errors import NodeError
    from llmnode.web.multipart import boundary_of, form_fields

    try:
        spans = form_fields(raw, boundary_of(content_type), frozenset(names))
    except NodeError as error:
        raise BadRequest(error.message) from None
    form = {name: raw[start:end] for name, (start, end) in spans.items()}
    if exchange.echo is not None and b"model" in form:
        exchange.echo["model"] = form[b"model"].decode("utf-8", "replace")
    return form


class _Pieces:
    """A body written in pieces, C{interval} seconds apart (the response head is set)."""

    def __init__(self, resource: DemoResource, exchange: _Exchange, pieces: list[bytes],
                 interval: float) -> None:
        self._resource = resource
        self._exchange = exchange
        self._pieces = pieces
        self._interval = interval

    def start(self) -> None:
        self._send(0)

    def _send(self, index: int) -> None:
        exchange = self._exchange
        exchange.pending = None
        if exchange.gone or exchange.dying:
            return
        for index in range(index, len(self._pieces)):
            exchange.request.write(self._pieces[index])
            if self._interval > 0 and index + 1 < len(self._pieces):
                exchange.pending = self._resource._clock.callLater(
                    self._interval, self._send, index + 1)
                return
        self._resource._finish(exchange)


class _Stream:
    """One SSE answer: a chunk now, the rest C{interval} apart, then C{data: [DONE]}.

    @param usage: the token counts, sent as a last chunk with no choices before C{[DONE]} (as
        real servers do for C{stream_options.include_usage}); None sends none.
    """

    def __init__(
        self,
        resource: DemoResource,
        exchange: _Exchange,
        pieces: list[str],
        interval: float,
        template: dict[str, Any],
        chat: bool,
        usage: Optional[dict[str, Any]] = None,
    ) -> None:
        self._resource = resource
        self._exchange = exchange
        self._pieces = pieces
        self._interval = interval
        self._template = template
        self._chat = chat
        self._usage = usage

    def start(self) -> None:
        request = self._exchange.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        if self._resource._options.die_mid_stream == 0:
            request.write(b"")
            self._resource._exit_after_flush(self._exchange, DIE_MID_STREAM_STATUS)
            return
        self._send(0)

    def _event(self, index: int) -> dict[str, Any]:
        piece = self._pieces[index]
        last = index == len(self._pieces) - 1
        if self._chat:
            delta = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
            choice = {"index": 0, "delta": delta, "logprobs": None}
        else:
            choice = {"index": 0, "text": piece, "logprobs": None}
        choice["finish_reason"] = "stop" if last else None
        event = dict(self._template, choices=[choice], index=index)
        event["llmnode_sent"] = self._resource._wallclock()
        if index == 0 and self._exchange.echo is not None:
            event["llmnode_echo"] = self._exchange.echo
        return event

    def _send(self, index: int) -> None:
        exchange = self._exchange
        exchange.pending = None
        if exchange.gone or exchange.dying:
            return
        try:
            self._send_unsafe(index)
        except Exception:
            _log.failure("demo backend stream failed")
            self._resource._fail(exchange)

    def _send_unsafe(self, index: int) -> None:
        exchange = self._exchange
        request = exchange.request
        if index >= len(self._pieces):
            if self._usage is not None:
                usage = dict(self._template, choices=[], usage=self._usage)
                request.write(b"data: " + json.dumps(usage).encode("utf-8") + b"\n\n")
            request.write(b"data: [DONE]\n\n")
            self._resource._finish(exchange)
            return
        request.write(b"data: " + json.dumps(self._event(index)).encode("utf-8") + b"\n\n")
        if self._resource._options.die_mid_stream == index + 1:
            self._resource._exit_after_flush(exchange, DIE_MID_STREAM_STATUS)
            return
        if index + 1 >= len(self._pieces):
            self._send(index + 1)
        else:
            clock = self._resource._clock
            exchange.pending = clock.callLater(self._interval, self._send, index + 1)


class DemoChannel(HTTPChannel):
    """An HTTP channel that disables Nagle, counts itself open, and says when it is gone."""

    transport: ITCPTransport
    site: DemoSite

    def connectionMade(self) -> None:
        super().connectionMade()
        self._lost_waiters: list[Deferred[None]] = []
        self._connection_gone = False
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        self.site.stats.open_connections += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connection_gone = True
        self.site.stats.open_connections -= 1
        try:
            super().connectionLost(reason)
        finally:
            waiters, self._lost_waiters = self._lost_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires once the connection has closed."""
        waiter: Deferred[None] = Deferred()
        if self._connection_gone:
            waiter.callback(None)
        else:
            self._lost_waiters.append(waiter)
        return waiter


class DemoSite(Site):
    """The backend's HTTP factory: L{DemoChannel}s over a L{DemoResource}, no form parsing."""

    protocol = DemoChannel  # type: ignore[assignment]
    noisy = False

    def __init__(self, resource: DemoResource, stats: BackendStats) -> None:
        try:
            super().__init__(resource, parsePOSTFormSubmission=False)
        except TypeError:
            super().__init__(resource)
        self.stats = stats


class GarbageProtocol(Protocol):
    """Answers any connection with non-HTTP bytes, then closes it."""

    transport: ITCPTransport

    def connectionMade(self) -> None:
        self.transport.write(GARBAGE)
        self.transport.loseConnection()


def build_factory(
    options: BackendOptions,
    clock: IReactorTime,
    stats: BackendStats,
    exit: Callable[[int], Any],
    wallclock: Callable[[], float] = time.time,
) -> Factory[Any]:
    """The factory to listen with: a L{DemoSite}, or garbage with C{--garbage}."""
    if options.garbage:
        factory = ServerFactory.forProtocol(GarbageProtocol)
        factory.noisy = False
        return factory
    return DemoSite(DemoResource(options, clock, stats, exit, wallclock), stats)


def _hard_exit(status: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def _sleep_forever(alarm: int) -> None:
    signal.alarm(alarm)
    while True:
        time.sleep(60)


def main(argv: Optional[list[str]] = None) -> None:
    """Run the fake backend until it is stopped (or its alarm fires)."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    signal.alarm(options.alarm)
    if options.exit_at_once is not None:
        sys.stderr.write(options.exit_at_once + "\n")
        sys.stderr.flush()
        sys.exit(1)
    if options.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if options.long_line:
        sys.stdout.write("x" * (options.long_line * 1024))
        sys.stdout.flush()
    if options.fork_child:
        sys.stdout.flush()
        sys.stderr.flush()
        child = os.fork()
        if child == 0:
            try:
                _sleep_forever(options.alarm)
            finally:
                os._exit(0)
        print(f"child pid {child}", flush=True)
    if options.start_delay:
        time.sleep(options.start_delay)
    # Like a model's weights: memory held, and resident (every page written), until it exits.
    held = bytearray(b"\1" * (options.rss_mb * 1024 * 1024)) if options.rss_mb else b""

    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )
    stats = BackendStats(pid=os.getpid(), started=time.time())
    factory = build_factory(options, reactor, stats, _hard_exit)
    port = reactor.listenTCP(options.port, factory,  # type: ignore[arg-type]
                             interface=options.host)
    newline = "\n" if options.long_line else ""
    address = f"{options.host}:{cast(IPv4Address, port.getHost()).port}"
    line = f"{newline}listening on {address} pid {os.getpid()}"
    reactor.callWhenRunning(print, line, flush=True)
    reactor.run(installSignalHandlers=not options.ignore_sigterm)  # type: ignore[call-arg]
    del held


if __name__ == "__main__":
    main()
