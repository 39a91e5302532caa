"""Tests for the bundled fake OpenAI-compatible backend (llmnode.demo.backend).

The pure helpers and the resource are tested in memory with a L{Clock}; every CLI flag is then
tested against the real program, spawned in its own session on a real port.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import socket
import sys
import time
from io import BytesIO, StringIO

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool, ResponseFailed
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

import llmnode
from llmnode.demo.backend import (
    GARBAGE,
    BackendOptions,
    BackendStats,
    DemoResource,
    answer_text,
    embedding_vector,
    parse_args,
    rank,
    relevance_score,
    split_text,
)

_ROOT = os.path.dirname(llmnode.__path__[0])
_SETSID_EXEC = (
    "import os, sys; os.setsid(); "
    "os.execv(sys.executable, [sys.executable, '-m', 'llmnode.demo.backend'] + sys.argv[1:])"
)
_LISTENING = re.compile(rb"listening on [^\s:]+:(\d+) pid (\d+)\n")


class HelperTests(SynchronousTestCase):
    """The deterministic "model" behind the answers."""

    def test_embedding_is_deterministic_unit_vector(self):
        first = embedding_vector("hello world", 16)
        self.assertEqual(first, embedding_vector("hello world", 16))
        self.assertEqual(len(first), 16)
        self.assertAlmostEqual(math.sqrt(sum(v * v for v in first)), 1.0, places=9)

    def test_embedding_differs_per_text_and_honours_dim(self):
        self.assertNotEqual(embedding_vector("cat", 16), embedding_vector("dog", 16))
        long = embedding_vector("cat", 40)
        self.assertEqual(len(long), 40)
        self.assertAlmostEqual(math.sqrt(sum(v * v for v in long)), 1.0, places=9)

    def test_relevance_prefers_shared_words(self):
        query = "red fox jumps"
        self.assertGreater(
            relevance_score(query, "the red fox jumps high"),
            relevance_score(query, "a blue whale sings"),
        )
        self.assertEqual(relevance_score(query, "x"), relevance_score(query, "x"))

    def test_rank_sorts_best_first_and_honours_top_n(self):
        documents = ["nothing here", "red fox", "red fox jumps", "fox"]
        results = rank("red fox jumps", documents)
        self.assertEqual([r["index"] for r in results][:2], [2, 1])
        scores = [r["relevance_score"] for r in results]
        self.assertEqual(scores, sorted(scores, reverse=True))
        self.assertEqual(rank("red fox jumps", documents, top_n=2), results[:2])

    def test_split_text_keeps_text_and_count(self):
        for text, pieces in [("echo: hello", 3), ("ab", 5), ("", 2), ("abcdef", 1)]:
            parts = split_text(text, pieces)
            self.assertEqual(len(parts), pieces)
            self.assertEqual("".join(parts), text)
        self.assertEqual(split_text("abc", 0), [])

    def test_answer_text(self):
        self.assertEqual(answer_text("hi", None), "echo: hi")
        self.assertEqual(answer_text("y" * 500, None), "echo: " + "y" * 200)
        self.assertEqual(len(answer_text("hi", 1 << 20).encode()), 1 << 20)
        self.assertEqual(answer_text("hi", 0), "")

    def test_parse_args(self):
        options = parse_args(["--port", "1234"])
        self.assertEqual(options, BackendOptions(port=1234))
        options = parse_args(
            ["--port", "5", "--model-name", "m", "--chunks", "3", "--chunk-interval", "0.5",
             "--crash-after", "2", "--die-mid-stream", "1", "--alarm", "2.5", "--no-health"]
        )
        self.assertEqual(
            (options.model_name, options.chunks, options.chunk_interval, options.crash_after,
             options.die_mid_stream, options.alarm, options.no_health),
            ("m", 3, 0.5, 2, 1, 3, True),
        )

    def test_parse_args_rejects_bad_values(self):
        self.patch(sys, "stderr", StringIO())
        for argv in (["--port", "1", "--chunks", "-1"], ["--port", "1", "--crash-after", "0"], []):
            self.assertRaises(SystemExit, parse_args, argv)


def _request(method: bytes, path: bytes, body=None, headers=()) -> DummyRequest:
    request = DummyRequest(path.split(b"?")[0].lstrip(b"/").split(b"/"))
    request.method = method
    request.uri = path
    if body is None:
        raw = b""
    else:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    request.content = BytesIO(raw)
    for name, value in headers:
        request.requestHeaders.addRawHeader(name, value)
    return request


def _body(request: DummyRequest) -> dict:
    return json.loads(b"".join(request.written))


def _events(request: DummyRequest) -> list:
    text = b"".join(request.written).decode()
    return [block[len("data: "):] for block in text.split("\n\n") if block]


class ResourceTests(SynchronousTestCase):
    """The resource driven in memory, with a Clock for every timer."""

    def setUp(self):
        self.clock = Clock()
        self.exits = []
        self.stats = BackendStats(pid=1, started=1000.0)
        self.now = [1_700_000_000.0]

    def resource(self, **options) -> DemoResource:
        return DemoResource(
            BackendOptions(**options), self.clock, self.stats, self.exits.append,
            wallclock=lambda: self.now[0],
        )

    def render(self, resource, request) -> DummyRequest:
        self.assertIs(resource.render(request), NOT_DONE_YET)
        return request

    def test_chat_answer_echoes_request(self):
        body = {"model": "m1", "messages": [{"role": "user", "content": "hi there"}]}
        raw = json.dumps(body).encode()
        request = self.render(
            self.resource(),
            _request(b"POST", b"/v1/chat/completions?a=1", raw, [(b"X-Thing", b"yes")]),
        )
        answer = _body(request)
        self.assertEqual(request.finished, 1)
        self.assertEqual(answer["model"], "m1")
        self.assertEqual(answer["choices"][0]["message"]["content"], "echo: hi there")
        self.assertEqual(answer["llmnode_echo"]["body_sha256"], hashlib.sha256(raw).hexdigest())
        self.assertEqual(answer["llmnode_echo"]["query"], "a=1")
        self.assertEqual(answer["llmnode_echo"]["headers"], {"x-thing": "yes"})
        self.assertEqual(self.stats.requests, 1)

    def test_stream_stops_when_client_leaves(self):
        request = self.render(
            self.resource(),
            _request(b"POST", b"/v1/chat/completions", {"stream": True, "chunks": 5,
                                                       "chunk_interval": 1.0}),
        )
        self.assertEqual(len(_events(request)), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(_events(request)), 2)
        self.now[0] = 1_700_000_005.0
        request.processingFailed(Failure(ConnectionError("client gone")))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(len(_events(request)), 2)
        self.assertEqual(self.stats.disconnects, [1_700_000_005.0])
        self.assertEqual(self.stats.requests, 0)

    def test_stream_paces_chunks_then_done(self):
        request = self.render(
            self.resource(chunks=3, chunk_interval=0.5),
            _request(b"POST", b"/v1/completions", {"prompt": "abc", "stream": True}),
        )
        self.assertEqual(len(_events(request)), 1)
        self.clock.advance(0.5)
        self.clock.advance(0.5)
        events = _events(request)
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertEqual([c["index"] for c in chunks], [0, 1, 2])
        self.assertEqual("".join(c["choices"][0]["text"] for c in chunks), "echo: abc")
        self.assertIn("llmnode_echo", chunks[0])
        self.assertNotIn("llmnode_echo", chunks[1])
        self.assertEqual(request.finished, 1)

    def test_stream_ends_with_a_usage_chunk_when_asked(self):
        """C{stream_options.include_usage}: a last chunk with no choices and the token counts,
        before C{[DONE]}, as OpenAI and llama.cpp send it; without it, no such chunk."""
        body = {"messages": [{"role": "user", "content": "count these words"}], "stream": True,
                "chunks": 2, "stream_options": {"include_usage": True}}
        request = self.render(self.resource(chunk_interval=0.5),
                              _request(b"POST", b"/v1/chat/completions", body))
        self.clock.advance(0.5)
        events = _events(request)
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertEqual([len(c["choices"]) for c in chunks], [1, 1, 0])
        usage = chunks[-1]["usage"]
        self.assertEqual(usage["prompt_tokens"], 3)
        self.assertGreater(usage["completion_tokens"], 0)
        self.assertEqual(usage["total_tokens"],
                         usage["prompt_tokens"] + usage["completion_tokens"])
        self.assertEqual(chunks[-1]["id"], chunks[0]["id"])
        del body["stream_options"]
        request = self.render(self.resource(chunk_interval=0.5),
                              _request(b"POST", b"/v1/chat/completions", body))
        self.clock.advance(0.5)
        self.assertEqual([len(json.loads(e)["choices"]) for e in _events(request)[:-1]], [1, 1])

    def test_slow_headers_wait_on_the_clock(self):
        request = self.render(self.resource(slow_headers=2.0), _request(b"GET", b"/health"))
        self.clock.advance(1.9)
        self.assertEqual(request.written, [])
        self.clock.advance(0.1)
        self.assertEqual(_body(request), {"status": "ok"})

    def test_health_delay(self):
        resource = self.resource(health_delay=3.0)
        early = self.render(resource, _request(b"GET", b"/health"))
        self.assertEqual(early.responseCode, 503)
        self.clock.advance(3.0)
        late = self.render(resource, _request(b"GET", b"/health"))
        self.assertEqual(late.responseCode, 200)

    def test_crash_after_counts_v1_answers_only(self):
        resource = self.resource(crash_after=2)
        self.render(resource, _request(b"GET", b"/health"))
        self.render(resource, _request(b"GET", b"/v1/models"))
        self.assertEqual(self.exits, [])
        self.render(resource, _request(b"POST", b"/v1/embeddings", {"input": "x"}))
        self.assertEqual(self.exits, [3])

    def test_die_mid_stream(self):
        request = self.render(
            self.resource(die_mid_stream=2, chunk_interval=0.1),
            _request(b"POST", b"/v1/chat/completions", {"stream": True}),
        )
        self.clock.advance(0.1)
        self.assertEqual(self.exits, [4])
        self.clock.advance(5)
        self.assertEqual(len(_events(request)), 2)
        self.assertFalse(request.finished)

    def test_bad_json_and_bad_fields(self):
        resource = self.resource()
        for body, param in [(b"{nope", None), (b"[1]", None),
                            ({"stream": True, "chunks": "many"}, "chunks")]:
            request = self.render(resource, _request(b"POST", b"/v1/chat/completions", body))
            self.assertEqual(request.responseCode, 400)
            error = _body(request)["error"]
            self.assertEqual(set(error), {"message", "type", "param", "code"})
            self.assertEqual(error["param"], param)

    def test_unknown_path_and_wrong_method(self):
        resource = self.resource()
        self.assertEqual(self.render(resource, _request(b"GET", b"/v1/nothing")).responseCode, 404)
        self.assertEqual(
            self.render(resource, _request(b"GET", b"/v1/chat/completions")).responseCode, 405
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BackendProcess(ProcessProtocol):
    """The backend program as a child process: its output, and when it listens and ends."""

    def __init__(self):
        self.out = bytearray()
        self.err = bytearray()
        self.listening: Deferred = Deferred()
        self.exited: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self.pid = None

    def outReceived(self, data):
        self.out += data
        if not self.listening.called:
            match = _LISTENING.search(self.out)
            if match:
                self.listening.callback(int(match.group(1)))

    def errReceived(self, data):
        self.err += data

    def processExited(self, reason):
        self.exited.callback(reason.value)

    def processEnded(self, reason):
        if not self.listening.called:
            tail = bytes(self.err[-500:])
            self.listening.errback(RuntimeError(f"ended before listening: {tail!r}"))
        self.ended.callback(reason.value)

    def status(self, reason) -> tuple:
        """C{(exit code, signal)} of a processExited/processEnded reason."""
        if isinstance(reason, ProcessDone):
            return (0, None)
        assert isinstance(reason, ProcessTerminated), reason
        return (reason.exitCode, reason.signal)


class IntegrationTests(TestCase):
    """The real program on a real port."""

    timeout = 30

    def setUp(self):
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    def spawn(self, *flags: str) -> BackendProcess:
        process = BackendProcess()
        env = {"PYTHONPATH": _ROOT, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        transport = reactor.spawnProcess(
            process, sys.executable, [sys.executable, "-c", _SETSID_EXEC, *flags], env=env
        )
        process.pid = transport.pid
        self.addCleanup(self._reap, process)
        return process

    async def _reap(self, process: BackendProcess) -> None:
        if not process.ended.called:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await process.ended.addTimeout(10, reactor)

    async def start(self, *flags: str) -> tuple[BackendProcess, str]:
        """Spawn the backend on a free port, retrying if another process took it first."""
        for attempt in range(3):
            port = _free_port()
            process = self.spawn("--port", str(port), "--alarm", "60", *flags)
            try:
                listening = await process.listening.addTimeout(15, reactor)
            except RuntimeError:
                if b"Address already in use" in process.err and attempt < 2:
                    continue
                raise
            self.assertEqual(listening, port)
            return process, f"http://127.0.0.1:{port}"
        raise AssertionError("unreachable")

    async def get(self, url: str, **kwargs):
        response = await treq.get(url, pool=self.pool, **kwargs)
        return response.code, await response.json()

    async def post(self, url: str, body, **kwargs):
        response = await treq.post(url, json=body, pool=self.pool, **kwargs)
        return response.code, await response.json()

    async def wait_until(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not await predicate():
            self.assertLess(time.monotonic(), deadline, "condition not reached in time")
            await deferLater(reactor, 0.05, lambda: None)

    async def read_stream(self, url: str, body: dict) -> tuple[list, Failure | None]:
        """POST a streaming request; C{[(arrival, event text)], failure or None}."""
        response = await treq.post(url, json=body, pool=self.pool, unbuffered=True)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        events, pending = [], bytearray()

        def received(data):
            pending.extend(data)
            while b"\n\n" in pending:
                block, _, rest = bytes(pending).partition(b"\n\n")
                pending[:] = rest
                self.assertTrue(block.startswith(b"data: "), block)
                events.append((time.monotonic(), block[len(b"data: "):].decode()))

        try:
            await treq.collect(response, received)
        except ResponseFailed as error:
            return events, Failure(error)
        return events, None

    async def test_chat_completions_and_models(self):
        process, url = await self.start("--model-name", "tiny")
        self.assertEqual(await self.get(url + "/health"), (200, {"status": "ok"}))
        code, models = await self.get(url + "/v1/models")
        self.assertEqual((code, [m["id"] for m in models["data"]]), (200, ["tiny"]))
        code, chat = await self.post(
            url + "/v1/chat/completions",
            {"model": "asked", "messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "ping " * 100}]},
        )
        self.assertEqual(code, 200)
        self.assertEqual(chat["object"], "chat.completion")
        self.assertEqual(chat["model"], "asked")
        message = chat["choices"][0]["message"]
        self.assertEqual(message["role"], "assistant")
        self.assertEqual(message["content"], "echo: " + ("ping " * 100)[:200])
        self.assertEqual(chat["choices"][0]["finish_reason"], "stop")
        self.assertGreater(chat["usage"]["total_tokens"], 0)
        code, completion = await self.post(url + "/v1/completions", {"prompt": "once upon"})
        self.assertEqual(completion["object"], "text_completion")
        self.assertEqual(completion["choices"][0]["text"], "echo: once upon")
        self.assertEqual(completion["model"], "tiny")

    async def test_echo_fields_and_large_answer(self):
        process, url = await self.start()
        raw = json.dumps({"model": "m", "prompt": "hey", "echo_bytes": 1 << 20}).encode()
        response = await treq.post(
            url + "/v1/completions?alpha=1&beta=two", data=raw, pool=self.pool,
            headers={"X-Custom": "abc", "Content-Type": "application/json"},
        )
        answer = await response.json()
        self.assertEqual(len(answer["choices"][0]["text"].encode()), 1 << 20)
        echo = answer["llmnode_echo"]
        self.assertEqual(echo["path"], "/v1/completions")
        self.assertEqual(echo["query"], "alpha=1&beta=two")
        self.assertEqual(echo["body_bytes"], len(raw))
        self.assertEqual(echo["body_sha256"], hashlib.sha256(raw).hexdigest())
        self.assertEqual(echo["model"], "m")
        self.assertEqual(echo["headers"]["x-custom"], "abc")
        self.assertEqual(echo["headers"]["content-type"], "application/json")
        response = await treq.post(url + "/v1/chat/completions", data=b"{not json",
                                   pool=self.pool)
        self.assertEqual(response.code, 400)
        error = (await response.json())["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertIn("JSON", error["message"])

    async def test_embeddings_and_rerank(self):
        process, url = await self.start("--embedding-dim", "8")
        code, first = await self.post(url + "/v1/embeddings", {"input": ["alpha", "beta"]})
        self.assertEqual(code, 200)
        self.assertEqual([d["index"] for d in first["data"]], [0, 1])
        vectors = [d["embedding"] for d in first["data"]]
        self.assertEqual([len(v) for v in vectors], [8, 8])
        self.assertNotEqual(vectors[0], vectors[1])
        code, again = await self.post(url + "/v1/embeddings", {"input": "beta"})
        self.assertEqual(again["data"][0]["embedding"], vectors[1])

        documents = ["weather report", "the cat sat on the mat", "a cat", "dogs bark"]
        for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
            code, ranked = await self.post(
                url + path, {"query": "cat on mat", "documents": documents, "top_n": 3}
            )
            self.assertEqual(code, 200)
            results = ranked["results"]
            self.assertEqual(len(results), 3)
            self.assertEqual([r["index"] for r in results[:2]], [1, 2])
            scores = [r["relevance_score"] for r in results]
            self.assertEqual(scores, sorted(scores, reverse=True))

    async def test_stream_chunk_count_and_spacing(self):
        process, url = await self.start()
        started = time.monotonic()
        events, failure = await self.read_stream(
            url + "/v1/chat/completions",
            {"model": "m", "stream": True, "chunks": 50, "chunk_interval": 0.02,
             "messages": [{"role": "user", "content": "stream me"}]},
        )
        self.assertIsNone(failure)
        self.assertEqual(events[-1][1], "[DONE]")
        chunks = [json.loads(text) for _, text in events[:-1]]
        self.assertEqual([c["index"] for c in chunks], list(range(50)))
        self.assertEqual({c["object"] for c in chunks}, {"chat.completion.chunk"})
        self.assertEqual("".join(c["choices"][0]["delta"]["content"] for c in chunks),
                         "echo: stream me")
        self.assertIn("llmnode_echo", chunks[0])
        self.assertFalse(any("llmnode_echo" in c for c in chunks[1:]))
        sent = [c["llmnode_sent"] for c in chunks]
        self.assertGreater(sent[-1] - sent[0], 0.9)
        self.assertLess(sent[-1] - sent[0], 10)
        arrivals = [at for at, _ in events]
        self.assertLess(arrivals[0] - started, 5)
        self.assertGreater(arrivals[-1] - arrivals[0], 0.8)
        distinct = len({round(at, 3) for at in arrivals})
        self.assertGreater(distinct, 25, "chunks arrived coalesced")

    async def test_completions_stream_default_shape(self):
        process, url = await self.start("--chunks", "4", "--chunk-interval", "0.01")
        events, failure = await self.read_stream(
            url + "/v1/completions", {"prompt": "hi", "stream": True}
        )
        self.assertIsNone(failure)
        self.assertEqual(len(events), 5)
        self.assertEqual(events[-1][1], "[DONE]")
        last = json.loads(events[-2][1])
        self.assertEqual((last["object"], last["choices"][0]["finish_reason"]),
                         ("text_completion", "stop"))
        code, stats = await self.get(url + "/debug/stats")
        self.assertEqual(stats["requests"], 1)
        self.assertEqual(stats["pid"], process.pid)

    async def test_client_disconnect_is_recorded(self):
        process, url = await self.start()
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"stream": True, "chunks": 200, "chunk_interval": 0.05,
                           "messages": [{"role": "user", "content": "x"}]}).encode()
        first_chunk, lost = Deferred(), Deferred()

        class Client(Protocol):
            def connectionMade(self):
                self.transport.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )

            def dataReceived(self, data):
                if b"data: " in data and not first_chunk.called:
                    first_chunk.callback(None)

            def connectionLost(self, reason):
                lost.callback(None)

        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(Client)
        )
        await first_chunk.addTimeout(10, reactor)
        left = time.time()
        client.transport.abortConnection()
        await lost

        async def recorded():
            code, stats = await self.get(url + "/debug/stats")
            return len(stats["disconnects"]) == 1 and stats["open_connections"] == 1

        await self.wait_until(recorded)
        code, stats = await self.get(url + "/debug/stats")
        self.assertLess(abs(stats["disconnects"][0] - left), 5)
        self.assertEqual(stats["requests"], 0)

    async def test_crash_after(self):
        process, url = await self.start("--crash-after", "2")
        self.assertEqual((await self.get(url + "/health"))[0], 200)
        self.assertEqual((await self.get(url + "/v1/models"))[0], 200)
        self.assertFalse(process.exited.called)
        code, answer = await self.post(url + "/v1/completions", {"prompt": "last words"})
        self.assertEqual(answer["choices"][0]["text"], "echo: last words")
        reason = await process.ended.addTimeout(10, reactor)
        self.assertEqual(process.status(reason), (3, None))

    async def test_die_mid_stream(self):
        process, url = await self.start("--die-mid-stream", "3", "--chunk-interval", "0.01")
        events, failure = await self.read_stream(
            url + "/v1/chat/completions",
            {"stream": True, "messages": [{"role": "user", "content": "x"}]},
        )
        self.assertIsNotNone(failure)
        self.assertEqual([json.loads(text)["index"] for _, text in events], [0, 1, 2])
        reason = await process.ended.addTimeout(10, reactor)
        self.assertEqual(process.status(reason), (4, None))

    async def test_start_delay(self):
        started = time.monotonic()
        process, url = await self.start("--start-delay", "1")
        self.assertGreaterEqual(time.monotonic() - started, 1.0)
        self.assertEqual((await self.get(url + "/health"))[0], 200)

    async def test_health_delay(self):
        process, url = await self.start("--health-delay", "1")
        first = time.monotonic()
        self.assertEqual(await self.get(url + "/health"), (503, {"status": "loading"}))
        self.assertEqual((await self.get(url + "/v1/models"))[0], 200)

        async def healthy():
            return (await self.get(url + "/health"))[0] == 200

        await self.wait_until(healthy)
        self.assertGreater(time.monotonic() - first, 0.5)

    async def test_no_health(self):
        process, url = await self.start("--no-health")
        code, answer = await self.get(url + "/health")
        self.assertEqual(code, 404)
        self.assertIn("error", answer)
        self.assertEqual((await self.get(url + "/v1/models"))[0], 200)

    async def test_sigterm_stops_by_default(self):
        process, url = await self.start()
        os.kill(process.pid, signal.SIGTERM)
        reason = await process.ended.addTimeout(10, reactor)
        self.assertEqual(process.status(reason), (0, None))

    async def test_ignore_sigterm(self):
        process, url = await self.start("--ignore-sigterm")
        os.kill(process.pid, signal.SIGTERM)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual((await self.get(url + "/health"))[0], 200)
        self.assertFalse(process.exited.called)

    async def test_fork_child_stays_in_group(self):
        process, url = await self.start("--fork-child")
        match = re.search(rb"child pid (\d+)\n", process.out)
        self.assertIsNotNone(match, process.out)
        child = int(match.group(1))
        self.assertNotEqual(child, process.pid)
        self.assertEqual(os.getpgid(child), os.getpgid(process.pid))
        self.assertEqual(os.getpgid(process.pid), process.pid)
        os.kill(process.pid, signal.SIGKILL)
        reason = await process.exited.addTimeout(10, reactor)
        self.assertEqual(process.status(reason), (None, signal.SIGKILL))
        os.kill(child, 0)
        self.assertFalse(process.ended.called, "the child should still hold the pipes")

    async def test_exit_at_once(self):
        process = self.spawn("--port", str(_free_port()), "--exit-at-once", "no GPU found")
        reason = await process.ended.addTimeout(10, reactor)
        self.assertEqual(process.status(reason), (1, None))
        self.assertEqual(bytes(process.err), b"no GPU found\n")
        self.assertNotIn(b"listening", process.out)
        self.assertFailure(process.listening, RuntimeError)
        await process.listening

    async def test_long_line(self):
        process, url = await self.start("--long-line", "64")
        self.assertEqual(len(re.match(rb"x*", process.out).group()), 64 * 1024)
        self.assertEqual(process.out[64 * 1024:64 * 1024 + 14], b"\nlistening on ")
        self.assertEqual((await self.get(url + "/health"))[0], 200)

    async def test_garbage(self):
        process, url = await self.start("--garbage")
        port = int(url.rsplit(":", 1)[1])
        received, closed = bytearray(), Deferred()

        class Reader(Protocol):
            def dataReceived(self, data):
                received.extend(data)

            def connectionLost(self, reason):
                closed.callback(None)

        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(Reader))
        await closed.addTimeout(10, reactor)
        self.assertEqual(bytes(received), GARBAGE)
        with self.assertRaises(Exception):
            await treq.get(url + "/health", pool=self.pool)

    async def test_slow_headers(self):
        process, url = await self.start("--slow-headers", "0.5")
        started = time.monotonic()
        response = await treq.get(url + "/health", pool=self.pool)
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertEqual(response.code, 200)
        await response.content()
