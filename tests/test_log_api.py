"""Logs over HTTP: a model's log file and the node's own log, their tails and followers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmnode.config import Program
from llmnode.launcher import ModelLog
from llmnode.launcher.logfile import last_lines
from llmnode.logs import LogBuffer
from llmnode.web.logs import LogResource, LogStream
from llmnode.web.server import NodeSite
from tests.support.memory import MemoryNet, memory_model, start_memory_node
from tests.support.net import (RawClient, http_client, http_request, parse_response,
                               raw_connect)
from tests.support.nodes import base_url, demo_model, free_port, start_node
from tests.support.requests import MemoryRequest


def temporary_folder(testcase) -> str:
    folder = tempfile.mkdtemp(prefix="llmnode-logs-")
    testcase.addCleanup(shutil.rmtree, folder, True)
    return folder


class ModelLogReadingTests(SynchronousTestCase):
    """A model's log file read back and followed."""

    def setUp(self):
        self.path = os.path.join(temporary_folder(self), "m.log")

    def test_lines_are_read_back_with_their_timestamps_across_a_rotation(self):
        log = ModelLog(self.path, max_bytes=400, clock=lambda: 1_700_000_000.0)
        self.addCleanup(log.close)
        log.write(b"".join(b"line %d\n" % i for i in range(20)))
        self.assertTrue(os.path.exists(self.path + ".1"))
        found = log.lines(12)
        self.assertEqual([line.split(" ", 1)[1] for line in found],
                         [f"line {i}" for i in range(8, 20)])
        self.assertTrue(found[0].startswith("2023-11-14T"))
        self.assertEqual(log.lines(0), [])

    def test_last_lines_of_a_long_file(self):
        with open(self.path, "wb") as f:
            f.write(b"".join(b"%06d\n" % i for i in range(100_000)) + b"unfinished")
        self.assertEqual(last_lines(self.path, 3), ["099998", "099999", "unfinished"])
        self.assertEqual(len(last_lines(self.path, 20_000)), 20_000)
        self.assertEqual(last_lines(self.path + ".missing", 5), [])

    def test_followers_get_new_lines_until_they_stop(self):
        log = ModelLog(self.path, clock=lambda: 1_700_000_000.0)
        self.addCleanup(log.close)
        log.write(b"before\n")
        seen, broken = [], []
        stop = log.follow(seen.extend)
        log.follow(lambda lines: broken.append(1 / 0))
        log.write(b"one\ntwo\npartial")
        stop()
        log.write(b"\nthree\n")
        self.assertEqual([line.split(" ", 1)[1] for line in seen], ["one", "two"])
        self.assertEqual(log.lines(10)[-1].split(" ", 1)[1], "three")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)


class NodeLogBufferTests(SynchronousTestCase):
    """The node's own log, kept in memory at the node's level."""

    def test_kept_lines_follow_the_level_and_the_limit(self):
        buffer = LogBuffer(keep=3)
        publisher = LogPublisher(buffer.observer(Program(log_level="WARNING")))
        log = Logger(observer=publisher, namespace="llmnode.test")
        seen = []
        buffer.follow(seen.extend)
        log.info("quiet")
        for i in range(4):
            log.warn("loud {i}", i=i)
        self.assertEqual([line.split(" ", 1)[1] for line in buffer.lines(10)],
                         ["[llmnode.test#warn] loud 1", "[llmnode.test#warn] loud 2",
                          "[llmnode.test#warn] loud 3"])
        self.assertEqual(len(seen), 4)


class FakeSource:
    """A log source whose lines a test writes and whose followers it can count."""

    def __init__(self, lines=()):
        self.kept = list(lines)
        self.listeners = []
        self.unfollowed: Deferred = Deferred()

    def lines(self, n):
        return self.kept[-n:] if n else []

    def follow(self, listener):
        self.listeners.append(listener)

        def unfollow():
            self.listeners.remove(listener)
            self.unfollowed.callback(None)

        return unfollow

    def write(self, *lines):
        self.kept.extend(lines)
        for listener in list(self.listeners):
            listener(list(lines))


class LogResourceTests(SynchronousTestCase):
    """The resource served by the node's server, in memory (L{tests.support.memory})."""

    def serve(self, source):
        self.net = MemoryNet()
        return self.net.listenTCP(0, NodeSite(LogResource(source), clock=self.net)).getHost().port

    def get(self, port, path):
        response = self.net.wait(self.net.client().get(f"http://127.0.0.1:{port}{path}"))
        return response, self.net.wait(response.content())

    def test_tail_as_text(self):
        port = self.serve(FakeSource([f"l{i}" for i in range(200)]))
        response, content = self.get(port, "/?lines=2")
        self.assertEqual((response.code, content), (200, b"l198\nl199\n"))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/plain; charset=utf-8"])
        response, content = self.get(port, "/")
        self.assertEqual(content.count(b"\n"), 100)
        for bad in ("-1", "x", "10001"):
            response, content = self.get(port, f"/?lines={bad}")
            self.assertEqual(response.code, 400)
            self.assertEqual(json.loads(content)["error"]["param"], "lines")

    def test_follow_streams_new_lines_until_the_client_leaves(self):
        source = FakeSource(["old 1", "old 2"])
        port = self.serve(source)
        client = self.net.connect(port, RawClient())
        client.transport.write(http_request("GET", "/?follow=1&lines=1"))
        self.net.wait(client.when_received(b"data: old 2\n\n"))
        self.assertNotIn(b"old 1", client.data)
        source.write("new\rline")
        self.net.wait(client.when_received(b"data: new line\n\n"))
        status, headers, _, complete = parse_response(client.data)
        self.assertEqual((status, complete), (200, False))
        self.assertEqual(headers["content-type"], ["text/event-stream"])
        client.transport.abortConnection()
        self.net.wait(source.unfollowed)
        self.assertEqual(source.listeners, [])

    def test_a_slow_follower_holds_a_bounded_number_of_lines(self):
        source = FakeSource()
        request = MemoryRequest([b""])
        request.registerProducer = lambda producer, streaming: None  # (it pulls forever)
        stream = LogStream(request, source)
        stream.start(0)
        stream.pauseProducing()
        source.write(*[f"line {i}" for i in range(LogStream.max_held + 500)])
        self.assertEqual(b"".join(request.written), b": following\n\n")
        stream.resumeProducing()
        sent = b"".join(request.written)
        self.assertIn(b": 500 lines dropped", sent)
        self.assertEqual(sent.count(b"data: "), LogStream.max_held)
        self.assertIn(b"data: line 500\n\n", sent)
        self.assertNotIn(b"data: line 499\n\n", sent)


class LogEndpointTests(TestCase):
    """Through a whole node: a model's log, written by its real backend process."""

    timeout = 60

    async def test_a_model_log_shows_its_backend_starting_while_followed(self):
        service = await start_node(self, {"m": demo_model(free_port())},
                                   log_dir=os.path.join(temporary_folder(self), "logs"))
        url = base_url(service)
        client = await raw_connect(self, service.listening_port)
        client.transport.write(http_request("GET", "/api/models/m/logs?follow=1&lines=0"))
        await client.when_received(b": following")
        response = await http_client(self).post(url + "/api/models/m/start")
        self.assertEqual(response.code, 200)
        await client.when_received(b"listening on 127.0.0.1")
        response = await http_client(self).get(url + "/api/models/m/logs?lines=5")
        self.assertIn(b"listening on 127.0.0.1", await response.content())



class NodeLogEndpointTests(SynchronousTestCase):
    """The node's own log through a whole node, in memory (L{tests.support.memory})."""

    def test_the_node_log_and_the_admin_key(self):
        service = start_memory_node(self, {"m": memory_model(9701)},
                                    api_keys=["user"], admin_api_keys=["admin"])
        path = "/api/logs?lines=50"
        response, _ = service.call("GET", path, headers={"Authorization": ["Bearer user"]})
        self.assertEqual(response.code, 401)
        response, content = service.call("GET", path, headers={"Authorization": ["Bearer admin"]})
        self.assertEqual(response.code, 200)
        self.assertIn(b"llmnode serving 1 models", content)
        response, _ = service.call("GET", "/api/models/nobody/logs",
                                   headers={"Authorization": ["Bearer admin"]})
        self.assertEqual(response.code, 404)
