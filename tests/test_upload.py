"""Uploads streamed to the backend as they arrive: the body stream and its backpressure."""

from __future__ import annotations

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmnode.web.multipart import leading_fields
from llmnode.web.upload import BodyAbandoned, BodyStream
from tests.test_endpoints import BOUNDARY, form


class Transport:
    """The client connection: whether reading from it is paused."""

    def __init__(self):
        self.paused = False
        self.pauses = 0

    def pauseProducing(self):
        assert not self.paused, "paused twice"
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        assert self.paused, "resumed while reading"
        self.paused = False


class Consumer:
    """The backend request's body consumer."""

    def __init__(self):
        self.data = []

    def write(self, data):
        self.data.append(data)


class BodyStreamTests(SynchronousTestCase):
    def setUp(self):
        self.transport = Transport()
        self.stream = BodyStream(self.transport, 100)
        self.told = []
        self.stream.watch(lambda: self.told.append(self.stream.held()))

    def test_held_until_consumed_then_relayed_as_it_arrives(self):
        self.stream.received(b"ab")
        self.stream.received(b"cd")
        self.assertEqual(self.told, [b"ab", b"abcd"])
        consumer = Consumer()
        done = self.stream.startProducing(consumer)
        self.stream.received(b"ef")
        self.assertEqual(consumer.data, [b"abcd", b"ef"])
        self.assertNoResult(done)
        self.stream.completed()
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(len(self.told), 2)

    def test_an_edited_beginning_changes_the_length(self):
        self.stream.received(b"model=a")
        self.stream.replace_held(b"model=abc")
        self.assertEqual(self.stream.length, 102)
        self.stream.completed()
        consumer = Consumer()
        self.successResultOf(self.stream.startProducing(consumer))
        self.assertEqual(consumer.data, [b"model=abc"])

    def test_reading_pauses_while_too_much_is_held_or_the_backend_is_full(self):
        self.stream.received(b"x" * 10)
        self.stream.hold_at_most(8)
        self.assertTrue(self.transport.paused)
        consumer = Consumer()
        self.stream.startProducing(consumer)
        self.assertFalse(self.transport.paused)
        self.stream.pauseProducing()
        self.assertTrue(self.transport.paused)
        self.stream.pauseProducing()
        self.stream.resumeProducing()
        self.assertFalse(self.transport.paused)
        self.stream.resumeProducing()
        self.assertEqual(self.transport.pauses, 2)

    def test_a_completed_body_lets_reading_go_on(self):
        consumer = Consumer()
        self.stream.startProducing(consumer)
        self.stream.received(b"last bytes")
        self.stream.pauseProducing()
        self.stream.completed()
        self.assertFalse(self.transport.paused)
        self.stream.resumeProducing()
        self.assertFalse(self.transport.paused)

    def test_a_client_that_leaves_fails_the_body(self):
        consumer = Consumer()
        done = self.stream.startProducing(consumer)
        self.stream.received(b"part")
        self.stream.lost(Failure(ConnectionLost()))
        self.failureResultOf(done, ConnectionLost)

    def test_a_backend_that_stops_reading_drops_the_rest_and_reading_goes_on(self):
        consumer = Consumer()
        done = self.stream.startProducing(consumer)
        self.stream.pauseProducing()
        self.stream.stopProducing()
        self.failureResultOf(done, BodyAbandoned)
        self.assertFalse(self.transport.paused)
        self.stream.received(b"late")
        self.assertEqual(consumer.data, [])


class LeadingFieldsTests(SynchronousTestCase):
    def test_fields_before_the_file_are_known_from_the_first_bytes(self):
        body = form({"model": "whisper", "language": "en", "file": ("a.wav", b"\0" * 1000)})
        names = frozenset({b"model", b"stream"})
        found = [leading_fields(body[:cut], BOUNDARY.encode(), names)
                 for cut in range(len(body) + 1)]
        first = next(cut for cut, fields in enumerate(found) if b"model" in fields)
        self.assertLess(first, len(body) - 1000)
        start, end = found[-1][b"model"]
        self.assertEqual(body[start:end], b"whisper")
        self.assertEqual(found[first], found[-1])
