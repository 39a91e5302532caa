"""GET /metrics after traffic: the counters moved as the traffic implies."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from tests.support.nodes import base_url, demo_model, free_port, http_client, post_json, start_node

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def samples(text: str) -> dict:
    """{(sample name, sorted label items): value}"""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class MetricsTests(TestCase):
    timeout = 60

    async def test_counters_follow_the_traffic(self):
        service = await start_node(self, {"chat": demo_model(free_port()),
                                          "embed": demo_model(free_port(), mode="Embedding")})
        await service.monitor.refresh()
        http = http_client(self)
        url = base_url(service)
        for _ in range(3):
            status, _, _ = await post_json(http, url + "/v1/chat/completions", CHAT)
            self.assertEqual(status, 200)
        status, _, _ = await post_json(http, url + "/v1/chat/completions",
                                       dict(CHAT, chunks="many"))
        self.assertEqual(status, 400, "the backend's own 400 is counted too")
        status, _, _ = await post_json(http, url + "/v1/completions",
                                       {"model": "embed", "prompt": "x"})
        self.assertEqual(status, 400, "refused by the node: never reaches a backend")

        response = await http.get(url + "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(
            b"text/plain"))
        found = samples((await response.content()).decode())
        chat = ("model", "chat")
        self.assertEqual(found[("llmnode_requests_total",
                                (("endpoint", "chat"), chat, ("status", "200")))], 3)
        self.assertEqual(found[("llmnode_requests_total",
                                (("endpoint", "chat"), chat, ("status", "400")))], 1)
        self.assertEqual(found[("llmnode_model_starts_total", (chat,))], 1)
        self.assertEqual(found[("llmnode_model_state", (chat, ("state", "running")))], 1)
        self.assertEqual(found[("llmnode_model_state",
                                (("model", "embed"), ("state", "stopped")))], 1)
        self.assertEqual(found[("llmnode_requests_in_flight", (chat,))], 0)
        self.assertEqual(found[("llmnode_model_start_duration_seconds_count", (chat,))], 1)
        self.assertEqual(found[("llmnode_model_crashes_total", (chat,))], 0)
        # The first request waited for the start; the other three were sent at once.
        self.assertEqual(found[("llmnode_queue_wait_seconds_count", (chat,))], 4)
        self.assertEqual(found[("llmnode_queue_wait_seconds_bucket",
                                (("le", "0.005"), chat))], 3)
        self.assertEqual(found[("llmnode_requests_queued", (chat,))], 0)
        self.assertEqual(found[("llmnode_model_stops_total", (chat, ("reason", "idle")))], 0)
        cpu = [v for (name, labels), v in found.items()
               if name == "llmnode_device_memory_reserved_mb" and ("device", "cpu") in labels]
        self.assertEqual(cpu, [64])

    async def test_stops_are_counted_by_reason(self):
        service = await start_node(self, {"chat": demo_model(free_port())})
        http = http_client(self)
        url = base_url(service)
        status, _, _ = await post_json(http, url + "/v1/chat/completions", CHAT)
        self.assertEqual(status, 200)
        status, _, _ = await post_json(http, url + "/api/models/chat/stop", {})
        self.assertEqual(status, 200)
        found = samples((await (await http.get(url + "/metrics")).content()).decode())
        self.assertEqual(found[("llmnode_model_stops_total",
                                (("model", "chat"), ("reason", "admin")))], 1)
        self.assertEqual(found[("llmnode_model_stops_total",
                                (("model", "chat"), ("reason", "turn")))], 0)

    async def test_metrics_need_the_admin_key_when_keys_are_set(self):
        service = await start_node(self, {"chat": demo_model(free_port())},
                                   admin_api_keys=["admin-key"])
        http = http_client(self)
        response = await http.get(base_url(service) + "/metrics")
        self.assertEqual(response.code, 401)
        self.assertEqual((await response.json())["error"]["code"], "invalid_api_key")
        response = await http.get(base_url(service) + "/metrics",
                                  headers={b"Authorization": [b"Bearer admin-key"]})
        self.assertEqual(response.code, 200)
        self.assertIn(b"llmnode_model_state", await response.content())
