"""Placement end to end: real backends on a fake 8 GB GPU from a plugin file."""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.support.nodes import (base_url, demo_model, free_port, get_json, http_client,
                                 post_json, sleep, start_node)

PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")


def gpu_model(flags="", **keys):
    """A model needing 5000 MB of the fake 8 GB 'RTX 4060': two never fit together."""
    return demo_model(free_port(), flags=flags, device="rtx 4060", memory_mb=5000, **keys)


class PlacementEndToEndTests(TestCase):
    timeout = 60

    async def node(self, **models):
        self.service = await start_node(self, models, device_plugin_dir=PLUGINS,
                                        placement_wait=20)
        self.http = http_client(self)
        self.url = base_url(self.service)

    async def chat(self, model, **extra):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        body.update(extra)
        return await post_json(self.http, self.url + "/v1/chat/completions", body)

    async def info(self, model):
        return (await get_json(self.http, self.url + f"/api/models/{model}/info"))[1]

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
