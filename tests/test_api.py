"""The management API: each endpoint, its errors and auto_start on a node in memory; pids,
stops, start failures and crashes over real backend processes."""

from __future__ import annotations

import json
import os
import signal

import psutil
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.memory import memory_model, start_memory_node
from tests.support.nodes import (base_url, demo_model, free_port, get_json, http_client,
                                 pids_alive, post_json, sleep, start_node)


class ManagementApiTests(SynchronousTestCase):
    """Each endpoint and its errors, on a whole node in memory (L{tests.support.memory})."""

    def node(self, models=None, **backends):
        self.service = start_memory_node(
            self, models or {"chat": memory_model(9601, aliases=["alias-of-chat"])},
            backends=backends)

    def test_start_without_waiting_answers_202(self):
        self.node(chat={"start_delay": 0.5})
        status, info, _ = self.service.call_json("POST", "/api/models/chat/start?wait=false", {})
        self.assertEqual(status, 202)
        self.assertEqual(info["state"], "starting")
        for _ in range(100):
            status, info, _ = self.service.call_json("GET", "/api/models/chat/info")
            if info["state"] == "running":
                break
            self.service.net.run(0.05)
        self.assertEqual(info["state"], "running")

    def test_models_lists_every_model(self):
        self.node({"a": memory_model(9601), "b": memory_model(9602, mode="Embedding")})
        status, body, _ = self.service.call_json("GET", "/api/models")
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in body["models"]], ["a", "b"])
        self.assertEqual([m["mode"] for m in body["models"]], ["Chat", "Embedding"])

    def test_unknown_model_is_404_json(self):
        self.node()
        for method, path in (("GET", "/models/nope/info"), ("POST", "/models/nope/start"),
                             ("POST", "/models/nope/stop")):
            response, content = self.service.call(method, "/api" + path)
            self.assertEqual(response.code, 404, path)
            error = json.loads(content)["error"]
            self.assertEqual(error["code"], "model_not_found")
            self.assertIn("nope", error["message"])

    def test_wrong_method_is_405_json(self):
        self.node()
        for method, path, allowed in (("GET", "/models/chat/start", b"POST"),
                                      ("POST", "/models/chat/info", b"GET"),
                                      ("DELETE", "/health", b"GET"),
                                      ("GET", "/models/stop-all", b"POST")):
            response, content = self.service.call(method, "/api" + path)
            self.assertEqual(response.code, 405, path)
            self.assertEqual(response.headers.getRawHeaders(b"Allow"), [allowed])
            self.assertEqual(json.loads(content)["error"]["code"], "method_not_allowed")

    def test_head_on_health_answers_like_get_without_a_body(self):
        self.node()
        response, content = self.service.call("HEAD", "/api/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        self.assertGreater(int(response.headers.getRawHeaders(b"Content-Length")[0]), 0)
        self.assertEqual(content, b"")
        status, health, _ = self.service.call_json("GET", "/api/health")
        self.assertEqual((status, health["status"]), (200, "ok"))

    def test_auto_start_models_start_in_the_background(self):
        self.node({"auto": memory_model(9601, auto_start=True), "lazy": memory_model(9602)},
                  auto={"start_delay": 0.3})
        states = []
        for _ in range(100):
            status, health, _ = self.service.call_json("GET", "/api/health")
            states.append(health["models"]["starting"])
            if health["models"]["starting"]:
                break
            self.service.net.run(0.01)
        self.assertEqual(states[-1], 1, "the node answers while auto_start models start")
        for _ in range(100):
            _, info, _ = self.service.call_json("GET", "/api/models/auto/info")
            if info["state"] == "running":
                break
            self.service.net.run(0.05)
        self.assertEqual(info["state"], "running")
        _, info, _ = self.service.call_json("GET", "/api/models/lazy/info")
        self.assertEqual(info["state"], "stopped")


class ManagementApiProcessTests(TestCase):
    """What the API says about real backend processes: their pids, gone once stopped, and
    the output of one that failed to start."""

    timeout = 60

    async def node(self, **models):
        models = models or {"chat": demo_model(free_port(), aliases=["alias-of-chat"])}
        self.service = await start_node(self, models)
        self.http = http_client(self)
        self.url = base_url(self.service) + "/api"

    async def test_start_answers_when_ready_and_stop_when_gone(self):
        await self.node()
        status, info, _ = await post_json(self.http, self.url + "/models/alias-of-chat/start", {})
        self.assertEqual(status, 200)
        self.assertEqual(info["state"], "running")
        self.assertIsInstance(info["pid"], int)
        self.assertEqual(info["starts"], 1)
        self.assertIsNotNone(info["last_start_duration"])
        pid = info["pid"]
        status, info, _ = await post_json(self.http, self.url + "/models/chat/stop", {})
        self.assertEqual(status, 200)
        self.assertEqual(info["state"], "stopped")
        self.assertEqual(pids_alive([pid]), [])

    async def test_stop_all(self):
        await self.node(a=demo_model(free_port()), b=demo_model(free_port()))
        pids = []
        for name in "ab":
            _, info, _ = await post_json(self.http, self.url + f"/models/{name}/start", {})
            pids.append(info["pid"])
        status, body, _ = await post_json(self.http, self.url + "/models/stop-all", {})
        self.assertEqual(status, 200)
        self.assertEqual(sorted(body["stopped"]), ["a", "b"])
        self.assertEqual(pids_alive(pids), [])

    async def test_failed_start_reports_the_backend_output(self):
        await self.node(chat=demo_model(free_port(), flags="--exit-at-once 'no weights here'"))
        status, body, headers = await post_json(self.http, self.url + "/models/chat/start", {})
        self.assertEqual(status, 503)
        self.assertIn("no weights here", body["error"]["message"])
        self.assertTrue(headers.hasHeader(b"Retry-After"))
        _, info = await get_json(self.http, self.url + "/models/chat/info")
        self.assertEqual(info["state"], "failed")
        self.assertIn("no weights here", info["last_error"])


class CrashTests(TestCase):
    timeout = 60

    async def test_crash_is_noticed_and_the_next_request_restarts(self):
        service = await start_node(self, {"chat": demo_model(free_port(),
                                                             flags="--crash-after 1")})
        http = http_client(self)
        url = base_url(service)
        chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        status, _, _ = await post_json(http, url + "/v1/chat/completions", chat)
        self.assertEqual(status, 200)
        for _ in range(100):
            _, info = await get_json(http, url + "/api/models/chat/info")
            if info["state"] == "failed":
                break
            await sleep(0.02)
        self.assertEqual(info["state"], "failed")
        self.assertIn("exit status 3", info["last_error"])
        self.assertEqual(info["crashes"], 1)
        status, _, _ = await post_json(http, url + "/v1/chat/completions", chat)
        self.assertEqual(status, 200, "the next request starts it again")
        _, info = await get_json(http, url + "/api/models/chat/info")
        self.assertEqual(info["starts"], 2)


class WhichPidTests(TestCase):
    """C{pid} is the model server's own; C{supervisor_pid} leads its process group."""

    timeout = 60

    async def start(self, script_prefix: str = "") -> tuple[dict, int, str]:
        """Start model C{chat} whose script begins with C{script_prefix}; (info, the demo
        server's own pid, node URL)."""
        port = free_port()
        model = demo_model(port)
        model["Plan"]["script_path"] = script_prefix + model["Plan"]["script_path"]
        service = await start_node(self, {"chat": model})
        self.http = http_client(self)
        url = base_url(service)
        status, info, _ = await post_json(self.http, url + "/api/models/chat/start", {})
        self.assertEqual(status, 200, info)
        _, stats = await get_json(self.http, f"http://127.0.0.1:{port}/debug/stats")
        return info, stats["pid"], url

    async def test_pid_is_the_model_servers(self):
        info, server, _ = await self.start()
        self.assertEqual(info["pid"], server)
        self.assertEqual(psutil.Process(server).ppid(), info["supervisor_pid"])
        self.assertEqual(os.getpgid(server), info["supervisor_pid"])

    async def crash_reason(self, script_prefix: str) -> str:
        """SIGKILL the demo server; the model's last error."""
        _, server, url = await self.start(script_prefix)
        os.kill(server, signal.SIGKILL)
        for _ in range(200):
            _, info = await get_json(self.http, url + "/api/models/chat/info")
            if info["state"] == "failed":
                return info["last_error"]
            await sleep(0.02)
        self.fail(f"the kill was not noticed: {info}")

    async def test_a_kill_reads_the_same_with_or_without_a_shell_between(self):
        """A one-line script's server runs without a shell between (its last command is
        exec'd); a two-line script keeps the shell, whose 128+N is read as signal N."""
        for prefix in ("", "echo a shell stays for two lines\n"):
            reason = await self.crash_reason(prefix)
            self.assertIn("killed by signal 9", reason, repr(prefix))
            self.assertNotIn("137", reason, repr(prefix))
