"""The /v1 proxy: routing, on-demand start, forwarding, OpenAI-shaped errors.

A real Site on 127.0.0.1:0 in front of a fake node; the backend is the bundled demo backend
(a real process) or, for precise failure shapes, a small in-process server.
"""

from __future__ import annotations

import hashlib
import json
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from io import BytesIO

from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llmnode.config import Program
from llmnode.errors import BadGateway, BodyTooLarge, Unavailable
from llmnode.web import proxy
from llmnode.web.body import read_body
from llmnode.web.responses import PendingResponse, render_error
from llmnode.web.routing import full_routing
from tests.support.demo import spawn_demo
from tests.support.fake_node import FakeRuntime, model
from tests.support.net import (
    free_port, http_client, http_request, listen, parse_response, raw_connect)
from tests.support.proxy import serve_proxy

CHAT = "/v1/chat/completions"


def chat_body(model_name="chat-model", text="hello", **extra) -> dict:
    return dict({"model": model_name, "messages": [{"role": "user", "content": text}]}, **extra)


class ProxyCase(TestCase):
    """Shared fixture: a client, and helpers to post through the proxy."""

    timeout = 60

    def setUp(self):
        self.client = http_client(self)

    def demo(self, *args):
        """A runtime start that spawns the demo backend with C{args}."""
        def start():
            return spawn_demo(self, *args).ready
        return start

    async def post(self, port, path, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self.client.post(
            f"http://127.0.0.1:{port}{path}", data=data,
            headers=headers or {"Content-Type": "application/json"})
        return response, await response.content()

    async def post_json(self, port, path, body, headers=None):
        response, content = await self.post(port, path, body, headers)
        return response, json.loads(content)

    def assertOpenAIError(self, response, payload, status, code=None):
        self.assertEqual(response.code, status)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(set(payload), {"error"})
        self.assertEqual(set(payload["error"]), {"message", "type", "param", "code"})
        self.assertIsInstance(payload["error"]["message"], str)
        if code is not None:
            self.assertEqual(payload["error"]["code"], code)


class ForwardingTests(ProxyCase):
    """Requests reach the demo backend as sent, and answers come back whole."""

    async def test_cold_start_is_shared_by_200_concurrent_requests(self):
        runtime = FakeRuntime(model("chat-model"), self.demo())
        port = serve_proxy(self, [runtime])
        results = await gatherResults([
            Deferred.fromCoroutine(self.post_json(port, CHAT, chat_body(text=f"n{i}")))
            for i in range(200)])
        self.assertEqual(runtime.spawns, 1)
        self.assertEqual([r.code for r, _ in results], [200] * 200)
        self.assertEqual(results[7][1]["choices"][0]["message"]["content"], "echo: n7")
        await runtime.when_idle()
        self.assertEqual((runtime.started, runtime.finished), (200, 200))

    async def test_large_bodies_pass_intact(self):
        runtime = FakeRuntime(model("chat-model"), self.demo())
        port = serve_proxy(self, [runtime])
        big = json.dumps(chat_body(text="x" * (3 * 1024 * 1024 // 2))).encode()
        response, payload = await self.post_json(port, CHAT, big)
        self.assertEqual(response.code, 200)
        echo = payload["llmnode_echo"]
        self.assertEqual((echo["body_bytes"], echo["body_sha256"]),
                         (len(big), hashlib.sha256(big).hexdigest()))
        size = 2 * 1024 * 1024
        response, payload = await self.post_json(port, CHAT, chat_body(echo_bytes=size))
        self.assertEqual(response.code, 200)
        self.assertEqual(len(payload["choices"][0]["message"]["content"]), size)

    async def test_body_query_and_headers_forwarded(self):
        runtime = FakeRuntime(model("chat-model", aliases=("gpt-x",)), self.demo())
        port = serve_proxy(self, [runtime])
        body = b'{"model":  "gpt-x", "messages": [{"role": "user", "content": "hi"}]}'
        client = await raw_connect(self, port)
        client.transport.write(http_request("POST", CHAT + "?api-version=2&q=a%20b", body, {
            "Connection": "X-Hop, close",
            "X-Hop": "private",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Upgrade": "websocket",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Authorization": "Bearer sk-test",
            "X-Custom": "kept",
            "Content-Type": "application/json",
        }))
        await client.lost
        status, headers, content, complete = parse_response(client.data)
        self.assertEqual((status, complete), (200, True))
        echo = json.loads(content)["llmnode_echo"]
        self.assertEqual(echo["query"], "api-version=2&q=a%20b")
        self.assertEqual(echo["body_sha256"], hashlib.sha256(body).hexdigest())
        self.assertEqual(echo["model"], "gpt-x")
        seen = echo["headers"]
        for dropped in ("x-hop", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization"):
            self.assertNotIn(dropped, seen)
        self.assertNotIn("x-hop", seen.get("connection", "").lower())
        self.assertEqual(seen["x-custom"], "kept")
        self.assertEqual(seen["authorization"], "Bearer sk-test")
        self.assertEqual(seen["content-length"], str(len(body)))
        self.assertNotEqual(seen["host"], "127.0.0.1")
        self.assertNotIn("transfer-encoding", headers)

    async def test_upstream_model_rewrites_only_the_model(self):
        runtime = FakeRuntime(
            model("chat-model", aliases=("friendly",), upstream_model="org/real-name"),
            self.demo())
        port = serve_proxy(self, [runtime])
        response, payload = await self.post_json(
            port, CHAT, chat_body("friendly", text="keep me", temperature=0.25))
        self.assertEqual(response.code, 200)
        self.assertEqual(payload["llmnode_echo"]["model"], "org/real-name")
        self.assertEqual(payload["choices"][0]["message"]["content"], "echo: keep me")

    async def test_large_bodies_are_routed_and_rewritten_whatever_their_member_order(self):
        runtime = FakeRuntime(
            model("chat-model", aliases=("friendly",), upstream_model="org/real-name"),
            self.demo())
        port = serve_proxy(self, [runtime])
        messages = [{"role": "user", "content": "hi"}] * 20000
        for document in (chat_body("friendly", max_tokens=5),
                         {"messages": messages, "model": "friendly", "tools": messages}):
            document["messages"] = messages
            big = json.dumps(document).encode()
            response, payload = await self.post_json(port, CHAT, big)
            self.assertEqual(response.code, 200, list(document))
            echo = payload["llmnode_echo"]
            self.assertEqual(echo["model"], "org/real-name")
            expected = json.dumps(dict(document, model="org/real-name")).encode()
            self.assertEqual((echo["body_bytes"], echo["body_sha256"]),
                             (len(expected), hashlib.sha256(expected).hexdigest()))

    async def test_other_requests_are_answered_while_a_large_body_is_read(self):
        release = threading.Event()
        self.addCleanup(release.set)

        def held_full_routing(body):
            release.wait(30)
            return full_routing(body)

        self.patch(proxy, "full_routing", held_full_routing)
        port = serve_proxy(self, [FakeRuntime(model("chat-model"), self.demo())])
        messages = [{"role": "user", "content": "hi"}] * 20000
        big = json.dumps({"messages": messages, "model": "chat-model", "tools": messages})
        reading = Deferred.fromCoroutine(self.post_json(port, CHAT, big.encode()))
        response, _ = await self.post_json(port, CHAT, chat_body())
        self.assertEqual(response.code, 200)
        self.assertFalse(reading.called)
        release.set()
        response, payload = await reading
        self.assertEqual(response.code, 200, payload)

    async def test_a_large_body_read_in_a_thread_still_gets_its_errors(self):
        port = serve_proxy(self, [FakeRuntime(model("chat-model"), self.demo())])
        messages = [{"role": "user", "content": "hi"}] * 20000
        for document, status in (({"messages": messages, "model": "nope", "tools": messages},
                                   404),
                                  ({"messages": messages, "model": 7, "tools": messages}, 400)):
            response, payload = await self.post_json(port, CHAT, json.dumps(document).encode())
            self.assertOpenAIError(response, payload, status)

    async def test_streams_are_marked_unbuffered(self):
        runtime = FakeRuntime(model("chat-model"), self.demo())
        port = serve_proxy(self, [runtime])
        response, content = await self.post(port, CHAT, chat_body(stream=True, chunks=4))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        events = [line for line in content.split(b"\n\n") if line.startswith(b"data: ")]
        self.assertEqual(len(events), 5)
        self.assertEqual(events[-1], b"data: [DONE]")
        response, _ = await self.post(port, CHAT, chat_body())
        self.assertIsNone(response.headers.getRawHeaders(b"x-accel-buffering"))

    async def test_usage_chunk_of_a_stream_reaches_the_client(self):
        """The backend's final usage chunk (C{stream_options.include_usage}) is relayed as is,
        before C{[DONE]}."""
        runtime = FakeRuntime(model("chat-model"), self.demo())
        port = serve_proxy(self, [runtime])
        response, content = await self.post(port, CHAT, chat_body(
            stream=True, chunks=3, stream_options={"include_usage": True}))
        self.assertEqual(response.code, 200)
        events = [line[len(b"data: "):] for line in content.split(b"\n\n")
                  if line.startswith(b"data: ")]
        self.assertEqual(events[-1], b"[DONE]")
        last = json.loads(events[-2])
        self.assertEqual(last["choices"], [])
        self.assertEqual(last["usage"]["total_tokens"],
                         last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"])

    async def test_endpoints_by_mode_and_path(self):
        embed = FakeRuntime(model("embedder", mode="Embedding"), self.demo())
        rerank = FakeRuntime(model("ranker", mode="Reranker"), self.demo())
        base = FakeRuntime(model("base", mode="Base"), self.demo())
        port = serve_proxy(self, [embed, rerank, base])
        response, payload = await self.post_json(
            port, "/v1/embeddings", {"model": "embedder", "input": "a"})
        self.assertEqual((response.code, payload["object"]), (200, "list"))
        query = {"model": "ranker", "query": "cat", "documents": ["a cat", "dog"]}
        for path in ("/v1/rerank", "/v1/reranking", "/rerank"):
            response, payload = await self.post_json(port, path, query)
            self.assertEqual(response.code, 200, path)
            self.assertEqual(payload["llmnode_echo"]["path"], path)
            self.assertEqual(payload["results"][0]["index"], 0)
        response, payload = await self.post_json(
            port, "/v1/completions", {"model": "base", "prompt": "p"})
        self.assertEqual(payload["choices"][0]["text"], "echo: p")
        response, payload = await self.post_json(port, CHAT, chat_body("base"))
        self.assertOpenAIError(response, payload, 400)
        self.assertIn("'Base'", payload["error"]["message"])

    async def test_backend_dying_mid_stream_cuts_the_client(self):
        runtime = FakeRuntime(model("chat-model"), self.demo("--die-mid-stream", "3"))
        port = serve_proxy(self, [runtime])
        body = json.dumps(chat_body(stream=True, chunks=10)).encode()
        client = await raw_connect(self, port)
        client.transport.write(http_request("POST", CHAT, body))
        await client.lost
        status, headers, content, complete = parse_response(client.data)
        self.assertEqual(status, 200)
        self.assertEqual(headers["transfer-encoding"], ["chunked"])
        self.assertFalse(complete)
        self.assertEqual(content.count(b"data: "), 3)
        await runtime.when_idle()


class StartTests(ProxyCase):
    """On-demand start as seen by waiting clients."""

    async def test_waiter_that_leaves_does_not_cancel_the_start(self):
        starting: Deferred = Deferred()
        backend = spawn_demo(self)
        runtime = FakeRuntime(model("chat-model"), lambda: starting)
        port = serve_proxy(self, [runtime])
        leaver = await raw_connect(self, port)
        leaver.transport.write(http_request("POST", CHAT, json.dumps(chat_body()).encode()))
        stayer = Deferred.fromCoroutine(self.post_json(port, CHAT, chat_body(text="stay")))
        while runtime.started < 2:
            await _tick()
        leaver.transport.abortConnection()
        await leaver.lost
        while runtime.in_flight > 1:
            await _tick()
        self.assertEqual(runtime.state, "starting")
        self.assertFalse(stayer.called)
        starting.callback(await backend.ready)
        response, payload = await stayer
        self.assertEqual(response.code, 200)
        self.assertEqual(payload["choices"][0]["message"]["content"], "echo: stay")
        self.assertEqual(runtime.spawns, 1)
        await runtime.when_idle()
        self.assertEqual((runtime.started, runtime.finished), (2, 2))

    async def test_start_failure_reaches_every_waiter_with_retry_after(self):
        starting: Deferred = Deferred()
        runtime = FakeRuntime(model("chat-model"), lambda: starting)
        port = serve_proxy(self, [runtime])
        waiters = [Deferred.fromCoroutine(self.post_json(port, CHAT, chat_body()))
                   for _ in range(3)]
        while runtime.started < 3:
            await _tick()
        starting.errback(Unavailable("not enough memory on gpu0", retry_after=7.2))
        for response, payload in await gatherResults(waiters):
            self.assertOpenAIError(response, payload, 503, "model_unavailable")
            self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"8"])
            self.assertIn("gpu0", payload["error"]["message"])
        self.assertEqual(runtime.spawns, 1)
        self.assertEqual(runtime.in_flight, 0)


class ErrorTests(ProxyCase):
    """Every refusal is an OpenAI-shaped error, and none leaks an in-flight count."""

    def setUp(self):
        super().setUp()
        self.runtime = FakeRuntime(model("chat-model", aliases=("alias",)), self._backend)
        self.embedder = FakeRuntime(model("embedder", mode="Embedding"), self._backend)

    def _backend(self):
        _, port = listen(self, _Silent())
        return ("127.0.0.1", port)

    async def check(self, port, body, status, code=None, path=CHAT, runtime=None):
        response, payload = await self.post_json(port, path, body)
        self.assertOpenAIError(response, payload, status, code)
        self.assertEqual(self.runtime.in_flight, 0)
        return payload

    async def test_bad_bodies(self):
        port = serve_proxy(self, [self.runtime, self.embedder])
        payload = await self.check(port, b"{not json", 400)
        self.assertEqual(payload["error"]["type"], "invalid_request_error")
        await self.check(port, b"[1, 2]", 400)
        await self.check(port, b"\xff\xfe", 400)
        payload = await self.check(port, {"messages": []}, 400)
        self.assertEqual(payload["error"]["param"], "model")
        payload = await self.check(port, {"model": 42}, 400)
        self.assertEqual(payload["error"]["param"], "model")
        payload = await self.check(port, chat_body("nope"), 404, "model_not_found")
        self.assertIn("nope", payload["error"]["message"])
        payload = await self.check(port, chat_body("embedder"), 400)
        self.assertIn("'Embedding'", payload["error"]["message"])
        await self.check(port, {"model": "alias", "input": "x"}, 400, path="/v1/embeddings")
        self.assertEqual((self.runtime.spawns, self.embedder.spawns), (0, 0))

    async def test_a_body_nested_20000_deep_is_a_400(self):
        port = serve_proxy(self, [self.runtime])
        deep = b"[" * 20000 + b"]" * 20000
        for body in (b'{"model": "chat-model", "x": ' + deep + b"}", deep):
            payload = await self.check(port, body, 400)
            self.assertIn("nested too deeply", payload["error"]["message"])
        self.assertEqual(self.runtime.spawns, 0)

    async def test_wrong_method_and_unknown_path(self):
        port = serve_proxy(self, [self.runtime])
        response = await self.client.get(f"http://127.0.0.1:{port}{CHAT}")
        self.assertOpenAIError(response, await response.json(), 405, "method_not_allowed")
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])
        for path in ("/v1/nothing", "/v1/chat/completions/extra", "/v1/chat", "/v1"):
            response = await self.client.post(f"http://127.0.0.1:{port}{path}", data=b"{}")
            self.assertOpenAIError(response, await response.json(), 404)

    async def test_body_over_limit(self):
        port = serve_proxy(self, [self.runtime], Program(max_body_mb=0.01))
        body = json.dumps(chat_body(text="y" * 20000)).encode()
        payload = await self.check(port, body, 413, "request_too_large")
        self.assertIn("limit", payload["error"]["message"])
        client = await raw_connect(self, port)
        client.transport.write(http_request("POST", CHAT, body, {"Connection": "close"},
                                            chunked=True))
        await client.lost
        status, _, content, _ = parse_response(client.data)
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(content)["error"]["code"], "request_too_large")
        self.assertEqual(self.runtime.spawns, 0)

    async def test_backend_refused(self):
        runtime = FakeRuntime(model("chat-model"), lambda: ("127.0.0.1", free_port()))
        port = serve_proxy(self, [runtime])
        response, payload = await self.post_json(port, CHAT, chat_body())
        self.assertOpenAIError(response, payload, 502, "backend_error")
        self.assertIn("chat-model", payload["error"]["message"])
        self.assertEqual(runtime.in_flight, 0)

    async def test_request_refused_by_a_backend_that_just_died_is_sent_again(self):
        """The backend died an instant before the request and the node had not yet seen its
        exit: nothing of the request reached it, so it goes to the restarted backend."""
        runtime = FakeRuntime(model("chat-model"), self.demo())
        runtime.state, runtime._address = "running", ("127.0.0.1", free_port())
        reactor.callLater(0.1, setattr, runtime, "state", "failed")
        port = serve_proxy(self, [runtime])
        response, payload = await self.post_json(port, CHAT, chat_body(text="again"))
        self.assertEqual(response.code, 200, payload)
        self.assertIn("again", payload["choices"][0]["message"]["content"])
        self.assertEqual(runtime.spawns, 1)
        self.assertEqual(runtime.in_flight, 0)

    async def test_backend_resets_the_connection(self):
        _, backend_port = listen_raw(self, _Reset)
        runtime = FakeRuntime(model("chat-model"), lambda: ("127.0.0.1", backend_port))
        port = serve_proxy(self, [runtime])
        response, payload = await self.post_json(port, CHAT, chat_body())
        self.assertOpenAIError(response, payload, 502, "backend_error")
        self.assertEqual(runtime.in_flight, 0)

    async def test_backend_headers_too_late(self):
        silent = _Silent()
        _, backend_port = listen(self, silent)
        runtime = FakeRuntime(model("chat-model"), lambda: ("127.0.0.1", backend_port))
        port = serve_proxy(self, [runtime], Program(backend_header_timeout=0.3))
        response, payload = await self.post_json(port, CHAT, chat_body())
        self.assertOpenAIError(response, payload, 504, "backend_timeout")
        self.assertIn("0.3", payload["error"]["message"])
        await silent.lost[0]
        self.assertEqual(runtime.in_flight, 0)


class ModelsTests(ProxyCase):
    """GET /v1/models and /v1/models/{name}."""

    async def test_listing(self):
        chat = FakeRuntime(model("Qwen-14B", aliases=("qwen", "gpt-3.5-turbo")), self.demo())
        embed = FakeRuntime(model("org/embed", mode="Embedding", aliases=("e",)), self.demo())
        chat.state = "running"
        port = serve_proxy(self, [chat, embed])
        response = await self.client.get(f"http://127.0.0.1:{port}/v1/models")
        payload = await response.json()
        self.assertEqual(payload["object"], "list")
        self.assertEqual([m["id"] for m in payload["data"]],
                         ["Qwen-14B", "org/embed", "qwen", "gpt-3.5-turbo", "e"])
        first, alias = payload["data"][0], payload["data"][3]
        self.assertEqual(first["object"], "model")
        self.assertEqual(first["owned_by"], "llmnode")
        self.assertIsInstance(first["created"], int)
        chat_endpoints = ["chat", "completion", "completions", "infill", "messages",
                          "responses", "tokenize"]
        self.assertEqual(first["llmnode"], {"mode": "Chat", "state": "running",
                                            "endpoints": chat_endpoints})
        self.assertEqual(alias["llmnode"], {"mode": "Chat", "state": "running",
                                            "alias_of": "Qwen-14B",
                                            "endpoints": chat_endpoints})
        self.assertEqual(payload["data"][1]["llmnode"]["endpoints"], ["embeddings"])

        response = await self.client.get(f"http://127.0.0.1:{port}/v1/models/org/embed")
        self.assertEqual((await response.json())["llmnode"]["state"], "stopped")
        response = await self.client.get(f"http://127.0.0.1:{port}/v1/models/qwen")
        self.assertEqual((await response.json())["llmnode"]["alias_of"], "Qwen-14B")
        response = await self.client.get(f"http://127.0.0.1:{port}/v1/models/missing")
        self.assertOpenAIError(response, await response.json(), 404, "model_not_found")
        response = await self.client.post(f"http://127.0.0.1:{port}/v1/models", data=b"{}")
        self.assertOpenAIError(response, await response.json(), 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        self.assertEqual((chat.spawns, embed.spawns), (0, 0))


class CommonTests(SynchronousTestCase):
    """The helpers the web resources share."""

    def test_error_rendering(self):
        request = DummyRequest([b""])
        body = render_error(request, Unavailable("busy", retry_after=0.2))
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(json.loads(body), {"error": {
            "message": "busy", "type": "server_error", "param": None,
            "code": "model_unavailable"}})

    def test_body_limit_without_a_bounded_request(self):
        request = DummyRequest([b""])
        request.content = BytesIO(b"x" * 101)
        self.assertRaises(BodyTooLarge, read_body, request, 100)
        request.content = BytesIO(b"x" * 100)
        self.assertEqual(read_body(request, 100), b"x" * 100)
        request.requestHeaders.setRawHeaders(b"content-length", [b"5000"])
        self.assertRaises(BodyTooLarge, read_body, request, 100)

    def test_nothing_is_written_after_the_client_left(self):
        request = DummyRequest([b""])
        pending = PendingResponse(request)
        gone = []
        pending.on_gone(lambda: gone.append(True))
        request.processingFailed(Failure(ConnectionLost()))
        self.assertEqual(gone, [True])
        self.assertFalse(pending.send_error(BadGateway("late")))
        self.assertFalse(pending.finish())
        self.assertEqual(request.written, [])
        self.assertEqual(request.finished, 0)

    def test_a_response_ends_once(self):
        request = DummyRequest([b""])
        pending = PendingResponse(request)
        self.assertTrue(pending.send_json(200, {"ok": True}))
        self.assertFalse(pending.send_error(BadGateway("again")))
        self.assertEqual(request.finished, 1)
        self.assertEqual(json.loads(b"".join(request.written)), {"ok": True})


class _Silent(Resource):
    """A backend that reads requests and never answers; C{lost} fires as each one ends."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.lost: list[Deferred] = []

    def render(self, request):
        self.lost.append(request.notifyFinish().addErrback(lambda _: None))
        return NOT_DONE_YET


class _Reset(Protocol):
    """Closes every connection as soon as the request arrives."""

    def dataReceived(self, data):
        self.transport.abortConnection()


def listen_raw(testcase, protocol):
    """Listen with a bare protocol on 127.0.0.1:0 until the test ends."""
    factory = Factory.forProtocol(protocol)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port, port.getHost().port


def _tick() -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d
