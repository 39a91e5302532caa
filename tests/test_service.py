"""A whole node in the test's reactor: real sockets, real demo backends, real processes."""

from __future__ import annotations

import os
import socket
import threading

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from llmnode.devices.interfaces import Device, IDevicePlugin

from tests.support.nodes import (base_url, demo_model, free_port, get_json, http_client,
                                 pids_alive, post_json, start_node)

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}


@implementer(IDevicePlugin)
class GatedPlugin:
    """Reports one cpu device, but only once the test opens the gate (it blocks till then)."""

    name = "gated"

    def __init__(self):
        self.open = threading.Event()

    def devices(self):
        self.open.wait(30)
        return [Device(id="cpu", kind="cpu", name="RAM", total_mb=4096, free_mb=4096)]


class NodeTests(TestCase):
    timeout = 60

    async def test_chat_through_the_node_starts_the_model_on_demand(self):
        service = await start_node(self, {"chat": demo_model(free_port(), aliases=["gpt-x"])})
        http = http_client(self)
        status, body, _ = await post_json(http, base_url(service) + "/v1/chat/completions",
                                          dict(CHAT, model="gpt-x"))
        self.assertEqual(status, 200, body)
        self.assertIn("hello", body["choices"][0]["message"]["content"])
        status, info = await get_json(http, base_url(service) + "/api/models/chat/info")
        self.assertEqual(info["state"], "running")
        self.assertEqual(info["requests_served"], 1)
        self.assertEqual(info["in_flight"], 0)
        self.assertEqual(info["plan"], "Plan")
        self.assertEqual(info["memory_mb"], {"cpu": 64})
        self.assertTrue(os.path.exists(info["log_file"]))

    async def test_stopping_the_node_stops_every_backend(self):
        models = {name: demo_model(free_port(), flags=flags)
                  for name, flags in (("a", ""), ("b", "--fork-child"),
                                      ("c", "--ignore-sigterm"))}
        models["c"]["stop_timeout"] = 0.5
        service = await start_node(self, models)
        http = http_client(self)
        pids = []
        for name in models:
            status, info, _ = await post_json(
                http, base_url(service) + f"/api/models/{name}/start", {})
            self.assertEqual(status, 200, info)
            pids.append(info["supervisor_pid"])
        children = _group_members(pids)
        self.assertGreater(len(children), len(pids), "the scripts' children are in the groups")
        await service.stopService()
        self.assertEqual(pids_alive(children), [])

    async def test_stopping_never_claims_no_backend_is_left_while_a_port_is_listened_on(self):
        port = free_port()
        stranger = socket.socket()
        self.addCleanup(stranger.close)
        stranger.bind(("127.0.0.1", port))
        stranger.listen()
        service = await start_node(self, {"a": demo_model(free_port()),
                                          "b": demo_model(port)})
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        await service.stopService()
        text = "\n".join(formatEvent(event) for event in logged)
        self.assertIn(f"port {port} of b is still listened on by pid {os.getpid()}", text)
        self.assertNotIn("no backend left running", text)

    async def test_health_reports_models_and_devices(self):
        service = await start_node(self, {"chat": demo_model(free_port())})
        await service.monitor.refresh()
        status, health = await get_json(http_client(self), base_url(service) + "/api/health")
        self.assertEqual(status, 200)
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["models"]["stopped"], 1)
        self.assertIn("cpu", [d["id"] for d in health["devices"]])

    async def test_health_says_starting_until_the_devices_are_read(self):
        """A readiness probe sees 503 "starting" until the first device read has ended, on
        /health and /api/health alike; then 200 "ok" with the devices."""
        gate = GatedPlugin()
        service = await start_node(self, {"chat": demo_model(free_port())}, plugins=[gate],
                                   wait_ready=False)
        self.addCleanup(gate.open.set)
        http = http_client(self)
        for path in ("/health", "/api/health"):
            response = await http.get(base_url(service) + path)
            self.assertEqual(response.code, 503, path)
            self.assertEqual(response.headers.getRawHeaders(b"Retry-After"), [b"1"])
            health = await response.json()
            self.assertEqual((health["status"], health["devices"]), ("starting", []))
        gate.open.set()
        await service.when_ready()
        for path in ("/health", "/api/health"):
            status, health = await get_json(http, base_url(service) + path)
            self.assertEqual((status, health["status"]), (200, "ok"), path)
            self.assertEqual([d["id"] for d in health["devices"]], ["cpu"])

    async def test_root_health_is_api_health(self):
        service = await start_node(self, {"chat": demo_model(free_port())})
        http = http_client(self)
        _, api = await get_json(http, base_url(service) + "/api/health")
        status, root = await get_json(http, base_url(service) + "/health")
        self.assertEqual(status, 200)
        api.pop("uptime_s"), root.pop("uptime_s")
        self.assertEqual(root, api)

    async def test_unknown_paths_answer_json_404(self):
        service = await start_node(self, {"chat": demo_model(free_port())})
        response = await http_client(self).get(base_url(service) + "/nothing/here")
        self.assertEqual(response.code, 404)
        self.assertIn("error", await response.json())


def _group_members(pgids) -> list[int]:
    import psutil
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) in pgids:
                members.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


class ConcurrencyLimitTests(TestCase):
    timeout = 60

    async def test_over_max_concurrency_and_queue_answers_429(self):
        from twisted.internet import defer
        service = await start_node(self, {"chat": demo_model(
            free_port(), max_concurrency=1, max_queue=1, flags="--slow-headers 0.5")})
        http = http_client(self)
        url = base_url(service) + "/v1/chat/completions"
        results = await defer.gatherResults([
            defer.ensureDeferred(post_json(http, url, CHAT)) for _ in range(3)])
        statuses = sorted(status for status, _, _ in results)
        self.assertEqual(statuses, [200, 200, 429])
        status, body, headers = [r for r in results if r[0] == 429][0]
        self.assertEqual(body["error"]["type"], "rate_limit_error")
        self.assertEqual(headers.getRawHeaders(b"Retry-After"), [b"1"])
