"""Loading progress: a streaming request waiting for its turn gets SSE comments saying what it
waits for."""

from __future__ import annotations

import json

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.nodes import base_url, demo_model, free_port, http_client, start_node


class LoadingCommentsTests(TestCase):
    timeout = 60

    async def node(self, flags="--start-delay 2.3", script=None):
        model = demo_model(free_port(), flags=flags)
        if script is not None:
            model["Plan"]["script_path"] = script
        service = await start_node(self, {"slow": model})
        return base_url(service)

    async def test_comments_arrive_every_second_until_the_first_chunk(self):
        url = await self.node()
        response = await http_client(self).post(
            url + "/v1/chat/completions",
            data=json.dumps({"model": "slow", "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={b"Content-Type": [b"application/json"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        body = (await response.content()).decode()
        events = [e for e in body.split("\n\n") if e]
        comments = [e for e in events if e.startswith(":")]
        self.assertGreaterEqual(len(comments), 2)
        self.assertEqual(comments, [f": waiting {n} s: loading slow"
                                    for n in range(1, len(comments) + 1)])
        self.assertEqual(events[:len(comments)], comments, "comments come before any data")
        self.assertTrue(events[len(comments)].startswith("data: {"))
        self.assertEqual(events[-1], "data: [DONE]")

    async def test_non_streaming_waits_stay_silent(self):
        url = await self.node()
        response = await http_client(self).post(
            url + "/v1/chat/completions",
            data=json.dumps({"model": "slow",
                             "messages": [{"role": "user", "content": "hi"}]}).encode())
        self.assertEqual(response.code, 200)
        body = await response.json()
        self.assertIn("hi", body["choices"][0]["message"]["content"])

    async def test_a_start_that_fails_after_comments_ends_with_an_error_event(self):
        url = await self.node(script="sleep 1.5; echo 'bad weights' >&2; exit 1")
        response = await http_client(self).post(
            url + "/v1/chat/completions",
            data=json.dumps({"model": "slow", "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]}).encode())
        body = (await response.content()).decode()
        self.assertEqual(response.code, 200)
        events = [e for e in body.split("\n\n") if e]
        self.assertEqual(events[0], ": waiting 1 s: loading slow")
        error = json.loads(events[-1][len("data: "):])["error"]
        self.assertIn("bad weights", error["message"])

    async def test_the_openai_sdk_still_parses_the_stream(self):
        import openai
        url = await self.node()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        self.addCleanup(client.close)

        def stream():
            return [c.choices[0].delta.content for c in client.chat.completions.create(
                model="slow", stream=True, messages=[{"role": "user", "content": "hi"}])
                if c.choices]

        pieces = await deferToThread(stream)
        self.assertIn("hi", "".join(p or "" for p in pieces))
