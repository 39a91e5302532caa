"""The lean backend agent under treq: real sockets against tiny in-process servers whose
answers are written byte for byte."""

from __future__ import annotations

import gc
import json
import socket
from http.cookiejar import CookieJar, DefaultCookiePolicy

from httptools import HttpRequestParser
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from llmnode.config import Program
from llmnode.web.backend_http import TreqBackends, read_answer
from llmnode.web.client import BackendAgent, backend_url, make_client
from llmnode.web.proxy import mount
from tests.support.fake_node import FakeNode, FakeRuntime, model
from tests.support.net import (free_port, http_request, listen_node, parse_response,
                                raw_connect)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Backend(Protocol):
    """One server connection: parses requests and hands each to the factory's C{answer}."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.lost = Deferred()
        self._parser = HttpRequestParser(self)
        self._reset()

    def _reset(self):
        self.url, self.headers, self.body, self.pairs = b"", {}, b"", []

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers[name.lower()] = value
        self.pairs.append((name, value))

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        request = (self._parser.get_method(), self.url, self.headers, self.body)
        self.factory.requests.append(request)
        self.factory.header_pairs.append(self.pairs)
        self._reset()
        self.factory.answer(self, request)

    def dataReceived(self, data):
        self._parser.feed_data(data)

    def connectionLost(self, reason):
        self.factory.open.discard(self)
        self.lost.callback(None)


class BackendFactory(Factory):
    protocol = Backend
    noisy = False

    def __init__(self, answer):
        self.answer = answer
        self.connections: list[Backend] = []
        self.requests: list = []
        self.header_pairs: list = []
        self.open: set[Backend] = set()

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.open.add(protocol)
        return protocol


class Body(Protocol):
    """Collects a response body; C{done} fires with the reason it ended."""

    def __init__(self, on_data=None):
        self.data = b""
        self.done: Deferred = Deferred()
        self._on_data = on_data

    def dataReceived(self, data):
        self.data += data
        if self._on_data is not None:
            self._on_data(self)

    def connectionLost(self, reason):
        self.reason = reason
        self.done.callback(reason.value)


class AgentCase(TestCase):
    timeout = 20

    def setUp(self):
        jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self.http, self.agent = make_client(reactor, cookiejar=jar)
        self.addCleanup(self.agent.closeCachedConnections)

    def serve(self, answer) -> tuple[BackendFactory, str]:
        factory = BackendFactory(answer)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")

        async def close():
            await port.stopListening()
            waiting = [c.lost for c in factory.open]
            for connection in list(factory.open):
                connection.transport.abortConnection()
            await DeferredList(waiting)

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return factory, f"http://127.0.0.1:{port.getHost().port}"


class KeepAliveTests(AgentCase):

    def test_is_an_agent(self):
        self.assertTrue(verifyObject(IAgent, self.agent))

    async def test_connection_reused_for_sequential_requests(self):
        factory, url = self.serve(lambda c, r: c.transport.write(ok(b"hello " + r[1])))
        for path in (b"/a", b"/b", b"/c"):
            response = await self.http.get(url + path.decode())
            self.assertEqual(await response.content(), b"hello " + path)
        self.assertEqual(len(factory.connections), 1)
        self.assertEqual([r[1] for r in factory.requests], [b"/a", b"/b", b"/c"])

    async def test_request_head_and_body_arrive_intact(self):
        factory, url = self.serve(lambda c, r: c.transport.write(ok(b"{}")))
        body = b'{"model": "m"}' * 1000
        response = await self.http.post(url + "/v1/chat?x=1", data=body,
                                        headers={"X-Custom": "kept", "Content-Length": "3"})
        self.assertEqual(response.code, 200)
        await response.content()
        method, path, headers, received = factory.requests[0]
        self.assertEqual((method, path, received), (b"POST", b"/v1/chat?x=1", body))
        self.assertEqual(headers[b"x-custom"], b"kept")
        self.assertEqual(headers[b"content-length"], str(len(body)).encode())
        self.assertEqual(headers[b"host"], url[len("http://"):].encode())

    async def test_bodies_larger_than_a_socket_buffer_keep_their_order(self):
        factory, url = self.serve(lambda c, r: c.transport.write(ok(b"%d" % len(r[3]))))
        bodies = [bytes([65 + i]) * (8 << 20) for i in range(2)] + [b"small"]
        for body in bodies:
            response = await self.http.post(url, data=body)
            self.assertEqual(await response.content(), b"%d" % len(body))
        self.assertEqual([r[3] for r in factory.requests], bodies)
        self.assertEqual(len(factory.connections), 1)

    async def test_concurrent_requests_use_separate_connections(self):
        waiting = []
        factory, url = self.serve(lambda c, r: waiting.append(c))
        first = self.http.get(url + "/1")
        second = self.http.get(url + "/2")
        while len(waiting) < 2:
            await deferLater(reactor, 0.01, lambda: None)
        for connection in waiting:
            connection.transport.write(ok(b"x"))
        for d in (first, second):
            self.assertEqual(await (await d).content(), b"x")
        self.assertEqual(len(factory.connections), 2)

    async def test_connection_closed_by_backend_while_idle_is_not_used(self):
        factory, url = self.serve(lambda c, r: c.transport.write(ok(b"one")))
        response = await self.http.get(url + "/1")
        await response.content()
        # Close the backend's end at the socket, so the client has had no chance to notice
        # before the next request picks the pooled connection.
        factory.connections[0].transport.getHandle().shutdown(socket.SHUT_RDWR)
        response = await self.http.get(url + "/2")
        self.assertEqual(await response.content(), b"one")
        self.assertEqual(len(factory.connections), 2)
        self.assertEqual([r[1] for r in factory.requests], [b"/1", b"/2"])

    async def test_connection_closed_after_request_is_not_retried(self):
        factory, url = self.serve(lambda c, r: c.transport.loseConnection())
        with self.assertRaises(ResponseNeverReceived):
            await self.http.post(url + "/v1/chat", data=b"{}")
        self.assertEqual(len(factory.requests), 1)

    async def test_connection_close_answer_is_not_reused(self):
        factory, url = self.serve(
            lambda c, r: c.transport.write(ok(b"bye", b"Connection: close\r\n")))
        for _ in range(2):
            response = await self.http.get(url)
            self.assertEqual(await response.content(), b"bye")
        self.assertEqual(len(factory.connections), 2)

    async def test_close_cached_connections(self):
        factory, url = self.serve(lambda c, r: c.transport.write(ok(b"x")))
        response = await self.http.get(url)
        await response.content()
        await self.agent.closeCachedConnections()
        await factory.connections[0].lost
        self.assertEqual(factory.open, set())


class BodyFramingTests(AgentCase):

    async def test_chunked_body(self):
        factory, url = self.serve(lambda c, r: c.transport.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"))
        for _ in range(2):
            response = await self.http.get(url)
            self.assertIs(response.length, UNKNOWN_LENGTH)
            self.assertEqual(await response.content(), b"hello world")
        self.assertEqual(len(factory.connections), 1)

    async def test_content_length_body_and_headers(self):
        factory, url = self.serve(lambda c, r: c.transport.write(
            b"HTTP/1.1 201 Made It\r\nContent-Length: 2\r\nX-A: 1\r\nX-A: 2\r\n\r\nok"))
        response = await self.http.get(url)
        self.assertEqual((response.code, response.phrase, response.length), (201, b"Made It", 2))
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"1", b"2"])
        self.assertEqual(await response.content(), b"ok")

    async def test_headers_as_pairs_on_both_paths(self):
        """Pairs reach the backend in their order, whether the request goes straight to the
        agent (the node's own client) or through treq's agents (any treq client, adapted)."""
        factory, url = self.serve(lambda c, r: c.transport.write(ok(b"{}")))
        node_http, node_agent = make_client(reactor)
        self.addCleanup(node_agent.closeCachedConnections)
        pairs = [(b"X-B", b"1"), (b"X-A", b"2"), (b"X-B", b"3")]
        target = backend_url("127.0.0.1", int(url.rsplit(":", 1)[1]), b"/v1/x")
        for backends in (node_http, TreqBackends(self.http)):
            answer = await backends.send(b"POST", target, pairs, b"{}")
            self.assertEqual(answer.code, 200)
            self.assertEqual(await read_answer(answer), b"{}")
        sent = [[pair for pair in received if pair[0].startswith(b"X-")]
                for received in factory.header_pairs]
        self.assertEqual(sent[0], pairs)
        # treq's own path groups a repeated name (twisted's Headers), but keeps every value.
        self.assertEqual(sorted(sent[1]), sorted(pairs))

    async def test_default_client_keeps_no_cookies(self):
        http, agent = make_client(reactor)
        self.addCleanup(agent.closeCachedConnections)
        factory, url = self.serve(lambda c, r: c.transport.write(
            ok(b"x", b"Set-Cookie: session=alice; Path=/\r\n")))
        for _ in range(2):
            response = await http.get(url + "/a")
            await response.content()
        self.assertEqual([b"cookie" in r[2] for r in factory.requests], [False, False])
        self.assertEqual(list(response.cookies()), [])

    async def test_close_delimited_body(self):
        def answer(connection, request):
            connection.transport.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
            connection.transport.loseConnection()
        factory, url = self.serve(answer)
        for _ in range(2):
            response = await self.http.get(url)
            self.assertEqual(await response.content(), b"until the end")
        self.assertEqual(len(factory.connections), 2)

    async def test_body_cut_short_fails(self):
        def answer(connection, request):
            connection.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            connection.transport.loseConnection()
        _, url = self.serve(answer)
        response = await self.http.get(url)
        with self.assertRaises(ResponseFailed):
            await response.content()

    async def test_head_and_no_content(self):
        def answer(connection, request):
            if request[0] == b"HEAD":
                connection.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
            else:
                connection.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        _, url = self.serve(answer)
        response = await self.http.head(url)
        self.assertEqual((response.code, response.length), (200, 0))
        self.assertEqual(await response.content(), b"")
        response = await self.http.delete(url)
        self.assertEqual((response.code, response.length), (204, 0))
        self.assertEqual(await response.content(), b"")

    async def test_interim_response_is_skipped(self):
        _, url = self.serve(lambda c, r: c.transport.write(
            b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final")))
        response = await self.http.post(url, data=b"x")
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.content(), b"final")

    async def test_garbage_fails_the_request(self):
        _, url = self.serve(lambda c, r: c.transport.write(b"SSH-2.0-OpenSSH\r\n\r\n"))
        with self.assertRaises(ResponseFailed):
            await self.http.get(url)

    async def test_extra_bytes_after_an_answer_close_the_connection(self):
        factory, url = self.serve(lambda c, r: c.transport.write(ok(b"a") + ok(b"b")))
        for _ in range(2):
            response = await self.http.get(url)
            self.assertEqual(await response.content(), b"a")
        self.assertEqual(len(factory.connections), 2)

    async def test_streamed_request_body_is_chunk_encoded(self):
        factory, url = self.serve(lambda c, r: c.transport.write(ok(r[3])))

        class Streamed:
            length = UNKNOWN_LENGTH

            def startProducing(self, consumer):
                consumer.write(b"part one, ")
                consumer.write(b"part two")
                return succeed(None)

            def stopProducing(self):
                pass

        response = await self.agent.request(b"POST", url.encode(), Headers(), Streamed())
        body = Body()
        response.deliverBody(body)
        self.assertIsInstance(await body.done, ResponseDone)
        self.assertEqual(body.data, b"part one, part two")
        self.assertEqual(factory.requests[0][2][b"transfer-encoding"], b"chunked")


class FlowTests(AgentCase):

    async def test_body_arrives_as_sent_and_pause_holds_it_back(self):
        backend = []
        factory, url = self.serve(lambda c, r: backend.append(c))
        requested = self.agent.request(b"GET", url.encode())
        while not backend:
            await deferLater(reactor, 0.01, lambda: None)
        backend[0].transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nfirst ")
        response = await requested
        self.assertTrue(verifyObject(IResponse, response))
        first: Deferred = Deferred()
        body = Body(on_data=lambda b: first.called or first.callback(None))
        response.deliverBody(body)
        await first
        self.assertEqual(body.data, b"first ")
        body.transport.pauseProducing()
        backend[0].transport.write(b"second")
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(body.data, b"first ")
        body.transport.resumeProducing()
        self.assertIsInstance(await body.done, ResponseDone)
        self.assertEqual(body.data, b"first second")

    async def test_stop_producing_closes_the_backend_connection(self):
        backend = []
        factory, url = self.serve(lambda c, r: backend.append(c) or c.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n7\r\ndata: 1\r\n"))
        response = await self.agent.request(b"GET", url.encode())
        body = Body(on_data=lambda b: b.transport.stopProducing())
        response.deliverBody(body)
        self.assertIsInstance(await body.done, ResponseFailed)
        await backend[0].lost
        response = await self.http.get(url)
        self.assertEqual(len(factory.connections), 2)
        response.deliverBody(Body(on_data=lambda b: b.transport.stopProducing()))

    async def test_cancel_while_waiting_for_headers_closes_the_connection(self):
        factory, url = self.serve(lambda c, r: None)
        requested = self.agent.request(b"GET", url.encode())
        while not factory.requests:
            await deferLater(reactor, 0.01, lambda: None)
        requested.cancel()
        with self.assertRaises(CancelledError):
            await requested
        await factory.connections[0].lost

    async def test_treq_timeout(self):
        factory, url = self.serve(lambda c, r: None)
        with self.assertRaises(CancelledError):
            await self.http.get(url, timeout=0.2)
        await factory.connections[0].lost

    async def test_refused(self):
        with self.assertRaises(ConnectionRefusedError):
            await self.http.get(f"http://127.0.0.1:{free_port()}/health")

    async def test_only_http_urls(self):
        agent = BackendAgent(reactor)
        with self.assertRaises(Exception):
            await agent.request(b"GET", b"https://127.0.0.1:1/")


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


class _Pairs:
    """httptools callbacks that record a request's header pairs as they arrive."""

    def __init__(self, into: list):
        self._into = into

    def on_header(self, name, value):
        self._into.append((name, value))


def _request_objects_in_cycles() -> dict:
    """The per-request objects (by class name) that only the cycle collector would free."""
    per_request = {"Exchange", "PendingResponse", "NodeRequest", "ResponseHeaders",
                   "StreamRelay", "BackendResponse", "_Request"}
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found: dict = {}
        for thing in gc.garbage:
            name = type(thing).__name__
            if name in per_request:
                found[name] = found.get(name, 0) + 1
        return found
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)


def sse_chunk(text: bytes) -> bytes:
    event = b"data: " + text + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


class ProxyOverAgentTests(AgentCase):
    """The /v1 proxy with the node's lean client behind it (the proxy's own tests use
    Twisted's Agent)."""

    def proxy(self, backend_port: int) -> int:
        """The proxy in front of C{backend_port}, with the client the node itself makes."""
        runtime = FakeRuntime(model("m"), lambda: ("127.0.0.1", backend_port))
        root = Resource()
        http, agent = make_client(reactor)
        self.addCleanup(agent.closeCachedConnections)
        v1 = mount(root, FakeNode([runtime]), http, reactor,
                   Program(backend_header_timeout=0.5))
        self.addCleanup(v1.close)
        _, port = listen_node(self, root, max_body_bytes=1 << 20)
        return port

    async def stream(self, answer):
        backend = []

        def record(connection, request):
            backend.append(connection)
            answer(connection, request)

        factory, url = self.serve(record)
        port = self.proxy(int(url.rsplit(":", 1)[1]))
        client = await raw_connect(self, port)
        client.transport.write(http_request(
            "POST", "/v1/chat/completions", json.dumps({"model": "m", "stream": True}).encode(),
            {"Content-Type": "application/json"}))
        while not backend:
            await deferLater(reactor, 0.01, lambda: None)
        return factory, backend[0], client

    async def test_events_pass_one_by_one(self):
        _, backend, client = await self.stream(
            lambda c, r: c.transport.write(SSE_HEAD + sse_chunk(b"one")))
        await client.when_received(b"data: one\n\n")
        self.assertNotIn(b"two", client.data)
        backend.transport.write(sse_chunk(b"two") + b"0\r\n\r\n")
        await client.when_received(b"data: two\n\n")
        status, headers, body, complete = parse_response(client.data)
        self.assertEqual((status, body, complete),
                         (200, b"data: one\n\ndata: two\n\n", True))
        self.assertEqual(headers["x-accel-buffering"], ["no"])

    async def test_client_leaving_closes_the_backend_connection(self):
        _, backend, client = await self.stream(
            lambda c, r: c.transport.write(SSE_HEAD + sse_chunk(b"one")))
        await client.when_received(b"data: one\n\n")
        client.transport.loseConnection()
        await backend.lost

    async def test_backend_dying_mid_stream_cuts_the_client(self):
        _, backend, client = await self.stream(
            lambda c, r: c.transport.write(SSE_HEAD + sse_chunk(b"one")))
        await client.when_received(b"data: one\n\n")
        backend.transport.abortConnection()
        await client.lost
        self.assertEqual(parse_response(client.data)[3], False)

    async def test_silent_backend_is_a_gateway_timeout(self):
        _, backend, client = await self.stream(lambda c, r: None)
        await client.when_received(b'"code"')
        await backend.lost
        status, _, body, complete = parse_response(client.data)
        self.assertEqual((status, complete), (504, True))
        self.assertIn("no response headers", json.loads(body)["error"]["message"])

    async def test_forwarded_headers_keep_their_order_and_lose_hop_by_hop_ones(self):
        factory, url = self.serve(lambda c, r: c.transport.write(ok(b"{}")))
        port = self.proxy(int(url.rsplit(":", 1)[1]))
        client = await raw_connect(self, port)
        client.transport.write(
            b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: node.example\r\n"
            b"X-B: 1\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\n"
            b"X-A: 2\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-B: 3\r\n"
            b"Expect: 100-continue\r\nContent-Length: 14\r\n\r\n{\"model\": \"m\"}")
        await client.when_received(b"{}")
        method, path, headers, body = factory.requests[0]
        self.assertEqual((method, path, body), (b"POST", b"/v1/chat/completions?x=1",
                                                b'{"model": "m"}'))
        self.assertEqual(factory.header_pairs[0], [
            (b"X-B", b"1"), (b"X-A", b"2"), (b"X-B", b"3"),
            (b"Host", url[len("http://"):].encode()), (b"Content-Length", b"14")])

    async def test_answered_requests_leave_no_reference_cycles(self):
        """Once answered, a request's objects are freed at once, by reference counting: none
        waits for Python's cycle collector, whose full collections were pauses of tens of
        milliseconds under load."""
        def answer(connection, request):
            if b'"stream": true' in request[3]:
                connection.transport.write(SSE_HEAD + sse_chunk(b"one") + b"0\r\n\r\n")
            else:
                connection.transport.write(ok(b"{}", b"Content-Type: application/json\r\n"))

        _, url = self.serve(answer)
        port = self.proxy(int(url.rsplit(":", 1)[1]))
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        for body in (b'{"model": "m"}', b'{"model": "m", "stream": true}', b'{"model": "x"}'):
            client = await raw_connect(self, port)
            client.transport.write(http_request(
                "POST", "/v1/chat/completions", body, {"Connection": "close"}))
            await client.lost
            self.assertIn(b"HTTP/1.1 ", client.data)
        self.assertEqual(_request_objects_in_cycles(), {})

    async def test_refused_is_a_bad_gateway(self):
        port = self.proxy(free_port())
        response = await self.http.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=b'{"model": "m"}')
        self.assertEqual(response.code, 502)
        self.assertIn("error", json.loads(await response.content()))
