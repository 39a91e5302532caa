"""The streaming relay through the real proxy, against in-process backends with exact timing.

These are integration tests on real sockets; their timing bounds are deliberately generous.
"""

from __future__ import annotations

import json
import statistics

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from llmnode.config import Program
from llmnode.web.relay import end_to_end, is_event_stream
from tests.support.backends import BulkWriter, ScriptedBackend, sse_script
from tests.support.fake_node import FakeRuntime, model
from tests.support.net import http_request, listen, parse_response, raw_connect
from tests.support.proxy import serve_proxy

CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "m", "stream": True, "messages": []}).encode()


class RelayTests(TestCase):
    timeout = 30

    def proxy(self, script, program=Program()):
        """Serve C{script} as the backend of model "m" behind the proxy."""
        self.backend = ScriptedBackend(script)
        _, backend_port = listen(self, self.backend)
        self.runtime = FakeRuntime(model("m"), lambda: ("127.0.0.1", backend_port))
        return serve_proxy(self, [self.runtime], program)

    async def request(self, port, close=True):
        client = await raw_connect(self, port)
        headers = {"Connection": "close"} if close else {}
        client.transport.write(http_request("POST", CHAT, BODY, headers))
        return client

    async def test_events_arrive_one_by_one_as_sent(self):
        port = self.proxy(sse_script(50, 0.02))
        client = await self.request(port)
        await client.lost
        status, headers, body, complete = parse_response(client.data)
        self.assertEqual((status, complete), (200, True))
        self.assertEqual(headers["x-accel-buffering"], ["no"])
        self.assertEqual(body.count(b"data: "), 50)
        arrivals = [(when, data) for when, data in client.reads if b"data: " in data]
        self.assertGreaterEqual(len(arrivals), 45)
        self.assertLessEqual(max(data.count(b"data: ") for _, data in arrivals), 3)
        self.assertGreater(arrivals[-1][0] - arrivals[0][0], 0.7)
        delays = []
        for when, data in arrivals:
            for line in data.split(b"\n"):
                if line.startswith(b"data: "):
                    delays.append(when - json.loads(line[6:])["sent"])
        self.assertLess(statistics.median(delays), 0.05)
        await self.runtime.when_idle()

    async def test_client_leaving_mid_stream_closes_the_backend_at_once(self):
        port = self.proxy(sse_script(1000, 0.02, end="hang"))
        client = await self.request(port)
        await client.when_received(b'"index": 3')
        left = reactor.seconds()
        client.transport.abortConnection()
        closed = await self.backend.exchanges[0].closed
        self.assertLess(closed - left, 0.1)
        await self.runtime.when_idle()
        self.assertEqual((self.runtime.started, self.runtime.finished), (1, 1))

    async def test_client_leaving_before_headers_closes_the_backend(self):
        port = self.proxy(lambda exchange: None)
        client = await self.request(port)
        exchange = await self.backend.arrived
        client.transport.abortConnection()
        await exchange.closed
        await self.runtime.when_idle()
        self.assertEqual(self.runtime.finished, 1)

    async def test_backend_dying_mid_stream_leaves_the_chunked_body_incomplete(self):
        port = self.proxy(sse_script(3, 0.01, end="die"))
        client = await self.request(port, close=False)
        await client.lost
        status, headers, body, complete = parse_response(client.data)
        self.assertEqual(status, 200)
        self.assertEqual(headers["transfer-encoding"], ["chunked"])
        self.assertEqual(body.count(b"data: "), 3)
        self.assertFalse(complete)
        self.assertNotIn(b"\r\n0\r\n\r\n", client.data)
        await self.runtime.when_idle()

    async def test_backend_dying_mid_body_leaves_it_short(self):
        def script(exchange):
            exchange.request.setHeader(b"Content-Length", b"1000")
            exchange.request.write(b"a" * 400)
            exchange.later(0.05, exchange.die)

        port = self.proxy(script)
        client = await self.request(port, close=False)
        await client.lost
        status, headers, body, complete = parse_response(client.data)
        self.assertEqual((status, headers["content-length"]), (200, ["1000"]))
        self.assertEqual(body, b"a" * 400)
        self.assertFalse(complete)
        await self.runtime.when_idle()

    async def test_silent_backend_is_aborted_after_the_idle_timeout(self):
        port = self.proxy(sse_script(2, 0.01, end="hang"), Program(stream_idle_timeout=0.3))
        client = await self.request(port, close=False)
        await client.lost
        _, _, body, complete = parse_response(client.data)
        self.assertEqual(body.count(b"data: "), 2)
        self.assertFalse(complete)
        await self.backend.exchanges[0].closed
        await self.runtime.when_idle()

    async def test_slow_client_pauses_the_backend(self):
        """A client that stops reading pauses the backend; it is not cut for the backend's
        silence meanwhile (the idle timeout is shorter than the pause)."""
        total = 64 * 1024 * 1024
        writers = []

        def script(exchange):
            writers.append(BulkWriter(exchange, total))
            writers[-1].start()

        port = self.proxy(script, Program(stream_idle_timeout=0.25))
        client = await self.request(port)
        await client.when_received(b"\r\n\r\n")
        client.transport.pauseProducing()
        writer = writers[0]
        previous = -1
        for _ in range(100):
            await _sleep(0.05)
            if writer.paused and writer.produced == previous:
                break
            previous = writer.produced
        self.assertTrue(writer.paused)
        self.assertGreater(writer.pauses, 0)
        self.assertLess(writer.produced, total // 2)
        await _sleep(0.4)
        client.transport.resumeProducing()
        await client.lost
        status, headers, body, complete = parse_response(client.data)
        self.assertEqual((status, complete, len(body)), (200, True, total))
        self.assertEqual(headers["content-length"], [str(total)])
        await self.runtime.when_idle()

    async def test_status_and_end_to_end_headers_pass_through(self):
        def script(exchange):
            request = exchange.request
            request.setResponseCode(418, b"Short And Stout")
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"X-Backend", b"yes")
            request.setHeader(b"Proxy-Authenticate", b"Basic")
            request.setHeader(b"Trailer", b"X-Checksum")
            request.write(b'{"teapot": true}')
            request.finish()

        port = self.proxy(script)
        client = await self.request(port)
        await client.lost
        status, headers, body, complete = parse_response(client.data)
        self.assertEqual((status, body, complete), (418, b'{"teapot": true}', True))
        self.assertIn(b"Short And Stout", client.data.split(b"\r\n")[0])
        self.assertEqual(headers["x-backend"], ["yes"])
        self.assertNotIn("proxy-authenticate", headers)
        self.assertNotIn("trailer", headers)
        self.assertNotIn("x-accel-buffering", headers)
        self.assertEqual(self.backend.exchanges[0].body, BODY)


class HeaderTests(SynchronousTestCase):
    def test_end_to_end_drops_hop_by_hop_and_connection_named(self):
        headers = Headers({
            b"Connection": [b"keep-alive, X-Private"], b"X-Private": [b"1"],
            b"Keep-Alive": [b"timeout=5"], b"Transfer-Encoding": [b"chunked"],
            b"Upgrade": [b"h2c"], b"TE": [b"trailers"], b"Host": [b"example"],
            b"X-Kept": [b"a", b"b"],
        })
        kept = end_to_end(headers, frozenset({b"host"}))
        self.assertEqual(dict(kept.getAllRawHeaders()), {b"X-Kept": [b"a", b"b"]})

    def test_event_stream_detection(self):
        self.assertTrue(is_event_stream([(b"Content-Type", b"Text/Event-Stream; x=1")]))
        self.assertFalse(is_event_stream([(b"content-type", b"application/json")]))
        self.assertFalse(is_event_stream([]))


def _sleep(seconds: float) -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
