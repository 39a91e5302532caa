"""A whole node: its health, routes and admission limits in memory; on-demand start and
shutdown over real sockets, real demo backends, real processes."""

from __future__ import annotations

import json
import os
import socket

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.memory import MemoryNet, MemoryNode, memory_model, start_memory_node
from tests.support.nodes import (base_url, demo_model, free_port, get_json, http_client,
                                 pids_alive, post_json, start_node)

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}


class GatedThreads(MemoryNet):
    """A L{MemoryNet} whose "threaded" work (the node's device reads) waits until the test
    opens the gate; after that it runs at once."""

    def __init__(self) -> None:
        super().__init__()
        self._held: list = []
        self._open = False

    def getThreadPool(self):
        return self

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs) -> None:
        if self._open:
            super().getThreadPool().callInThreadWithCallback(on_result, function, *args,
                                                             **kwargs)
        else:
            self._held.append((on_result, function, args, kwargs))

    def open(self) -> None:
        """Run the held work, and any from now on."""
        self._open = True
        held, self._held = self._held, []
        for on_result, function, args, kwargs in held:
            self.callInThreadWithCallback(on_result, function, *args, **kwargs)


class HealthTests(SynchronousTestCase):
    """Health and unknown paths on a whole node in memory (L{tests.support.memory})."""

    def node(self, **kwargs) -> MemoryNode:
        return start_memory_node(self, {"chat": memory_model(9801)}, **kwargs)

    def test_health_reports_models_and_devices(self):
        service = self.node()
        service.net.wait(service.monitor.refresh())
        status, health, _ = service.call_json("GET", "/api/health")
        self.assertEqual(status, 200)
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["models"]["stopped"], 1)
        self.assertIn("cpu", [d["id"] for d in health["devices"]])

    def test_health_says_starting_until_the_devices_are_read(self):
        """A readiness probe sees 503 "starting" until the first device read has ended, on
        /health and /api/health alike; then 200 "ok" with the devices."""
        gate = GatedThreads()
        service = self.node(net=gate, wait_ready=False)
        for path in ("/health", "/api/health"):
            response, content = service.call("GET", path)
            self.assertEqual(response.code, 503, path)
            self.assertEqual(response.headers.getRawHeaders(b"Retry-After"), [b"1"])
            health = json.loads(content)
            self.assertEqual((health["status"], health["devices"]), ("starting", []))
        gate.open()
        gate.wait(service.when_ready())
        for path in ("/health", "/api/health"):
            status, health, _ = service.call_json("GET", path)
            self.assertEqual((status, health["status"]), (200, "ok"), path)
            self.assertEqual([d["id"] for d in health["devices"]], ["cpu"])

    def test_root_health_is_api_health(self):
        service = self.node()
        _, api, _ = service.call_json("GET", "/api/health")
        status, root, _ = service.call_json("GET", "/health")
        self.assertEqual(status, 200)
        api.pop("uptime_s"), root.pop("uptime_s")
        self.assertEqual(root, api)

    def test_unknown_paths_answer_json_404(self):
        response, content = self.node().call("GET", "/nothing/here")
        self.assertEqual(response.code, 404)
        self.assertIn("error", json.loads(content))


class NodeTests(TestCase):
    """Over real sockets and processes: a chat starts its backend, which writes its log file;
    stopping the node stops every backend process group, and says so only when it is so."""

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


class ConcurrencyLimitTests(SynchronousTestCase):
    """Admission on a whole node in memory."""

    def test_over_max_concurrency_and_queue_answers_429(self):
        service = start_memory_node(
            self, {"chat": memory_model(9801, max_concurrency=1, max_queue=1)},
            backends={"chat": {"slow_headers": 0.5}})

        async def post() -> tuple:
            response = await service.http_client.post(
                service.url + "/v1/chat/completions", data=json.dumps(CHAT).encode(),
                headers={"Content-Type": "application/json"})
            return response.code, json.loads(await response.content()), response.headers

        results = service.net.wait(gatherResults([
            Deferred.fromCoroutine(post()) for _ in range(3)]))
        statuses = sorted(status for status, _, _ in results)
        self.assertEqual(statuses, [200, 200, 429])
        status, body, headers = [r for r in results if r[0] == 429][0]
        self.assertEqual(body["error"]["type"], "rate_limit_error")
        self.assertEqual(headers.getRawHeaders(b"Retry-After"), [b"1"])
