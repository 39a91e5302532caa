"""Loading progress: a streaming request waiting for its turn gets SSE comments saying what it
waits for.

The node runs in memory (L{tests.support.memory}), on a fake clock: a backend that takes
2.3 s to start takes no time. The OpenAI SDK test reads a real node's stream.
"""

from __future__ import annotations

import json

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.memory import memory_model, start_memory_node
from tests.support.nodes import base_url, demo_model, free_port, start_node


class LoadingCommentsTests(SynchronousTestCase):
    def node(self, **backend):
        """A node whose model C{slow} starts as C{backend} says (default: after 2.3 s)."""
        backend.setdefault("start_delay", 2.3)
        return start_memory_node(self, {"slow": memory_model(9201)},
                                 backends={"slow": backend})

    def test_comments_arrive_every_second_until_the_first_chunk(self):
        response, body = self.node().call(
            "POST", "/v1/chat/completions",
            {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            headers={b"Content-Type": [b"application/json"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        body = body.decode()
        events = [e for e in body.split("\n\n") if e]
        comments = [e for e in events if e.startswith(":")]
        self.assertGreaterEqual(len(comments), 2)
        self.assertEqual(comments, [f": waiting {n} s: loading slow"
                                    for n in range(1, len(comments) + 1)])
        self.assertEqual(events[:len(comments)], comments, "comments come before any data")
        self.assertTrue(events[len(comments)].startswith("data: {"))
        self.assertEqual(events[-1], "data: [DONE]")

    def test_non_streaming_waits_stay_silent(self):
        response, body = self.node().call(
            "POST", "/v1/chat/completions",
            {"model": "slow", "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(response.code, 200)
        body = json.loads(body)
        self.assertIn("hi", body["choices"][0]["message"]["content"])

    def test_a_start_that_fails_after_comments_ends_with_an_error_event(self):
        node = self.node(start_delay=1.5, fail="exit status 1: bad weights")
        response, body = node.call(
            "POST", "/v1/chat/completions",
            {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        body = body.decode()
        self.assertEqual(response.code, 200)
        events = [e for e in body.split("\n\n") if e]
        self.assertEqual(events[0], ": waiting 1 s: loading slow")
        error = json.loads(events[-1][len("data: "):])["error"]
        self.assertIn("bad weights", error["message"])

    def test_a_backend_error_after_comments_ends_with_an_error_event(self):
        """Once comments have gone out with a 200, a backend's error answer can only come as
        an error event, which carries what the backend said."""
        response, body = self.node().call(
            "POST", "/v1/chat/completions",
            {"model": "slow", "stream": True, "chunks": 10 ** 9,
             "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(response.code, 200)
        events = [e for e in body.decode().split("\n\n") if e]
        self.assertEqual(events[0], ": waiting 1 s: loading slow")
        error = json.loads(events[-1][len("data: "):])["error"]
        self.assertEqual(error["type"], "server_error")
        self.assertIn("answered 400", error["message"])
        self.assertIn("chunks must be at most", error["message"])


class LoadingCommentsSDKTests(TestCase):
    timeout = 60

    async def test_the_openai_sdk_still_parses_the_stream(self):
        import openai
        service = await start_node(self, {"slow": demo_model(free_port(),
                                                             flags="--start-delay 2.3")})
        url = base_url(service)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        self.addCleanup(client.close)

        def stream():
            return [c.choices[0].delta.content for c in client.chat.completions.create(
                model="slow", stream=True, messages=[{"role": "user", "content": "hi"}])
                if c.choices]

        pieces = await deferToThread(stream)
        self.assertIn("hi", "".join(p or "" for p in pieces))
