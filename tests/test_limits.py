"""Request limits: body size, request head size, and slow or silent clients."""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from llmnode.web.server import MAX_HEAD_BYTES
from llmnode.web.server import NodeSite
from tests.support.nodes import (base_url, demo_model, free_port, get_json, http_client,
                                 sleep, start_node)


class Hello(Resource):
    isLeaf = True

    def render(self, request):
        return b"hello"


def split_response(data: bytes) -> tuple[int, dict, bytes]:
    """(status, lower-cased headers, body) of one raw HTTP/1.1 response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


class HalfClosingTransport(StringTransport):
    write_closed = False
    aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class ChannelTests(SynchronousTestCase):
    """The channel on an in-memory transport, timed by a Clock."""

    def connect(self, transport=None, **options):
        self.clock = Clock()
        site = NodeSite(Hello(), clock=self.clock, **options)
        channel = site.buildProtocol(None)
        transport = transport or StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return channel, transport

    def refusal(self, transport) -> tuple[int, dict]:
        self.assertTrue(transport.disconnecting, "the connection is closed after a refusal")
        status, headers, body = split_response(transport.value())
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(int(headers[b"content-length"]), len(body))
        return status, json.loads(body)["error"]

    def test_a_normal_request_is_served(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 8000 + b"\r\n\r\n")
        status, _, body = split_response(transport.value())
        self.assertEqual((status, body), (200, b"hello"))
        self.assertFalse(transport.disconnecting)

    def test_headers_over_the_limit_get_431(self):
        channel, transport = self.connect()
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        status, error = self.refusal(transport)
        self.assertEqual(status, 431)
        self.assertEqual(error["code"], "request_headers_too_large")
        self.assertIn(str(MAX_HEAD_BYTES), error["message"])

    def test_one_huge_header_line_gets_431(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * (MAX_HEAD_BYTES + 10))
        status, _ = self.refusal(transport)
        self.assertEqual(status, 431)

    def test_after_a_refusal_input_is_dropped_then_the_connection_aborted(self):
        transport = HalfClosingTransport()
        channel, _ = self.connect(transport)
        channel.dataReceived(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * (MAX_HEAD_BYTES + 10))
        self.assertTrue(transport.write_closed)
        self.assertFalse(transport.disconnecting)
        answered = transport.value()
        channel.dataReceived(b"b" * 100000 + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        self.assertEqual(transport.value(), answered)
        self.assertEqual(split_response(answered)[0], 431)
        self.clock.advance(channel.linger_timeout)
        self.assertTrue(transport.aborted)

    def test_a_huge_request_line_gets_414(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET /" + b"p" * (MAX_HEAD_BYTES + 10))
        status, error = self.refusal(transport)
        self.assertEqual(status, 414)
        self.assertEqual(error["type"], "invalid_request_error")

    def test_the_limit_counts_each_request_separately(self):
        channel, transport = self.connect()
        request = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 10000 + b"\r\n\r\n"
        channel.dataReceived(request)
        channel.dataReceived(request)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200"), 2)
        self.assertFalse(transport.disconnecting)

    def test_a_silent_client_is_dropped_after_the_idle_timeout(self):
        channel, transport = self.connect(idle_timeout=5)
        channel.dataReceived(b"GET /half")
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_a_trickling_client_gets_408_after_the_head_timeout(self):
        channel, transport = self.connect(idle_timeout=5, head_timeout=10)
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        for _ in range(9):
            self.clock.advance(1)
            channel.dataReceived(b"X: y\r\n")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        status, error = self.refusal(transport)
        self.assertEqual(status, 408)
        self.assertEqual(error["code"], "request_timeout")

    def test_a_client_that_never_sends_a_byte_is_dropped_after_the_idle_timeout(self):
        channel, transport = self.connect(idle_timeout=5)
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_the_first_head_is_timed_from_the_accept(self):
        channel, transport = self.connect(idle_timeout=5, head_timeout=8)
        self.clock.advance(4)
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(3.9)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"X: y\r\n")
        self.clock.advance(0.2)
        status, error = self.refusal(transport)
        self.assertEqual(status, 408)

    def test_a_trickling_body_gets_408_after_the_body_timeout(self):
        channel, transport = self.connect(idle_timeout=30, body_timeout=60)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        for _ in range(2):
            self.clock.advance(20)
            channel.dataReceived(b"x")
        self.clock.advance(19.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.2)
        status, error = self.refusal(transport)
        self.assertEqual(status, 408)
        self.assertEqual(error["code"], "request_timeout")
        self.assertIn("body_timeout", error["message"])

    def test_the_body_timeout_ends_with_the_body(self):
        channel, transport = self.connect(idle_timeout=30, body_timeout=10)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nx")
        self.clock.advance(9)
        channel.dataReceived(b"y")
        self.clock.advance(20)
        status, _, body = split_response(transport.value())
        self.assertEqual((status, body), (200, b"hello"))
        self.assertFalse(transport.disconnecting)

    def test_the_head_timeout_ends_with_the_headers(self):
        channel, transport = self.connect(idle_timeout=5, head_timeout=10)
        for _ in range(4):
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.clock.advance(4)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200"), 4)
        self.assertNotIn(b"408", transport.value())
        self.assertFalse(transport.disconnecting)


class RawClient(Protocol):
    """Sends bytes as told; collects everything the server says until it closes."""

    def __init__(self):
        self.data = b""
        self.closed = Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(self.data)


class LiveLimitTests(TestCase):
    timeout = 60

    async def node(self, **program):
        self.service = await start_node(self, {"chat": demo_model(free_port())}, **program)
        self.http = http_client(self)
        self.url = base_url(self.service)

    async def raw(self) -> RawClient:
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.service.listening_port)
        await connectProtocol(endpoint, client)
        self.addCleanup(self.close, client)
        return client

    async def close(self, client):
        if not client.closed.called:
            client.transport.abortConnection()
            await client.closed

    async def still_serving(self):
        status, health = await get_json(self.http, self.url + "/api/health")
        self.assertEqual((status, health["status"]), (200, "ok"))

    async def test_a_body_announced_over_the_limit_gets_413_before_it_is_sent(self):
        await self.node(max_body_mb=1)
        client = await self.raw()
        client.transport.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: 314572800\r\n\r\n{\"model\": \"chat\"")
        status, _, body = split_response(await client.closed)
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"]["code"], "request_too_large")
        self.assertEqual(self.service.node.lookup("chat").state, "stopped")
        await self.still_serving()

    async def endless_chunked_body(self, client: RawClient, headers: bytes = b"") -> bytes:
        """Send a chunked body that never ends, until the node answers and closes."""
        client.transport.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + headers
                               + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        sent = 0
        while not client.closed.called and sent < 64:
            client.transport.write(chunk)
            sent += 1
            await sleep(0.01)
        return await client.closed

    async def test_an_endless_body_over_the_limit_gets_413_and_is_closed(self):
        await self.node(max_body_mb=1)
        client = await self.raw()
        status, _, body = split_response(await self.endless_chunked_body(client))
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"]["code"], "request_too_large")
        await self.still_serving()

    async def test_an_endless_body_without_the_key_gets_401_at_once(self):
        await self.node(api_keys=["k"])
        client = await self.raw()
        status, headers, body = split_response(await self.endless_chunked_body(client))
        self.assertEqual(status, 401)
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_api_key")
        self.assertTrue(headers[b"www-authenticate"].startswith(b"Bearer"))

    async def test_a_connection_that_never_sends_a_byte_is_closed(self):
        await self.node()
        self.service.site.idle_timeout = 0.5
        client = await self.raw()
        self.assertEqual(await client.closed, b"")
        await self.still_serving()

    async def test_oversized_headers_get_431_json_and_the_node_stays_up(self):
        await self.node()
        client = await self.raw()
        client.transport.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\nCookie: "
                               + b"c" * (4 * 1024 * 1024) + b"\r\n\r\n")
        status, headers, body = split_response(await client.closed)
        self.assertEqual(status, 431)
        self.assertEqual(json.loads(body)["error"]["code"], "request_headers_too_large")
        await self.still_serving()

    async def test_half_a_request_line_is_dropped_after_the_idle_timeout(self):
        await self.node()
        self.service.site.idle_timeout = 0.5
        client = await self.raw()
        client.transport.write(b"POST /v1/chat/compl")
        started = reactor.seconds()
        self.assertEqual(await client.closed, b"")
        self.assertLess(reactor.seconds() - started, 20)
        await self.still_serving()
