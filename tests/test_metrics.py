"""GET /metrics after traffic: the counters moved as the traffic implies.

The node runs in memory (L{tests.support.memory}); its backends are the demo backend's
resource."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from tests.support.memory import memory_model, start_memory_node

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def samples(text: str) -> dict:
    """{(sample name, sorted label items): value}"""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class MetricsTests(SynchronousTestCase):
    def test_counters_follow_the_traffic(self):
        # The backend takes 0.1 s to start: the first request waits that long.
        service = start_memory_node(self, {"chat": memory_model(9301),
                                           "embed": memory_model(9302, mode="Embedding")},
                                    backends={"chat": {"start_delay": 0.1}})
        service.net.wait(service.monitor.refresh())
        for _ in range(3):
            status, _, _ = service.call_json("POST", "/v1/chat/completions", CHAT)
            self.assertEqual(status, 200)
        status, _, _ = service.call_json("POST", "/v1/chat/completions",
                                         dict(CHAT, chunks="many"))
        self.assertEqual(status, 400, "the backend's own 400 is counted too")
        status, _, _ = service.call_json("POST", "/v1/completions",
                                         {"model": "embed", "prompt": "x"})
        self.assertEqual(status, 400, "refused by the node: never reaches a backend")

        response, content = service.call("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(
            b"text/plain"))
        found = samples(content.decode())
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

    def test_stops_are_counted_by_reason(self):
        service = start_memory_node(self, {"chat": memory_model(9301)})
        status, _, _ = service.call_json("POST", "/v1/chat/completions", CHAT)
        self.assertEqual(status, 200)
        status, _, _ = service.call_json("POST", "/api/models/chat/stop", {})
        self.assertEqual(status, 200)
        found = samples(service.call("GET", "/metrics")[1].decode())
        self.assertEqual(found[("llmnode_model_stops_total",
                                (("model", "chat"), ("reason", "admin")))], 1)
        self.assertEqual(found[("llmnode_model_stops_total",
                                (("model", "chat"), ("reason", "turn")))], 0)

    def test_metrics_need_the_admin_key_when_keys_are_set(self):
        service = start_memory_node(self, {"chat": memory_model(9301)},
                                    admin_api_keys=["admin-key"])
        response, content = service.call("GET", "/metrics")
        self.assertEqual(response.code, 401)
        self.assertEqual(json.loads(content)["error"]["code"], "invalid_api_key")
        response, content = service.call("GET", "/metrics",
                                         headers={b"Authorization": [b"Bearer admin-key"]})
        self.assertEqual(response.code, 200)
        self.assertIn(b"llmnode_model_state", content)
