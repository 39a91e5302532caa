"""The node's HTTP/1.1 server (L{llmnode.web.server}): what a client sees of keep-alive,
pipelining, framing, bodies, errors, dispatch and timeouts. Head limits are in test_limits."""

from __future__ import annotations

import json
from email.utils import parsedate_to_datetime

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llmnode.errors import NodeError
from llmnode.web.body import read_body
from llmnode.web.responses import render_error, render_json
from llmnode.web.server import NodeSite
from tests.support.net import (decode_chunked, http_client, http_request, listen_node,
                               parse_response, raw_connect)
from tests.test_limits import split_response

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Hello(Resource):
    """Answers C{ok:<path>} at once and keeps every request it saw."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen: list = []

    def render(self, request):
        self.seen.append(request)
        return b"ok:" + request.path


class Held(Resource):
    """Answers C{NOT_DONE_YET} and keeps the requests for the test to answer.

    @param notify: a clock; when given, each arrival is announced on it (never from inside
        C{render}) to the waiters of L{arrival}.
    """

    isLeaf = True

    def __init__(self, notify=None):
        super().__init__()
        self.pending: list = []
        self._notify = notify
        self._waiters: list = []

    def render(self, request):
        self.pending.append(request)
        if self._notify is not None:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                self._notify.callLater(0, waiter.callback, request)
        return NOT_DONE_YET

    def arrival(self) -> Deferred:
        """Fires with the next request to arrive."""
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        return waiter


def answer(request, body: bytes) -> None:
    """Finish a held request with C{body} and a Content-Length."""
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


class Later(Resource):
    """Answers C{done:<path>} C{delay} seconds later on C{clock}."""

    isLeaf = True

    def __init__(self, clock, delay: float):
        super().__init__()
        self.clock = clock
        self.delay = delay
        self.rendered: list = []

    def render(self, request):
        self.rendered.append(request.path)
        self.clock.callLater(self.delay, answer, request, b"done:" + request.path)
        return NOT_DONE_YET


class Upload(Resource):
    """Takes a POST body through L{read_body} with C{limit}; answers its length as JSON."""

    isLeaf = True

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.seen: list = []

    def render_POST(self, request):
        self.seen.append((request.raw_body, request.content.read()))
        try:
            body = read_body(request, self.limit)
        except NodeError as e:
            return render_error(request, e)
        return render_json(request, 200, {"bytes": len(body)})


class GetOnly(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"got"


class Broken(Resource):
    isLeaf = True

    def render(self, request):
        raise RuntimeError("resource exploded")


class BrokenMidway(Resource):
    isLeaf = True

    def render(self, request):
        request.write(b"partial")
        raise RuntimeError("resource exploded after writing")


class Status(Resource):
    """Answers C{code} with no body, through NOT_DONE_YET."""

    isLeaf = True

    def __init__(self, code: int):
        super().__init__()
        self.code = code

    def render(self, request):
        if request.path == b"/status":
            request.setResponseCode(self.code)
            request.finish()
            return NOT_DONE_YET
        return b"next"


def responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Every response in C{data}, for answers whose bodies do not contain a status line."""
    return [split_response(b"HTTP/1.1 " + part) for part in data.split(b"HTTP/1.1 ")[1:]]


def error_of(testcase, headers: dict, body: bytes) -> dict:
    """The C{error} object of an OpenAI-shaped JSON error body, checked for shape."""
    testcase.assertEqual(headers[b"content-type"], b"application/json")
    testcase.assertEqual(int(headers[b"content-length"]), len(body))
    error = json.loads(body)["error"]
    testcase.assertTrue({"message", "type", "param", "code"} <= set(error), error)
    testcase.assertIsInstance(error["message"], str)
    return error


class ChannelTests(SynchronousTestCase):
    """The server on an in-memory transport, timed by a Clock."""

    def connect(self, resource, clock=None, **options):
        self.clock = clock or Clock()
        self.site = NodeSite(resource, clock=self.clock, **options)
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        return channel, transport

    # -- persistence and order ----------------------------------------------------------------

    def test_two_requests_on_one_connection_are_both_answered(self):
        channel, transport = self.connect(Hello())
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.dataReceived(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = responses(transport.value())
        self.assertEqual([(status, body) for status, _, body in answers],
                         [(200, b"ok:/one"), (200, b"ok:/two")])
        self.assertNotIn(b"connection", answers[1][1])
        self.assertFalse(transport.disconnecting)

    def test_pipelined_requests_are_answered_in_order_one_at_a_time(self):
        resource = Later(Clock(), 1.0)
        channel, transport = self.connect(resource, resource.clock)
        channel.dataReceived(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(resource.rendered, [b"/first"])
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(1.0)
        self.assertEqual(resource.rendered, [b"/first", b"/second"])
        self.assertEqual([body for _, _, body in responses(transport.value())],
                         [b"done:/first"])
        self.clock.advance(1.0)
        self.assertEqual([body for _, _, body in responses(transport.value())],
                         [b"done:/first", b"done:/second"])
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(transport.disconnecting)

    def test_connection_close_is_answered_then_the_connection_ends(self):
        resource = Hello()
        channel, transport = self.connect(resource)
        channel.dataReceived(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                             b"GET /ignored HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = responses(transport.value())
        self.assertEqual([(status, body) for status, _, body in answers], [(200, b"ok:/last")])
        self.assertEqual(answers[0][1][b"connection"], b"close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual([r.path for r in resource.seen], [b"/last"])

    def test_a_request_after_connection_close_does_not_cut_the_answer_in_progress(self):
        resource = Held()
        channel, transport = self.connect(resource)
        channel.dataReceived(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [request] = resource.pending
        channel.dataReceived(b"GET /extra HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertFalse(transport.disconnecting)
        answer(request, b"the answer")
        answers = responses(transport.value())
        self.assertEqual([(status, body) for status, _, body in answers],
                         [(200, b"the answer")])
        self.assertEqual(answers[0][1][b"connection"], b"close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(resource.pending), 1)

    def test_an_http_1_0_request_gets_connection_close(self):
        channel, transport = self.connect(Hello())
        channel.dataReceived(b"GET /old HTTP/1.0\r\n\r\n")
        status, headers, body = split_response(transport.value())
        self.assertEqual((status, body), (200, b"ok:/old"))
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)

    # -- response framing ---------------------------------------------------------------------

    def test_a_response_of_unknown_length_is_chunked_on_http_1_1(self):
        resource = Held()
        channel, transport = self.connect(resource)
        channel.dataReceived(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        [request] = resource.pending
        request.write(b"data: one\n\n")
        request.write(b"")
        request.write(b"data: two\n\n")
        self.assertEqual(decode_chunked(transport.value()),
                         (b"data: one\n\ndata: two\n\n", False))
        request.finish()
        status, headers, body, complete = parse_response(transport.value())
        self.assertEqual(status, 200)
        self.assertEqual(headers["transfer-encoding"], ["chunked"])
        self.assertNotIn("content-length", headers)
        self.assertEqual((body, complete), (b"data: one\n\ndata: two\n\n", True))
        self.assertTrue(transport.value().endswith(b"0\r\n\r\n"))
        self.assertFalse(transport.disconnecting)

    def test_a_response_of_unknown_length_ends_with_the_connection_on_http_1_0(self):
        resource = Held()
        channel, transport = self.connect(resource)
        channel.dataReceived(b"GET /stream HTTP/1.0\r\n\r\n")
        [request] = resource.pending
        request.write(b"part one, ")
        request.write(b"part two")
        self.assertFalse(transport.disconnecting)
        request.finish()
        status, headers, body = split_response(transport.value())
        self.assertEqual((status, body), (200, b"part one, part two"))
        self.assertNotIn(b"transfer-encoding", headers)
        self.assertNotIn(b"content-length", headers)
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)

    def test_a_kept_alive_http_1_0_response_of_unknown_length_still_ends_the_connection(self):
        resource = Held()
        channel, transport = self.connect(resource)
        channel.dataReceived(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        [request] = resource.pending
        request.write(b"body")
        request.finish()
        status, headers, body = split_response(transport.value())
        self.assertEqual((body, headers[b"connection"]), (b"body", b"close"))
        self.assertTrue(transport.disconnecting)

    def test_head_gets_the_headers_with_content_length_and_no_body(self):
        channel, transport = self.connect(Hello())
        channel.dataReceived(b"HEAD /thing HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, rest = transport.value().partition(b"\r\n\r\n")
        status, headers, _ = split_response(head + b"\r\n\r\n")
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-length"], b"%d" % len(b"ok:/thing"))
        self.assertTrue(rest.startswith(b"HTTP/1.1 200"), rest)
        self.assertEqual(split_response(rest)[2], b"ok:/after")

    def test_head_on_a_get_only_resource_is_answered_like_get_without_body(self):
        channel, transport = self.connect(GetOnly())
        channel.dataReceived(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = split_response(transport.value())
        self.assertEqual((status, headers[b"content-length"], body), (200, b"3", b""))

    def test_a_bodiless_status_is_not_chunked(self):
        channel, transport = self.connect(Status(204))
        channel.dataReceived(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        data = transport.value()
        first, _, rest = data.partition(b"\r\n\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 204"))
        self.assertNotIn(b"transfer-encoding", first.lower())
        self.assertTrue(rest.startswith(b"HTTP/1.1 200"), rest)
        self.assertEqual(split_response(rest)[2], b"next")

    def test_every_response_carries_a_date(self):
        channel, transport = self.connect(Hello())
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _, headers, _ = split_response(transport.value())
        date = parsedate_to_datetime(headers[b"date"].decode("ascii"))
        self.assertEqual(date.utcoffset().total_seconds(), 0)
        self.assertGreater(date.year, 2000)

    def test_a_header_value_cannot_break_into_a_new_header(self):
        class Echo(Resource):
            isLeaf = True

            def render(self, request):
                request.setHeader(b"X-Echo", request.args[b"v"][0])
                return b"ok"

        channel, transport = self.connect(Echo())
        channel.dataReceived(b"GET /?v=a%0d%0aSet-Cookie:%20x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = split_response(transport.value())
        self.assertEqual((status, body), (200, b"ok"))
        self.assertNotIn(b"set-cookie", headers)
        self.assertEqual(headers[b"x-echo"], b"a Set-Cookie: x=1")

    # -- request bodies -----------------------------------------------------------------------

    def test_a_chunked_request_body_reaches_the_resource_intact(self):
        resource = Upload(limit=1 << 20)
        channel, transport = self.connect(resource, max_body_bytes=1 << 20)
        body = bytes(range(256)) * 700
        request = http_request("POST", "/up", body, chunked=True)
        for i in range(0, len(request), 1000):
            channel.dataReceived(request[i:i + 1000])
        self.assertEqual(resource.seen, [(body, body)])
        status, _, answer_body = split_response(transport.value())
        self.assertEqual((status, json.loads(answer_body)), (200, {"bytes": len(body)}))

    def test_expect_100_continue_is_answered_before_the_final_answer(self):
        resource = Upload(limit=1000)
        channel, transport = self.connect(resource, max_body_bytes=1000)
        channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                             b"Expect: 100-continue\r\n\r\n")
        self.assertEqual(transport.value(), CONTINUE)
        channel.dataReceived(b"hello")
        interim, final = transport.value().split(b"\r\n\r\n", 1)
        self.assertEqual(interim, b"HTTP/1.1 100 Continue")
        status, _, body = split_response(final)
        self.assertEqual((status, json.loads(body)), (200, {"bytes": 5}))

    def test_expect_100_continue_with_a_body_over_the_limit_gets_413_at_once(self):
        resource = Upload(limit=1000)
        channel, transport = self.connect(resource, max_body_bytes=1000)
        channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                             b"Expect: 100-continue\r\n\r\n")
        self.assertNotIn(b"100 Continue", transport.value())
        status, headers, body = split_response(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(error_of(self, headers, body)["code"], "request_too_large")

    def test_a_declared_body_over_the_limit_is_answered_413_before_it_is_sent(self):
        resource = Upload(limit=1000)
        channel, transport = self.connect(resource, max_body_bytes=1000)
        channel.dataReceived(http_request("POST", "/up", b"x" * 5000)[:-5000])
        [(status, headers, body)] = responses(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(error_of(self, headers, body)["code"], "request_too_large")
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)
        answered = transport.value()
        channel.dataReceived(b"x" * 5000 + http_request("POST", "/up", b"y" * 10))
        self.assertEqual(transport.value(), answered, "nothing after the refusal is read")
        self.assertEqual(resource.seen, [])

    def test_a_chunked_body_is_answered_413_once_it_grows_over_the_limit(self):
        resource = Upload(limit=1000)
        channel, transport = self.connect(resource, max_body_bytes=1000)
        channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                             b"\r\n\r\n")
        for _ in range(3):
            channel.dataReceived(b"100\r\n" + b"z" * 256 + b"\r\n")
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"100\r\n" + b"z" * 256 + b"\r\n")
        status, headers, body = split_response(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(error_of(self, headers, body)["type"], "invalid_request_error")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(resource.seen, [])

    def test_a_body_the_root_refuses_from_its_head_is_answered_before_it_is_read(self):
        class Guarded(Upload):
            def refuse_early(self, request):
                if request.getHeader(b"Authorization") != b"Bearer k":
                    return NodeError("no key"), b"WWW-Authenticate: Bearer\r\n"
                return None

        resource = Guarded(limit=1000)
        channel, transport = self.connect(resource)
        channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                             b"\r\n\r\n")
        status, headers, body = split_response(transport.value())
        self.assertEqual(status, 500)
        self.assertEqual(headers[b"www-authenticate"], b"Bearer")
        self.assertEqual(error_of(self, headers, body)["message"], "no key")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(resource.seen, [])

    def test_a_body_with_the_key_is_read_and_served(self):
        class Guarded(Upload):
            def refuse_early(self, request):
                return None if request.getHeader(b"Authorization") == b"Bearer k" else (
                    NodeError("no key"), b"")

        resource = Guarded(limit=1000)
        channel, transport = self.connect(resource)
        channel.dataReceived(http_request("POST", "/up", b"abc",
                                          headers={"Authorization": "Bearer k"}))
        channel.dataReceived(http_request("POST", "/up", b""))
        self.assertEqual([status for status, _, _ in responses(transport.value())], [200, 200])
        self.assertEqual([seen[0] for seen in resource.seen], [b"abc", b""])

    # -- errors -------------------------------------------------------------------------------

    def test_malformed_http_gets_400_json_and_the_connection_ends(self):
        resource = Hello()
        channel, transport = self.connect(resource)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost x\r\n\r\n")
        status, headers, body = split_response(transport.value())
        self.assertEqual(status, 400)
        self.assertEqual(error_of(self, headers, body)["type"], "invalid_request_error")
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(resource.seen, [])

    def test_a_bad_request_after_a_good_one_leaves_the_good_answer_alone(self):
        channel, transport = self.connect(Hello())
        channel.dataReceived(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02 nonsense\r\n\r\n")
        [(first, _, body), (second, headers, error_body)] = responses(transport.value())
        self.assertEqual((first, body, second), (200, b"ok:/fine", 400))
        error_of(self, headers, error_body)
        self.assertTrue(transport.disconnecting)

    def test_an_upgrade_request_gets_exactly_one_answer(self):
        """A server may ignore C{Upgrade} (RFC 9110 7.8); clients such as C{curl --http2}
        send C{Upgrade: h2c} on every plain-HTTP request and expect HTTP/1.1 back."""
        channel, transport = self.connect(Hello())
        channel.dataReceived(b"GET /models HTTP/1.1\r\nHost: x\r\n"
                             b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                             b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        answers = responses(transport.value())
        self.assertEqual([(status, body) for status, _, body in answers],
                         [(200, b"ok:/models")])

    def test_a_resource_that_raises_gets_500_json_and_is_logged(self):
        channel, transport = self.connect(Broken())
        channel.dataReceived(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = split_response(transport.value())
        self.assertEqual(status, 500)
        error = error_of(self, headers, body)
        self.assertEqual(error["type"], "server_error")
        self.assertNotIn("exploded", error["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(transport.disconnecting)

    def test_a_resource_that_raises_after_writing_has_its_connection_closed(self):
        channel, transport = self.connect(BrokenMidway())
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(split_response(transport.value())[0], 200)
        self.assertEqual(decode_chunked(transport.value()), (b"partial", False))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_method_the_resource_lacks_gets_405_json_with_allow(self):
        channel, transport = self.connect(GetOnly())
        channel.dataReceived(http_request("POST", "/only-get", b"{}"))
        status, headers, body = split_response(transport.value())
        self.assertEqual(status, 405)
        error = error_of(self, headers, body)
        self.assertIn("POST", error["message"])
        self.assertIn(b"allow", headers)
        allowed = {name.strip() for name in headers[b"allow"].split(b",")}
        self.assertIn(b"GET", allowed)
        self.assertNotIn(b"POST", allowed)
        self.assertEqual(self.flushLoggedErrors(), [])

    # -- dispatch -----------------------------------------------------------------------------

    def test_query_arguments_reach_the_resource(self):
        resource = Hello()
        channel, transport = self.connect(resource)
        channel.dataReceived(b"GET /x?wait=false&a=1&a=2&empty= HTTP/1.1\r\nHost: x\r\n\r\n")
        [request] = resource.seen
        self.assertEqual(request.args,
                         {b"wait": [b"false"], b"a": [b"1", b"2"], b"empty": [b""]})
        self.assertEqual(request.path, b"/x")
        self.assertEqual(split_response(transport.value())[2], b"ok:/x")

    def test_percent_encoded_path_segments_are_unquoted_for_children(self):
        root = Resource()
        leaf = Hello()
        root.putChild(b"files", leaf)
        channel, transport = self.connect(root)
        channel.dataReceived(b"GET /files/org%2Fmodel/a%20b HTTP/1.1\r\nHost: x\r\n\r\n")
        [request] = leaf.seen
        self.assertEqual(request.prepath, [b"files"])
        self.assertEqual(request.postpath, [b"org/model", b"a b"])
        self.assertEqual(split_response(transport.value())[0], 200)

    # -- the end of a response ----------------------------------------------------------------

    def test_notify_finish_fires_when_the_response_is_finished(self):
        resource = Held()
        channel, transport = self.connect(resource)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        [request] = resource.pending
        finished = request.notifyFinish()
        self.assertNoResult(finished)
        answer(request, b"done")
        self.assertIsNone(self.successResultOf(finished))

    def test_notify_finish_fails_when_the_client_leaves_mid_response(self):
        resource = Held()
        channel, transport = self.connect(resource)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /queued HTTP/1.1\r\nHost: x\r\n\r\n")
        [request] = resource.pending
        finished = request.notifyFinish()
        request.write(b"some")
        channel.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(finished, ConnectionLost)
        sent = transport.value()
        request.write(b"more")
        request.finish()
        self.assertEqual(transport.value(), sent)
        self.assertEqual(len(resource.pending), 1)
        self.failureResultOf(request.notifyFinish(), ConnectionLost)

    def test_the_idle_timeout_never_cuts_a_response_in_progress(self):
        resource = Held()
        channel, transport = self.connect(resource, idle_timeout=5)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        [request] = resource.pending
        for _ in range(6):
            self.clock.advance(5)
        self.assertFalse(transport.disconnecting)
        answer(request, b"slow but complete")
        status, _, body = split_response(transport.value())
        self.assertEqual((status, body), (200, b"slow but complete"))
        self.assertFalse(transport.disconnecting)
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)


class SocketTests(TestCase):
    """The server on real sockets."""

    timeout = 20

    async def test_keep_alive_serves_requests_one_after_another(self):
        resource = Hello()
        site, port = listen_node(self, resource)
        client = await raw_connect(self, port)
        client.transport.write(http_request("GET", "/one"))
        await client.when_received(b"ok:/one")
        client.transport.write(http_request("GET", "/two"))
        await client.when_received(b"ok:/two")
        self.assertTrue(client.connected_)
        self.assertEqual([(s, b) for s, _, b in responses(client.data)],
                         [(200, b"ok:/one"), (200, b"ok:/two")])

    async def test_pipelined_requests_wait_for_the_one_in_progress(self):
        resource = Held(notify=reactor)
        site, port = listen_node(self, resource)
        client = await raw_connect(self, port)
        first = resource.arrival()
        client.transport.write(http_request("GET", "/first") + http_request("GET", "/second"))
        request = await first
        self.assertEqual((len(resource.pending), client.data), (1, b""))
        second = resource.arrival()
        answer(request, b"first answer")
        request = await second
        answer(request, b"second answer")
        await client.when_received(b"second answer")
        self.assertEqual([b for _, _, b in responses(client.data)],
                         [b"first answer", b"second answer"])
        self.assertTrue(client.connected_)

    async def test_connection_close_ends_the_connection_after_the_answer(self):
        site, port = listen_node(self, Hello())
        client = await raw_connect(self, port)
        client.transport.write(http_request("GET", "/bye", headers={"Connection": "close"}))
        await client.lost
        status, headers, body, complete = parse_response(client.data)
        self.assertEqual((status, body, complete), (200, b"ok:/bye", True))
        self.assertEqual(headers["connection"], ["close"])

    async def test_an_http_1_0_client_reads_a_stream_to_the_end_of_the_connection(self):
        resource = Held(notify=reactor)
        site, port = listen_node(self, resource)
        client = await raw_connect(self, port)
        arrived = resource.arrival()
        client.transport.write(b"GET /stream HTTP/1.0\r\n\r\n")
        request = await arrived
        request.write(b"first part ")
        await client.when_received(b"first part")
        self.assertTrue(client.connected_)
        request.write(b"last part")
        request.finish()
        await client.lost
        status, headers, body, _ = parse_response(client.data)
        self.assertEqual((status, body), (200, b"first part last part"))
        self.assertEqual(headers["connection"], ["close"])

    async def test_no_100_continue_follows_a_final_answer(self):
        """The body may come with the head; a C{100 Continue} is then optional, but one
        sent after the final answer would be read as the answer to the next request."""
        resource = Upload(limit=1000)
        site, port = listen_node(self, resource, max_body_bytes=1000)
        client = await raw_connect(self, port)
        client.transport.write(http_request("POST", "/up", b"hello",
                                            headers={"Expect": "100-continue"}))
        await client.when_received(b'{"bytes": 5}')
        client.transport.write(http_request("POST", "/up", b"hello again"))
        await client.when_received(b'{"bytes": 11}')
        data = client.data
        if data.startswith(CONTINUE):
            data = data[len(CONTINUE):]
        self.assertNotIn(b"100 Continue", data)
        self.assertEqual([(status, json.loads(body)) for status, _, body in responses(data)],
                         [(200, {"bytes": 5}), (200, {"bytes": 11})])

    async def test_expect_100_continue_then_the_body(self):
        resource = Upload(limit=1000)
        site, port = listen_node(self, resource, max_body_bytes=1000)
        client = await raw_connect(self, port)
        request = http_request("POST", "/up", b"hello", headers={"Expect": "100-continue"})
        head, _, body = request.partition(b"\r\n\r\n")
        client.transport.write(head + b"\r\n\r\n")
        await client.when_received(CONTINUE)
        client.transport.write(body)
        await client.when_received(b'{"bytes": 5}')
        self.assertEqual(resource.seen, [(b"hello", b"hello")])

    async def test_a_body_over_the_limit_gets_413_before_the_client_sent_it(self):
        resource = Upload(limit=4096)
        site, port = listen_node(self, resource, max_body_bytes=4096)
        client = await raw_connect(self, port)
        client.transport.write(b"POST /up HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: 314572800\r\n\r\n" + b"q" * 1000)
        await client.lost
        status, headers, body, complete = parse_response(client.data)
        self.assertEqual(status, 413)
        self.assertTrue(complete)
        self.assertEqual(json.loads(body)["error"]["code"], "request_too_large")
        self.assertEqual(resource.seen, [])

    async def test_errors_over_treq_are_json(self):
        root = Resource()
        root.putChild(b"broken", Broken())
        root.putChild(b"get-only", GetOnly())
        site, port = listen_node(self, root)
        http = http_client(self)
        response = await http.get(f"http://127.0.0.1:{port}/broken")
        self.assertEqual(response.code, 500)
        self.assertEqual(json.loads(await response.content())["error"]["type"], "server_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        response = await http.delete(f"http://127.0.0.1:{port}/get-only")
        self.assertEqual(response.code, 405)
        self.assertIn("DELETE", json.loads(await response.content())["error"]["message"])
        self.assertTrue(response.headers.hasHeader(b"Allow"))

    async def test_notify_finish_fails_when_the_client_aborts(self):
        resource = Held(notify=reactor)
        site, port = listen_node(self, resource)
        client = await raw_connect(self, port)
        arrived = resource.arrival()
        client.transport.write(http_request("GET", "/wait"))
        request = await arrived
        finished = request.notifyFinish()
        client.transport.abortConnection()
        with self.assertRaises(ConnectionLost):
            await finished
        self.assertEqual(site.channels, set())

    async def test_close_all_aborts_open_connections_and_fires(self):
        resource = Held(notify=reactor)
        site, port = listen_node(self, resource)
        idle = await raw_connect(self, port)
        busy = await raw_connect(self, port)
        arrived = resource.arrival()
        busy.transport.write(http_request("GET", "/wait"))
        request = await arrived
        finished = request.notifyFinish()
        self.assertEqual(len(site.channels), 2)
        await site.close_all()
        self.assertEqual(site.channels, set())
        await idle.lost
        await busy.lost
        self.assertEqual(busy.data, b"")
        with self.assertRaises(ConnectionLost):
            await finished
