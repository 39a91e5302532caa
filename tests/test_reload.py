"""Config reload on a live node: POST /api/config/reload and SIGHUP."""

from __future__ import annotations

import os
import signal

import yaml
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support.nodes import (base_url, demo_model, free_port, get_json, http_client,
                                 pids_alive, post_json, sleep, start_node, write_config)
from tests.support.twistd import TwistdMixin


def rewrite(path, update):
    with open(path) as f:
        document = yaml.safe_load(f)
    update(document)
    with open(path, "w") as f:
        yaml.safe_dump(document, f)


class ReloadTests(TestCase):
    timeout = 60

    async def test_reload_keeps_unchanged_models_and_applies_the_rest(self):
        models = {"keep": demo_model(free_port()), "change": demo_model(free_port()),
                  "drop": demo_model(free_port()), "relabel": demo_model(free_port())}
        service = await start_node(self, models)
        http = http_client(self)
        url = base_url(service)
        pids = {}
        for name in models:
            status, info, _ = await post_json(http, url + f"/api/models/{name}/start", {})
            self.assertEqual(status, 200, info)
            pids[name] = info["pid"]

        def update(document):
            local = document["Local-Models"]
            local["change"]["aliases"] = ["changed-alias"]
            local["change"]["start_timeout"] = 60
            local["relabel"]["aliases"] = ["other-name"]
            del local["drop"]
            local["new"] = demo_model(free_port())
        rewrite(service.config.path, update)

        status, outcome, _ = await post_json(http, url + "/api/config/reload", {})
        self.assertEqual(status, 200, outcome)
        self.assertEqual(outcome["unchanged"], ["keep"])
        self.assertEqual(outcome["changed"], ["change", "relabel"])
        self.assertEqual(outcome["removed"], ["drop"])
        self.assertEqual(outcome["added"], ["new"])
        _, info = await get_json(http, url + "/api/models/keep/info")
        self.assertEqual(info["pid"], pids["keep"], "an unchanged model keeps its process")
        _, info = await get_json(http, url + "/api/models/other-name/info")
        self.assertEqual((info["pid"], info["state"]), (pids["relabel"], "running"),
                         "a new name alone needs no restart")
        for _ in range(100):
            _, info = await get_json(http, url + "/api/models/changed-alias/info")
            if info["state"] == "running" and info["pid"] != pids["change"]:
                break
            await sleep(0.05)
        self.assertEqual(info["state"], "running")
        self.assertNotEqual(info["pid"], pids["change"], "a changed model restarts")
        self.assertEqual(pids_alive([pids["drop"], pids["change"]]), [])
        response = await http.get(url + "/api/models/drop/info")
        self.assertEqual(response.code, 404)
        status, body, _ = await post_json(http, url + "/v1/chat/completions", {
            "model": "new", "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 200)

    async def test_an_invalid_file_is_rejected_and_the_old_config_stays(self):
        service = await start_node(self, {"chat": demo_model(free_port())})
        http = http_client(self)
        url = base_url(service)
        _, info, _ = await post_json(http, url + "/api/models/chat/start", {})
        rewrite(service.config.path,
                lambda d: d["Local-Models"]["chat"].update(mode="Chatter", port=0))
        status, body, _ = await post_json(http, url + "/api/config/reload", {})
        self.assertEqual(status, 400)
        self.assertIn("Local-Models.chat.mode", body["error"]["message"])
        self.assertIn("Local-Models.chat.port", body["error"]["message"])
        status, body, _ = await post_json(http, url + "/v1/chat/completions", {
            "model": "chat", "messages": [{"role": "user", "content": "still here"}]})
        self.assertEqual(status, 200)
        _, after = await get_json(http, url + "/api/models/chat/info")
        self.assertEqual(after["pid"], info["pid"])

    async def test_a_misspelled_key_is_warned_about_at_start_and_in_the_reload_answer(self):
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        service = await start_node(self, {"chat": demo_model(free_port(), start_timout=3)})
        warnings = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.warn]
        self.assertIn("Local-Models.chat.start_timout: unknown key (did you mean "
                      "'start_timeout'?)", "\n".join(warnings))
        http = http_client(self)
        rewrite(service.config.path,
                lambda d: d["Local-Models"]["chat"].update(alive_tim=1))
        status, outcome, _ = await post_json(http, base_url(service) + "/api/config/reload", {})
        self.assertEqual(status, 200, outcome)
        self.assertEqual(sorted(outcome["warnings"]), [
            "Local-Models.chat.alive_tim: unknown key (did you mean 'alive_time'?)",
            "Local-Models.chat.start_timout: unknown key (did you mean 'start_timeout'?)"])

    async def test_with_strict_config_a_misspelled_key_is_refused_on_reload(self):
        service = await start_node(self, {"chat": demo_model(free_port())},
                                   strict_config=True)
        http = http_client(self)
        rewrite(service.config.path,
                lambda d: d["Local-Models"]["chat"].update(start_timout=3))
        status, body, _ = await post_json(http, base_url(service) + "/api/config/reload", {})
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
