"""The management API over a real node: each endpoint, its errors, auto_start and crashes."""

from __future__ import annotations

import os
import signal

import psutil
from twisted.trial.unittest import TestCase

from tests.support.nodes import (base_url, demo_model, free_port, get_json, http_client,
                                 pids_alive, post_json, sleep, start_node)


class ManagementApiTests(TestCase):
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

    async def test_start_without_waiting_answers_202(self):
        await self.node(chat=demo_model(free_port(), flags="--start-delay 0.5"))
        status, info, _ = await post_json(self.http, self.url + "/models/chat/start?wait=false",
                                          {})
        self.assertEqual(status, 202)
        self.assertEqual(info["state"], "starting")
        for _ in range(100):
            status, info = await get_json(self.http, self.url + "/models/chat/info")
            if info["state"] == "running":
                break
            await sleep(0.05)
        self.assertEqual(info["state"], "running")

    async def test_models_lists_every_model(self):
        await self.node(a=demo_model(free_port()), b=demo_model(free_port(), mode="Embedding"))
        status, body = await get_json(self.http, self.url + "/models")
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in body["models"]], ["a", "b"])
        self.assertEqual([m["mode"] for m in body["models"]], ["Chat", "Embedding"])

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

    async def test_unknown_model_is_404_json(self):
        await self.node()
        for method, path in (("GET", "/models/nope/info"), ("POST", "/models/nope/start"),
                             ("POST", "/models/nope/stop")):
            response = await self.http.request(method, self.url + path)
            self.assertEqual(response.code, 404, path)
            error = (await response.json())["error"]
            self.assertEqual(error["code"], "model_not_found")
            self.assertIn("nope", error["message"])

    async def test_wrong_method_is_405_json(self):
        await self.node()
        for method, path, allowed in (("GET", "/models/chat/start", b"POST"),
                                      ("POST", "/models/chat/info", b"GET"),
                                      ("DELETE", "/health", b"GET"),
                                      ("GET", "/models/stop-all", b"POST")):
            response = await self.http.request(method, self.url + path)
            self.assertEqual(response.code, 405, path)
            self.assertEqual(response.headers.getRawHeaders(b"Allow"), [allowed])
            self.assertEqual((await response.json())["error"]["code"], "method_not_allowed")

    async def test_head_on_health_answers_like_get_without_a_body(self):
        await self.node()
        response = await self.http.head(self.url + "/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        self.assertGreater(int(response.headers.getRawHeaders(b"Content-Length")[0]), 0)
        self.assertEqual(await response.content(), b"")
        status, health = await get_json(self.http, self.url + "/health")
        self.assertEqual((status, health["status"]), (200, "ok"))

    async def test_failed_start_reports_the_backend_output(self):
        await self.node(chat=demo_model(free_port(), flags="--exit-at-once 'no weights here'"))
        status, body, headers = await post_json(self.http, self.url + "/models/chat/start", {})
        self.assertEqual(status, 503)
        self.assertIn("no weights here", body["error"]["message"])
        self.assertTrue(headers.hasHeader(b"Retry-After"))
        _, info = await get_json(self.http, self.url + "/models/chat/info")
        self.assertEqual(info["state"], "failed")
        self.assertIn("no weights here", info["last_error"])

    async def test_auto_start_models_start_in_the_background(self):
        await self.node(auto=demo_model(free_port(), auto_start=True, flags="--start-delay 0.3"),
                        lazy=demo_model(free_port()))
        states = []
        for _ in range(100):
            status, health = await get_json(self.http, self.url + "/health")
            states.append(health["models"]["starting"])
            if health["models"]["starting"]:
                break
            await sleep(0.01)
        self.assertEqual(states[-1], 1, "the node answers while auto_start models start")
        for _ in range(100):
            _, info = await get_json(self.http, self.url + "/models/auto/info")
            if info["state"] == "running":
                break
            await sleep(0.05)
        self.assertEqual(info["state"], "running")
        _, info = await get_json(self.http, self.url + "/models/lazy/info")
        self.assertEqual(info["state"], "stopped")


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
