"""Placement end to end: real backends on a fake 8 GB GPU from a plugin file."""

from __future__ import annotations

import json
import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.support.nodes import (base_url, demo_model, free_port, get_json, http_client,
                                 post_json, sleep, start_node)

PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")


def gpu_model(flags="", **keys):
    """A model needing 5000 MB of the fake 8 GB 'RTX 4060': two never fit together."""
    return demo_model(free_port(), flags=flags, device="rtx 4060", memory_mb=5000, **keys)


class PlacementEndToEndTests(TestCase):
    timeout = 60

    async def node(self, program=None, **models):
        program = program or {}
        self.service = await start_node(self, models, device_plugin_dir=PLUGINS,
                                        queue_timeout=20, **program)
        self.http = http_client(self)
        self.url = base_url(self.service)

    async def chat(self, model, **extra):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        body.update(extra)
        return await post_json(self.http, self.url + "/v1/chat/completions", body)

    async def info(self, model):
        return (await get_json(self.http, self.url + f"/api/models/{model}/info"))[1]

    async def stream(self, model, chunks=5):
        """One streamed chat; whether it ran to its end ([DONE]) and when it ended."""
        response = await self.http.post(
            self.url + "/v1/chat/completions",
            data=json.dumps({"model": model, "stream": True, "chunks": chunks,
                             "chunk_interval": 0.1,
                             "messages": [{"role": "user", "content": "go"}]}).encode(),
            headers={b"Content-Type": [b"application/json"]})
        body = await response.content()
        return response.code, body.rstrip().endswith(b"data: [DONE]"), reactor.seconds()

    async def test_a_model_kept_busy_takes_turns_with_a_waiting_one(self):
        """Back-to-back streams keep a busy; b's request waits for a's turn to end, a drains
        (no stream cut), b is served, then a gets its turn back."""
        await self.node(a=gpu_model(), b=gpu_model(), program={"turn_time": 1.0})
        done = []
        b_answered = []

        async def a_client():
            while not b_answered or reactor.seconds() < b_answered[0] + 1.5:
                done.append(await self.stream("a"))

        clients = [defer.ensureDeferred(a_client()) for _ in range(2)]

        async def end_clients():
            b_answered.append(0.0)
            await defer.DeferredList(clients)

        self.addCleanup(end_clients)
        for _ in range(200):
            if (await self.info("a"))["state"] == "running":
                break
            await sleep(0.05)
        self.assertEqual((await self.info("a"))["state"], "running")
        b_status, b_complete, b_at = await self.stream("b", chunks=2)
        b_answered.append(b_at)
        await defer.gatherResults(clients)
        self.assertEqual((b_status, b_complete), (200, True))
        self.assertEqual([(code, complete) for code, complete, _ in done],
                         [(200, True)] * len(done), "no stream of a was cut or refused")
        self.assertTrue(any(at > b_at for _, _, at in done), "a is served again after b")
        a = await self.info("a")
        self.assertGreaterEqual(a["stops"].get("turn", 0), 1, a)
        self.assertEqual(a["starts"], 2)

    async def test_idle_model_is_evicted_for_the_requested_one(self):
        await self.node(a=gpu_model(), b=gpu_model())
        status, _, _ = await self.chat("a")
        self.assertEqual(status, 200)
        a = await self.info("a")
        self.assertEqual(a["devices"], {"rtx 4060": "fake0"})
        self.assertEqual(a["memory_mb"], {"fake0": 5000})
        status, _, _ = await self.chat("b")
        self.assertEqual(status, 200)
        self.assertEqual((await self.info("a"))["state"], "stopped")
        self.assertEqual((await self.info("b"))["state"], "running")
        _, devices = await get_json(self.http, self.url + "/api/devices")
        fake = [d for d in devices["devices"] if d["id"] == "fake0"][0]
        self.assertEqual(fake["reserved_mb"], 5000)
        self.assertEqual(fake["available_mb"], 8192 - 5000, "what the ledger leaves, the "
                         "device reporting all of its memory free")
        self.assertEqual(fake["models"], {"b": 5000})

    async def test_busy_model_is_evicted_only_after_its_stream_ends(self):
        await self.node(a=gpu_model(), b=gpu_model())
        streaming = self.http.post(
            self.url + "/v1/chat/completions",
            data=json.dumps({"model": "a", "stream": True, "chunks": 15,
                             "chunk_interval": 0.1,
                             "messages": [{"role": "user", "content": "long"}]}).encode(),
            headers={b"Content-Type": [b"application/json"]})
        response = await streaming
        self.assertEqual(response.code, 200)
        stream_body = response.content()
        await sleep(0.2)
        b_request = defer.ensureDeferred(self.chat("b"))
        await sleep(0.5)
        self.assertFalse(b_request.called, "b waits while a is streaming")
        self.assertEqual((await self.info("a"))["state"], "running")
        body = await stream_body
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"), "a's stream ran to its end")
        status, _, _ = await b_request
        self.assertEqual(status, 200)
        self.assertEqual((await self.info("a"))["state"], "stopped")

    async def test_a_model_that_cannot_fit_gets_503_naming_the_shortfall(self):
        await self.node(huge=demo_model(free_port(), device="rtx 4060", memory_mb=9000))
        status, body, headers = await self.chat("huge")
        self.assertEqual(status, 503)
        message = body["error"]["message"]
        self.assertIn("fake0", message)
        self.assertIn("9000", message)
        self.assertTrue(headers.hasHeader(b"Retry-After"))

    async def test_concurrent_cold_starts_never_overbook(self):
        await self.node(a=gpu_model(), b=gpu_model())
        results = await defer.gatherResults([defer.ensureDeferred(self.chat(m))
                                             for m in ("a", "b")])
        self.assertEqual([status for status, _, _ in results], [200, 200])
        states = [(await self.info(m))["state"] for m in ("a", "b")]
        self.assertEqual(sorted(states), ["running", "stopped"])


class SweeperEndToEndTests(TestCase):
    timeout = 60

    async def test_idle_model_is_stopped_but_never_mid_stream(self):
        service = await start_node(self, {"chat": demo_model(free_port(), alive_time=0.02)})
        http = http_client(self)
        url = base_url(service)
        response = await http.post(
            url + "/v1/chat/completions",
            data=json.dumps({"model": "chat", "stream": True, "chunks": 30,
                             "chunk_interval": 0.1,
                             "messages": [{"role": "user", "content": "x"}]}).encode())
        body = await response.content()
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"),
                        "a 3 s stream outlives a 1.2 s alive_time")
        _, info = await get_json(http, url + "/api/models/chat/info")
        self.assertEqual(info["state"], "running")
        for _ in range(80):
            _, info = await get_json(http, url + "/api/models/chat/info")
            if info["state"] == "stopped":
                break
            await sleep(0.1)
        self.assertEqual(info["state"], "stopped")
