"""Config reload on a live node: POST /api/config/reload on a node in memory; SIGHUP to a
twistd process."""

from __future__ import annotations

import os
import signal

import yaml
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.memory import memory_model, start_memory_node
from tests.support.nodes import (demo_model, free_port, get_json, http_client, sleep,
                                 write_config)
from tests.support.twistd import TwistdMixin


def rewrite(path, update):
    with open(path) as f:
        document = yaml.safe_load(f)
    update(document)
    with open(path, "w") as f:
        yaml.safe_dump(document, f)


class ReloadTests(SynchronousTestCase):
    """POST /api/config/reload on a whole node in memory (L{tests.support.memory})."""

    def test_reload_keeps_unchanged_models_and_applies_the_rest(self):
        models = {name: memory_model(port) for name, port in (
            ("keep", 9701), ("change", 9702), ("drop", 9703), ("relabel", 9704))}
        service = start_memory_node(self, models)
        pids = {}
        for name in models:
            status, info, _ = service.call_json("POST", f"/api/models/{name}/start", {})
            self.assertEqual(status, 200, info)
            pids[name] = info["pid"]

        def update(document):
            local = document["Local-Models"]
            local["change"]["aliases"] = ["changed-alias"]
            local["change"]["start_timeout"] = 60
            local["relabel"]["aliases"] = ["other-name"]
            del local["drop"]
            local["new"] = memory_model(9705)
        rewrite(service.config.path, update)

        status, outcome, _ = service.call_json("POST", "/api/config/reload", {})
        self.assertEqual(status, 200, outcome)
        self.assertEqual(outcome["unchanged"], ["keep"])
        self.assertEqual(outcome["changed"], ["change", "relabel"])
        self.assertEqual(outcome["removed"], ["drop"])
        self.assertEqual(outcome["added"], ["new"])
        _, info, _ = service.call_json("GET", "/api/models/keep/info")
        self.assertEqual(info["pid"], pids["keep"], "an unchanged model keeps its process")
        _, info, _ = service.call_json("GET", "/api/models/other-name/info")
        self.assertEqual((info["pid"], info["state"]), (pids["relabel"], "running"),
                         "a new name alone needs no restart")
        for _ in range(100):
            _, info, _ = service.call_json("GET", "/api/models/changed-alias/info")
            if info["state"] == "running" and info["pid"] != pids["change"]:
                break
            service.net.run(0.05)
        self.assertEqual(info["state"], "running")
        self.assertNotEqual(info["pid"], pids["change"], "a changed model restarts")
        self.assertEqual([run.server_pid for run in service.runs if run.serving
                          and run.server_pid in (pids["drop"], pids["change"])], [])
        response, _ = service.call("GET", "/api/models/drop/info")
        self.assertEqual(response.code, 404)
        status, body, _ = service.call_json("POST", "/v1/chat/completions", {
            "model": "new", "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 200)

    def test_an_invalid_file_is_rejected_and_the_old_config_stays(self):
        service = start_memory_node(self, {"chat": memory_model(9701)})
        _, info, _ = service.call_json("POST", "/api/models/chat/start", {})
        rewrite(service.config.path,
                lambda d: d["Local-Models"]["chat"].update(mode="Chatter", port=0))
        status, body, _ = service.call_json("POST", "/api/config/reload", {})
        self.assertEqual(status, 400)
        self.assertIn("Local-Models.chat.mode", body["error"]["message"])
        self.assertIn("Local-Models.chat.port", body["error"]["message"])
        status, body, _ = service.call_json("POST", "/v1/chat/completions", {
            "model": "chat", "messages": [{"role": "user", "content": "still here"}]})
        self.assertEqual(status, 200)
        _, after, _ = service.call_json("GET", "/api/models/chat/info")
        self.assertEqual(after["pid"], info["pid"])

    def test_a_misspelled_key_is_warned_about_at_start_and_in_the_reload_answer(self):
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        service = start_memory_node(self, {"chat": memory_model(9701, start_timout=3)})
        warnings = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.warn]
        self.assertIn("Local-Models.chat.start_timout: unknown key (did you mean "
                      "'start_timeout'?)", "\n".join(warnings))
        rewrite(service.config.path,
                lambda d: d["Local-Models"]["chat"].update(alive_tim=1))
        status, outcome, _ = service.call_json("POST", "/api/config/reload", {})
        self.assertEqual(status, 200, outcome)
        self.assertEqual(sorted(outcome["warnings"]), [
            "Local-Models.chat.alive_tim: unknown key (did you mean 'alive_time'?)",
            "Local-Models.chat.start_timout: unknown key (did you mean 'start_timeout'?)"])

    def test_with_strict_config_a_misspelled_key_is_refused_on_reload(self):
        service = start_memory_node(self, {"chat": memory_model(9701)}, strict_config=True)
        rewrite(service.config.path,
                lambda d: d["Local-Models"]["chat"].update(start_timout=3))
        status, body, _ = service.call_json("POST", "/api/config/reload", {})
        self.assertEqual(status, 400)
        self.assertIn("Local-Models.chat.start_timout: unknown key", body["error"]["message"])
        self.assertIn("old one stays in force", body["error"]["message"])


class SighupTests(TwistdMixin, TestCase):
    timeout = 60

    async def test_sighup_reloads_the_config(self):
        port = free_port()
        config = write_config(self, {"a": demo_model(free_port())})
        process = self.spawn(config, port)
        http = http_client(self)
        url = f"http://127.0.0.1:{port}"
        await self.wait_healthy(http, url, process)
        rewrite(config, lambda d: d["Local-Models"].update(b=demo_model(free_port())))
        os.kill(process.transport.pid, signal.SIGHUP)
        for _ in range(100):
            status, body = await get_json(http, url + "/api/models")
            if len(body["models"]) == 2:
                break
            await sleep(0.05)
        self.assertEqual([m["id"] for m in body["models"]], ["a", "b"])
