"""The /v1 proxy: routing, on-demand start, forwarding, OpenAI-shaped errors.

In front of a fake node, the proxy is served by the node's server. Most tests run in memory
(L{tests.support.memory}): the demo backend is its resource on the same in-memory network,
and time is a fake clock. The tests about bytes on real sockets and threads (large bodies,
reads off the reactor thread, a backend that dies or resets its connection) use a real Site
on 127.0.0.1:0 and the bundled demo backend as a real process.
"""

from __future__ import annotations

import hashlib
import json
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from llmnode.config import Program
from llmnode.errors import BadGateway, BodyTooLarge, Unavailable
from llmnode.web import proxy
from llmnode.web.body import read_body
from llmnode.web.responses import PendingResponse, render_error
from llmnode.web.routing import full_routing
from tests.support.demo import spawn_demo
from tests.support.fake_node import FakeRuntime, model
from tests.support.memory import MemoryNet, MemoryProxy, serve_demo
from tests.support.net import (
    RawClient, http_client, http_request, parse_response, raw_connect)
from tests.support.proxy import serve_proxy
from tests.support.requests import MemoryRequest

CHAT = "/v1/chat/completions"

#: A port nothing listens on in a L{MemoryNet}.
NOBODY = 1


def chat_body(model_name="chat-model", text="hello", **extra) -> dict:
    return dict({"model": model_name, "messages": [{"role": "user", "content": text}]}, **extra)


def assert_openai_error(case, response, payload, status, code=None):
    case.assertEqual(response.code, status)
    case.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
    case.assertEqual(set(payload), {"error"})
    case.assertEqual(set(payload["error"]), {"message", "type", "param", "code"})
    case.assertIsInstance(payload["error"]["message"], str)
    if code is not None:
        case.assertEqual(payload["error"]["code"], code)


class MemoryProxyCase(SynchronousTestCase):
    """Shared fixture: the proxy on a L{MemoryNet}, helpers to post through it."""

    def setUp(self):
        self.net = MemoryNet()

    def serve(self, runtimes, program: Program = Program()) -> MemoryProxy:
        self.proxy = MemoryProxy(self, runtimes, program, net=self.net)
        return self.proxy

    def demo(self, delay: float = 0.05, **options):
        """A runtime start that serves the demo backend (with C{options}) after C{delay}
        seconds, as a process would once it listens."""
        def start():
            def serve():
                return ("127.0.0.1", serve_demo(self.net, 0, **options)[0].getHost().port)
            if not delay:
                return serve()
            started: Deferred = Deferred()
            self.net.callLater(delay, lambda: started.callback(serve()))
            return started
        return start

    def post(self, path, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.proxy.call("POST", path, data,
                               headers or {"Content-Type": "application/json"})

    def post_json(self, path, body, headers=None):
        response, content = self.post(path, body, headers)
        return response, json.loads(content)

    def send_json(self, path, body) -> Deferred:
        """Post C{body} without waiting: fires with C{(response, decoded JSON)} once the whole
        answer has arrived."""
        async def send():
            response = await self.proxy.http_client.post(
                self.proxy.url + path, data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"})
            return response, json.loads(await response.content())
        return Deferred.fromCoroutine(send())

    def assertOpenAIError(self, response, payload, status, code=None):
        assert_openai_error(self, response, payload, status, code)


class TwistedWebTests(MemoryProxyCase):
    """The proxy served by twisted.web's own server (L{TwistedSite}) and sending through
    treq's (L{TreqBackends}): the same answers as on the node's server and client."""

    def serve(self, runtimes, program: Program = Program()) -> MemoryProxy:
        self.proxy = MemoryProxy(self, runtimes, program, net=self.net, twisted_web=True)
        return self.proxy

    def test_answers_streams_and_errors(self):
        self.serve([FakeRuntime(model("chat-model"), self.demo())],
                   Program(max_body_mb=0.001))
        response, payload = self.post_json(CHAT, chat_body(text="over twisted.web"))
        self.assertEqual(response.code, 200)
        self.assertEqual(payload["choices"][0]["message"]["content"], "echo: over twisted.web")

        response, content = self.post(CHAT, chat_body(text="a b c", stream=True))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type")[0].split(b";")[0],
                         b"text/event-stream")
        events = [line[6:] for line in content.decode().splitlines()
                  if line.startswith("data: ")]
        self.assertEqual(events[-1], "[DONE]")
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                       for e in events[:-1])
        self.assertIn("a b c", text)

        response, payload = self.post_json(CHAT, chat_body(text="x" * 2000))
        self.assertOpenAIError(response, payload, 413)
        response, payload = self.post_json(CHAT, chat_body("no-such-model"))
        self.assertOpenAIError(response, payload, 404, "model_not_found")


class ProxyCase(TestCase):
    """Shared fixture for the real-socket tests: a client, and helpers to post through the
    proxy."""

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
        assert_openai_error(self, response, payload, status, code)


class ForwardingTests(MemoryProxyCase):
    """Requests reach the demo backend as sent, and answers come back whole."""

    def test_cold_start_is_shared_by_200_concurrent_requests(self):
        runtime = FakeRuntime(model("chat-model"), self.demo())
        self.serve([runtime])
        results = self.net.wait(gatherResults([
            self.send_json(CHAT, chat_body(text=f"n{i}")) for i in range(200)]))
        self.assertEqual(runtime.spawns, 1)
        self.assertEqual([r.code for r, _ in results], [200] * 200)
        self.assertEqual(results[7][1]["choices"][0]["message"]["content"], "echo: n7")
        self.net.wait(runtime.when_idle())
        self.assertEqual((runtime.started, runtime.finished), (200, 200))

    def test_body_query_and_headers_forwarded(self):
        runtime = FakeRuntime(model("chat-model", aliases=("gpt-x",)), self.demo())
        proxy = self.serve([runtime])
        body = b'{"model":  "gpt-x", "messages": [{"role": "user", "content": "hi"}]}'
        client = self.net.connect(proxy.port, RawClient())
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
        self.net.wait(client.lost)
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

    def test_upstream_model_rewrites_only_the_model(self):
        runtime = FakeRuntime(
            model("chat-model", aliases=("friendly",), upstream_model="org/real-name"),
            self.demo())
        self.serve([runtime])
        response, payload = self.post_json(
            CHAT, chat_body("friendly", text="keep me", temperature=0.25))
        self.assertEqual(response.code, 200)
        self.assertEqual(payload["llmnode_echo"]["model"], "org/real-name")
        self.assertEqual(payload["choices"][0]["message"]["content"], "echo: keep me")

    def test_large_bodies_are_routed_and_rewritten_whatever_their_member_order(self):
        runtime = FakeRuntime(
            model("chat-model", aliases=("friendly",), upstream_model="org/real-name"),
            self.demo())
        self.serve([runtime])
        messages = [{"role": "user", "content": "hi"}] * 20000
        for document in (chat_body("friendly", max_tokens=5),
                         {"messages": messages, "model": "friendly", "tools": messages}):
            document["messages"] = messages
            big = json.dumps(document).encode()
            response, payload = self.post_json(CHAT, big)
            self.assertEqual(response.code, 200, list(document))
            echo = payload["llmnode_echo"]
            self.assertEqual(echo["model"], "org/real-name")
            expected = json.dumps(dict(document, model="org/real-name")).encode()
            self.assertEqual((echo["body_bytes"], echo["body_sha256"]),
                             (len(expected), hashlib.sha256(expected).hexdigest()))

    def test_streams_are_marked_unbuffered(self):
        runtime = FakeRuntime(model("chat-model"), self.demo())
        self.serve([runtime])
        response, content = self.post(CHAT, chat_body(stream=True, chunks=4))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        events = [line for line in content.split(b"\n\n") if line.startswith(b"data: ")]
        self.assertEqual(len(events), 5)
        self.assertEqual(events[-1], b"data: [DONE]")
        response, _ = self.post(CHAT, chat_body())
        self.assertIsNone(response.headers.getRawHeaders(b"x-accel-buffering"))

    def test_usage_chunk_of_a_stream_reaches_the_client(self):
        """The backend's final usage chunk (C{stream_options.include_usage}) is relayed as is,
        before C{[DONE]}."""
        runtime = FakeRuntime(model("chat-model"), self.demo())
        self.serve([runtime])
        response, content = self.post(CHAT, chat_body(
            stream=True, chunks=3, stream_options={"include_usage": True}))
        self.assertEqual(response.code, 200)
        events = [line[len(b"data: "):] for line in content.split(b"\n\n")
                  if line.startswith(b"data: ")]
        self.assertEqual(events[-1], b"[DONE]")
        last = json.loads(events[-2])
        self.assertEqual(last["choices"], [])
        self.assertEqual(last["usage"]["total_tokens"],
                         last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"])

    def test_endpoints_by_mode_and_path(self):
        embed = FakeRuntime(model("embedder", mode="Embedding"), self.demo())
        rerank = FakeRuntime(model("ranker", mode="Reranker"), self.demo())
        base = FakeRuntime(model("base", mode="Base"), self.demo())
        self.serve([embed, rerank, base])
        response, payload = self.post_json(
            "/v1/embeddings", {"model": "embedder", "input": "a"})
        self.assertEqual((response.code, payload["object"]), (200, "list"))
        query = {"model": "ranker", "query": "cat", "documents": ["a cat", "dog"]}
        for path in ("/v1/rerank", "/v1/reranking", "/rerank"):
            response, payload = self.post_json(path, query)
            self.assertEqual(response.code, 200, path)
            self.assertEqual(payload["llmnode_echo"]["path"], path)
            self.assertEqual(payload["results"][0]["index"], 0)
        response, payload = self.post_json(
            "/v1/completions", {"model": "base", "prompt": "p"})
        self.assertEqual(payload["choices"][0]["text"], "echo: p")
        response, payload = self.post_json(CHAT, chat_body("base"))
        self.assertOpenAIError(response, payload, 400)
        self.assertIn("'Base'", payload["error"]["message"])


class SocketTests(ProxyCase):
    """Bytes over real sockets: large bodies both ways, bodies read off the reactor thread
    while others are served, a backend that dies mid-stream or resets its connection."""

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

    async def test_backend_resets_the_connection(self):
        _, backend_port = listen_raw(self, _Reset)
        runtime = FakeRuntime(model("chat-model"), lambda: ("127.0.0.1", backend_port))
        port = serve_proxy(self, [runtime])
        response, payload = await self.post_json(port, CHAT, chat_body())
        self.assertOpenAIError(response, payload, 502, "backend_error")
        self.assertEqual(runtime.in_flight, 0)


class StartTests(MemoryProxyCase):
    """On-demand start as seen by waiting clients."""

    def test_waiter_that_leaves_does_not_cancel_the_start(self):
        starting: Deferred = Deferred()
        runtime = FakeRuntime(model("chat-model"), lambda: starting)
        proxy = self.serve([runtime])
        leaver = self.net.connect(proxy.port, RawClient())
        leaver.transport.write(http_request("POST", CHAT, json.dumps(chat_body()).encode()))
        stayer = self.send_json(CHAT, chat_body(text="stay"))
        self.net.flush()
        self.assertEqual(runtime.started, 2)
        leaver.transport.abortConnection()
        self.net.wait(leaver.lost)
        self.net.flush()
        self.assertEqual(runtime.in_flight, 1)
        self.assertEqual(runtime.state, "starting")
        self.assertFalse(stayer.called)
        starting.callback(self.demo(delay=0)())
        response, payload = self.net.wait(stayer)
        self.assertEqual(response.code, 200)
        self.assertEqual(payload["choices"][0]["message"]["content"], "echo: stay")
        self.assertEqual(runtime.spawns, 1)
        self.net.wait(runtime.when_idle())
        self.assertEqual((runtime.started, runtime.finished), (2, 2))

    def test_start_failure_reaches_every_waiter_with_retry_after(self):
        starting: Deferred = Deferred()
        runtime = FakeRuntime(model("chat-model"), lambda: starting)
        self.serve([runtime])
        waiters = [self.send_json(CHAT, chat_body()) for _ in range(3)]
        self.net.flush()
        self.assertEqual(runtime.started, 3)
        starting.errback(Unavailable("not enough memory on gpu0", retry_after=7.2))
        for response, payload in self.net.wait(gatherResults(waiters)):
            self.assertOpenAIError(response, payload, 503, "model_unavailable")
            self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"8"])
            self.assertIn("gpu0", payload["error"]["message"])
        self.assertEqual(runtime.spawns, 1)
        self.assertEqual(runtime.in_flight, 0)


class ErrorTests(MemoryProxyCase):
    """Every refusal is an OpenAI-shaped error, and none leaks an in-flight count."""

    def setUp(self):
        super().setUp()
        self.runtime = FakeRuntime(model("chat-model", aliases=("alias",)), self._backend)
        self.embedder = FakeRuntime(model("embedder", mode="Embedding"), self._backend)

    def _backend(self):
        return ("127.0.0.1", self.net.listenTCP(0, Site(_Silent(), reactor=self.net)).getHost().port)

    def check(self, body, status, code=None, path=CHAT):
        response, payload = self.post_json(path, body)
        self.assertOpenAIError(response, payload, status, code)
        self.assertEqual(self.runtime.in_flight, 0)
        return payload

    def test_bad_bodies(self):
        self.serve([self.runtime, self.embedder])
        payload = self.check(b"{not json", 400)
        self.assertEqual(payload["error"]["type"], "invalid_request_error")
        self.check(b"[1, 2]", 400)
        self.check(b"\xff\xfe", 400)
        payload = self.check({"messages": []}, 400)
        self.assertEqual(payload["error"]["param"], "model")
        payload = self.check({"model": 42}, 400)
        self.assertEqual(payload["error"]["param"], "model")
        payload = self.check(chat_body("nope"), 404, "model_not_found")
        self.assertIn("nope", payload["error"]["message"])
        payload = self.check(chat_body("embedder"), 400)
        self.assertIn("'Embedding'", payload["error"]["message"])
        self.check({"model": "alias", "input": "x"}, 400, path="/v1/embeddings")
        self.assertEqual((self.runtime.spawns, self.embedder.spawns), (0, 0))

    def test_a_body_nested_20000_deep_is_a_400(self):
        self.serve([self.runtime])
        deep = b"[" * 20000 + b"]" * 20000
        for body in (b'{"model": "chat-model", "x": ' + deep + b"}", deep):
            payload = self.check(body, 400)
            self.assertIn("nested too deeply", payload["error"]["message"])
        self.assertEqual(self.runtime.spawns, 0)

    def test_wrong_method_and_unknown_path(self):
        proxy = self.serve([self.runtime])
        response, content = proxy.call("GET", CHAT)
        self.assertOpenAIError(response, json.loads(content), 405, "method_not_allowed")
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])
        for path in ("/v1/nothing", "/v1/chat/completions/extra", "/v1/chat", "/v1"):
            response, content = proxy.call("POST", path, b"{}")
            self.assertOpenAIError(response, json.loads(content), 404)

    def test_body_over_limit(self):
        proxy = self.serve([self.runtime], Program(max_body_mb=0.01))
        body = json.dumps(chat_body(text="y" * 20000)).encode()
        payload = self.check(body, 413, "request_too_large")
        self.assertIn("limit", payload["error"]["message"])
        client = self.net.connect(proxy.port, RawClient())
        client.transport.write(http_request("POST", CHAT, body, {"Connection": "close"},
                                            chunked=True))
        self.net.wait(client.lost)
        status, _, content, _ = parse_response(client.data)
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(content)["error"]["code"], "request_too_large")
        self.assertEqual(self.runtime.spawns, 0)

    def test_backend_refused(self):
        runtime = FakeRuntime(model("chat-model"), lambda: ("127.0.0.1", NOBODY))
        self.serve([runtime])
        response, payload = self.post_json(CHAT, chat_body())
        self.assertOpenAIError(response, payload, 502, "backend_error")
        self.assertIn("chat-model", payload["error"]["message"])
        self.assertEqual(runtime.in_flight, 0)

    def test_request_refused_by_a_backend_that_just_died_is_sent_again(self):
        """The backend died an instant before the request and the node had not yet seen its
        exit: nothing of the request reached it, so it goes to the restarted backend."""
        runtime = FakeRuntime(model("chat-model"), self.demo())
        runtime.state, runtime._address = "running", ("127.0.0.1", NOBODY)
        self.net.callLater(0.1, setattr, runtime, "state", "failed")
        self.serve([runtime])
        response, payload = self.post_json(CHAT, chat_body(text="again"))
        self.assertEqual(response.code, 200, payload)
        self.assertIn("again", payload["choices"][0]["message"]["content"])
        self.assertEqual(runtime.spawns, 1)
        self.assertEqual(runtime.in_flight, 0)

    def test_backend_headers_too_late(self):
        silent = _Silent()
        backend_port = self.net.listenTCP(0, Site(silent, reactor=self.net)).getHost().port
        runtime = FakeRuntime(model("chat-model"), lambda: ("127.0.0.1", backend_port))
        self.serve([runtime], Program(backend_header_timeout=0.3))
        response, payload = self.post_json(CHAT, chat_body())
        self.assertOpenAIError(response, payload, 504, "backend_timeout")
        self.assertIn("0.3", payload["error"]["message"])
        self.net.wait(silent.lost[0])
        self.assertEqual(runtime.in_flight, 0)


class ModelsTests(MemoryProxyCase):
    """GET /v1/models and /v1/models/{name}."""

    def test_listing(self):
        chat = FakeRuntime(model("Qwen-14B", aliases=("qwen", "gpt-3.5-turbo")), self.demo())
        embed = FakeRuntime(model("org/embed", mode="Embedding", aliases=("e",)), self.demo())
        chat.state = "running"
        proxy = self.serve([chat, embed])
        response, content = proxy.call("GET", "/v1/models")
        payload = json.loads(content)
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

        response, content = proxy.call("GET", "/v1/models/org/embed")
        self.assertEqual((json.loads(content))["llmnode"]["state"], "stopped")
        response, content = proxy.call("GET", "/v1/models/qwen")
        self.assertEqual((json.loads(content))["llmnode"]["alias_of"], "Qwen-14B")
        response, content = proxy.call("GET", "/v1/models/missing")
        self.assertOpenAIError(response, json.loads(content), 404, "model_not_found")
        response, content = proxy.call("POST", "/v1/models", b"{}")
        self.assertOpenAIError(response, json.loads(content), 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        self.assertEqual((chat.spawns, embed.spawns), (0, 0))


class CommonTests(SynchronousTestCase):
    """The helpers the web resources share."""

    def test_error_rendering(self):
        request = MemoryRequest([b""])
        body = render_error(request, Unavailable("busy", retry_after=0.2))
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(json.loads(body), {"error": {
            "message": "busy", "type": "server_error", "param": None,
            "code": "model_unavailable"}})

    def test_body_limit_on_a_request_read_whole(self):
        """A server that read the whole body (twisted.web's) still has the limit applied."""
        self.assertRaises(BodyTooLarge, read_body, MemoryRequest([b""], b"x" * 101), 100)
        self.assertEqual(read_body(MemoryRequest([b""], b"x" * 100), 100), b"x" * 100)

    def test_nothing_is_written_after_the_client_left(self):
        request = MemoryRequest([b""])
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
        request = MemoryRequest([b""])
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
