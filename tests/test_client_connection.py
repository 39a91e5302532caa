"""The backend connection's state machine (L{llmnode.web.client._Connection}), driven over a
C{StringTransport}: the agent's connect goes to a C{MemoryReactor}, the backend's bytes are
fed by hand, so every move is seen in order and no socket is opened."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from llmnode.lifecycle import InvalidTransition
from llmnode.web.client import (AWAITING_HEAD, CLOSED, CLOSING, COMPLETE, CONNECTING,
                                CONNECTION_MOVES, IDLE, READING_BODY, BackendAgent,
                                ConnectionState)

URL = b"http://127.0.0.1:8000/v1/models"
KEY = ("127.0.0.1", 8000)


class Body(Protocol):
    """Collects a response body and the reason it ended; C{on_data} runs on each read."""

    def __init__(self, on_data=None):
        self.data = b""
        self.reason = None
        self._on_data = on_data

    def dataReceived(self, data):
        self.data += data
        if self._on_data is not None:
            self._on_data(self)

    def connectionLost(self, reason):
        self.reason = reason


class ConnectionStateTests(SynchronousTestCase):

    def setUp(self):
        self.reactor = MemoryReactor()
        self.agent = BackendAgent(self.reactor)
        self.moves: list[tuple[ConnectionState, ConnectionState]] = []

    def watch(self, connection, old, new):
        """The on_move hook: records the move, and fails the test on one outside the table."""
        if new not in CONNECTION_MOVES[old]:
            self.fail(f"an illegal move was made: {old} -> {new}")
        self.moves.append((old, new))

    def connect(self, method=b"GET", watch=True):
        """Ask the agent for C{method} on a new connection; return the response's Deferred,
        the connection (made: the request is written) and its transport."""
        d = self.agent.request(method, URL)
        host, port, factory, timeout, bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), KEY)
        connection = factory.buildProtocol(None)
        self.assertIs(connection.state, CONNECTING)
        if watch:
            connection.on_move = self.watch
        transport = StringTransport()
        connection.makeConnection(transport)
        return d, connection, transport

    def response(self, d):
        return self.successResultOf(d)

    def body(self, response, on_data=None):
        body = Body(on_data)
        response.deliverBody(body)
        return body

    def pooled(self):
        return self.agent._idle.get(KEY, [])

    def test_keep_alive_response_returns_connection_to_idle_and_the_pool(self):
        d, connection, transport = self.connect()
        self.assertEqual(connection.state, AWAITING_HEAD)
        self.assertTrue(transport.value().startswith(b"GET /v1/models HTTP/1.1\r\n"))
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        response = self.response(d)
        body = self.body(response)
        self.assertEqual((response.code, body.data), (200, b"hello"))
        body.reason.trap(ResponseDone)
        self.assertEqual(self.moves, [(CONNECTING, AWAITING_HEAD),
                                      (AWAITING_HEAD, READING_BODY),
                                      (READING_BODY, COMPLETE),
                                      (COMPLETE, IDLE)])
        self.assertEqual(self.pooled(), [connection])
        self.assertFalse(transport.disconnecting)

        # The next request goes on the same connection: no new connect.
        transport.clear()
        second = self.agent.request(b"GET", URL)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertIs(connection.state, AWAITING_HEAD)
        self.assertEqual(self.pooled(), [])
        self.assertTrue(transport.value().startswith(b"GET /v1/models HTTP/1.1\r\n"))
        connection.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.response(second).code, 204)
        self.assertIs(connection.state, IDLE)

    def test_unwatched_connection_makes_the_same_moves(self):
        # No hook: the moves every request makes take their fast path, to the same states.
        d, connection, transport = self.connect(watch=False)
        self.assertIs(connection.state, AWAITING_HEAD)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
        self.assertIs(connection.state, READING_BODY)
        body = self.body(self.response(d))
        connection.dataReceived(b"llo")
        self.assertIs(connection.state, IDLE)
        self.assertEqual(body.data, b"hello")
        body.reason.trap(ResponseDone)
        self.assertEqual(self.pooled(), [connection])

    def test_body_over_several_reads(self):
        d, connection, transport = self.connect()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        response = self.response(d)
        self.assertIs(connection.state, READING_BODY)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        body = self.body(response)
        connection.dataReceived(b"3\r\nabc\r\n")
        self.assertIs(connection.state, READING_BODY)
        self.assertIsNone(body.reason)
        connection.dataReceived(b"0\r\n\r\n")
        self.assertEqual(body.data, b"abc")
        body.reason.trap(ResponseDone)
        self.assertEqual(self.moves[-2:], [(READING_BODY, COMPLETE), (COMPLETE, IDLE)])

    def test_connection_close_response_ends_closed(self):
        d, connection, transport = self.connect()
        lost = connection.when_lost()
        connection.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        body = self.body(self.response(d))
        body.reason.trap(ResponseDone)
        self.assertIs(connection.state, CLOSING)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pooled(), [])
        self.assertNoResult(lost)
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertIs(connection.state, CLOSED)
        self.successResultOf(lost)
        self.successResultOf(connection.when_lost())
        self.assertEqual(self.moves[-2:], [(COMPLETE, CLOSING), (CLOSING, CLOSED)])

    def test_backend_closing_mid_body_fails_the_response(self):
        d, connection, transport = self.connect()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
        body = self.body(self.response(d))
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertIs(connection.state, CLOSED)
        self.assertEqual(body.data, b"hel")
        body.reason.trap(ResponseFailed)
        self.assertEqual(self.moves[-1], (READING_BODY, CLOSED))
        self.assertEqual(self.pooled(), [])

    def test_backend_closing_a_body_without_length_may_have_lost_data(self):
        d, connection, transport = self.connect()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhel")
        body = self.body(self.response(d))
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(body.data, b"hel")
        body.reason.trap(PotentialDataLoss)

    def test_backend_closing_before_answering_fails_the_request(self):
        d, connection, transport = self.connect()
        connection.connectionLost(Failure(ConnectionLost()))
        self.assertIs(connection.state, CLOSED)
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.moves, [(CONNECTING, AWAITING_HEAD), (AWAITING_HEAD, CLOSED)])

    def test_response_without_a_request_is_refused(self):
        d, connection, transport = self.connect()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertIs(connection.state, IDLE)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertIs(connection.state, CLOSING)
        self.assertTrue(transport.disconnected)  # aborted
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.moves[-2:], [(IDLE, CLOSING), (CLOSING, CLOSED)])
        self.assertEqual(self.pooled(), [])  # a lost idle connection leaves the pool

    def test_second_response_in_the_same_read_is_refused(self):
        d, connection, transport = self.connect()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
                                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
        body = self.body(self.response(d))
        self.assertEqual(body.data, b"a")
        body.reason.trap(ResponseDone)
        self.assertIs(connection.state, CLOSING)  # not reused
        self.assertEqual(self.pooled(), [])

    def test_unparsable_answer_fails_the_request(self):
        d, connection, transport = self.connect()
        connection.dataReceived(b"NOT HTTP AT ALL\r\n\r\n")
        self.failureResultOf(d, ResponseFailed)
        self.assertIs(connection.state, CLOSING)
        self.assertTrue(transport.disconnected)

    def test_informational_answer_is_skipped(self):
        d, connection, transport = self.connect()
        connection.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertIs(connection.state, AWAITING_HEAD)
        self.assertNoResult(d)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.response(d).code, 200)
        self.assertIs(connection.state, IDLE)

    def test_head_answer_has_no_body_and_is_not_reused(self):
        d, connection, transport = self.connect(b"HEAD")
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n")
        self.assertEqual(self.response(d).length, 0)
        self.assertEqual(self.moves[1:], [(AWAITING_HEAD, COMPLETE), (COMPLETE, CLOSING)])

    def test_cancelled_request_aborts_its_connection(self):
        d, connection, transport = self.connect()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertIs(connection.state, CLOSING)
        self.assertTrue(transport.disconnected)
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertIs(connection.state, CLOSED)

    def test_request_cancelled_while_connecting_leaves_an_idle_connection(self):
        d = self.agent.request(b"GET", URL)
        factory = self.reactor.tcpClients[-1][2]
        connection = factory.buildProtocol(None)
        d.cancel()  # stops the (fake) connector; the connection was made all the same
        self.failureResultOf(d, CancelledError)
        connection.on_move = self.watch
        transport = StringTransport()
        connection.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.moves, [(CONNECTING, IDLE)])
        self.assertEqual(self.pooled(), [connection])

    def test_reader_stopping_a_body_that_completes_in_the_same_read(self):
        d, connection, transport = self.connect()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        body = self.body(self.response(d), on_data=lambda b: b.transport.stopProducing())
        connection.dataReceived(b"hello")
        # All of it came in the read the reader stopped it in: it ends complete.
        self.assertEqual(body.data, b"hello")
        body.reason.trap(ResponseDone)
        self.assertIs(connection.state, CLOSING)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.pooled(), [])
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.moves[-2:], [(READING_BODY, CLOSING), (CLOSING, CLOSED)])

    def test_reader_stopping_a_body_mid_way_fails_it_when_the_connection_is_lost(self):
        d, connection, transport = self.connect()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        body = self.body(self.response(d), on_data=lambda b: b.transport.stopProducing())
        connection.dataReceived(b"hel")
        self.assertIs(connection.state, CLOSING)
        self.assertIsNone(body.reason)
        connection.connectionLost(Failure(ConnectionLost()))
        body.reason.trap(ResponseFailed)

    def test_closed_agent_closes_connections_that_turn_idle(self):
        d, connection, transport = self.connect()
        closed = self.agent.closeCachedConnections()
        self.successResultOf(closed)  # nothing idle yet
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.moves[-2:], [(COMPLETE, IDLE), (IDLE, CLOSING)])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pooled(), [])

    def test_closing_the_pool_closes_idle_connections(self):
        d, connection, transport = self.connect()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        closed = self.agent.closeCachedConnections()
        self.assertIs(connection.state, CLOSING)
        self.assertNoResult(closed)
        connection.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)


class IllegalMoveTests(SynchronousTestCase):
    """A move the table lacks raises, whoever asks for it, and the hook never sees it."""

    def setUp(self):
        self.reactor = MemoryReactor()
        self.agent = BackendAgent(self.reactor)
        self.moves = []

    def connection(self):
        self.answer = self.agent.request(b"GET", URL)
        connection = self.reactor.tcpClients[-1][2].buildProtocol(None)
        connection.on_move = lambda c, old, new: self.moves.append((old, new))
        return connection

    def test_table_covers_every_state_and_only_closed_is_final(self):
        self.assertEqual(set(CONNECTION_MOVES), set(ConnectionState))
        for state, targets in CONNECTION_MOVES.items():
            self.assertNotIn(state, targets)
            self.assertEqual(bool(targets), state is not CLOSED, state)
            if state is not CLOSED:
                self.assertIn(CLOSED, targets)  # a connection can be lost in any state

    def test_illegal_moves_raise(self):
        connection = self.connection()
        for new in set(ConnectionState) - CONNECTION_MOVES[CONNECTING]:
            self.assertRaises(InvalidTransition, connection._move, new)
        self.assertIs(connection.state, CONNECTING)
        self.assertEqual(self.moves, [])

    def test_sending_on_a_lost_connection_raises(self):
        connection = self.connection()
        connection.makeConnection(StringTransport())
        connection.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(self.answer, ResponseNeverReceived)  # its request was sent
        request = self.reactor.tcpClients[-1][2]._request
        self.assertRaises(InvalidTransition, connection.send, request)
        self.assertIs(connection.state, CLOSED)
        self.assertRaises(InvalidTransition, connection.close)
        connection.abort()  # a lost connection needs no abort: nothing happens

    def test_sending_on_a_busy_connection_raises_also_without_a_hook(self):
        connection = self.connection()
        connection.on_move = None
        connection.makeConnection(StringTransport())
        request = self.reactor.tcpClients[-1][2]._request
        self.assertIs(connection.state, AWAITING_HEAD)
        self.assertRaises(InvalidTransition, connection.send, request)
        self.assertIs(connection.state, AWAITING_HEAD)
