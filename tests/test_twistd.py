"""The twistd plugin and its options, and a real `twistd -n llmnode` process."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import signal

from twisted.application.service import IServiceMaker
from twisted.internet.error import ProcessDone
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmnode.tap import Options
from tests.support.nodes import (PACKAGE_ROOT, demo_model, free_port, http_client, pids_alive,
                                 post_json, sleep, write_config)
from tests.support.twistd import Twistd, TwistdMixin

class PluginTests(SynchronousTestCase):
    def test_twistd_finds_the_plugin(self):
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("llmnode", makers)
        self.assertIs(makers["llmnode"].options, Options)


class OptionsTests(SynchronousTestCase):
    def config(self, **program):
        return write_config(self, {"chat": demo_model(18999)}, **program)

    def test_config_and_overrides(self):
        options = Options()
        options.parseOptions(["--config", self.config(), "--port", "9123", "--host", "::1"])
        self.assertEqual(options["port"], 9123)
        self.assertEqual(options["host"], "::1")
        self.assertEqual([m.id for m in options.loaded.models], ["chat"])

    def test_config_is_required(self):
        error = self.assertRaises(usage.UsageError, Options().parseOptions, [])
        self.assertIn("--config is required", str(error))

    def test_missing_file_is_named(self):
        error = self.assertRaises(usage.UsageError, Options().parseOptions,
                                  ["--config", "/no/such/llmnode.yaml"])
        self.assertIn("/no/such/llmnode.yaml", str(error))

    def test_port_must_be_a_number(self):
        self.assertRaises(usage.UsageError, Options().parseOptions,
                          ["--config", self.config(), "--port", "eighty"])

    def test_invalid_config_lists_every_problem(self):
        path = write_config(self, {"chat": {"mode": "Chatty", "port": 70000}})
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", path])
        self.assertIn("Local-Models.chat.mode", str(error))
        self.assertIn("Local-Models.chat.port", str(error))

    def test_log_dir_override(self):
        options = Options()
        options.parseOptions(["--config", self.config(), "--log-dir", "/tmp/llmnode-logs"])
        self.assertEqual(options.loaded.program.log_dir, "/tmp/llmnode-logs")
        self.assertEqual(options.loaded.program.runtime_dir, "/tmp/run",
                         "a defaulted runtime_dir follows the log folder")


class TwistdProcessTests(TwistdMixin, TestCase):
    timeout = 60

    async def start_with_model(self):
        port = free_port()
        config = write_config(self, {"chat": demo_model(free_port(), flags="--fork-child")})
        process = self.spawn(config, port)
        http = http_client(self)
        url = f"http://127.0.0.1:{port}"
        status, health = await self.wait_healthy(http, url, process)
        self.assertEqual(status, 200)
        self.assertEqual(health["status"], "ok")
        status, info, _ = await post_json(http, url + "/api/models/chat/start", {})
        self.assertEqual(status, 200, info)
        import psutil
        group = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == info["supervisor_pid"]]
        self.assertGreaterEqual(len(group), 3, "supervisor, shell/backend and its child")
        return process, group

    async def assert_stops_cleanly_on(self, signum: int):
        """C{signum} to the node: every backend is gone and twistd exits 0."""
        process, group = await self.start_with_model()
        os.kill(_pid_of(process), signum)
        reason = await process.ended
        self.assertIsInstance(reason, ProcessDone, process.output[-3000:].decode(errors="replace"))
        self.assertEqual(pids_alive(group), [])
        self.assertIn(f"received {signal.Signals(signum).name}: stopping every model".encode(),
                      process.output)

    async def test_sigterm_stops_every_backend_and_exits_0(self):
        await self.assert_stops_cleanly_on(signal.SIGTERM)

    async def test_sigint_stops_every_backend_and_exits_0(self):
        """Ctrl-C in a foreground run stops like SIGTERM (twistd's default exits 130)."""
        await self.assert_stops_cleanly_on(signal.SIGINT)

    async def test_sigkill_of_the_node_leaves_no_backend(self):
        process, group = await self.start_with_model()
        os.kill(_pid_of(process), signal.SIGKILL)
        await process.ended
        for _ in range(100):
            if not pids_alive(group):
                break
            await sleep(0.1)
        self.assertEqual(pids_alive(group), [])


def _pid_of(process: Twistd) -> int:
    return process.transport.pid


def _pgid(pid: int):
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def readme_run_command() -> list[str]:
    """The words of the README's foreground run command, from C{twistd} on."""
    with open(os.path.join(PACKAGE_ROOT, "README.rst")) as f:
        for line in f:
            if "/twistd -n" in line:
                return shlex.split(line.split("&&")[-1])
    raise AssertionError("README.rst shows no 'twistd -n' command")


class ForegroundRunTests(TwistdMixin, TestCase):
    """A foreground run, as the README shows it, leaves nothing behind in its folder."""

    timeout = 60

    async def test_readme_command_writes_nothing_into_the_working_directory(self):
        words = readme_run_command()
        options = words[1:words.index("llmnode")]
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        port = free_port()
        process = self.spawn(write_config(self, {"chat": demo_model(free_port())}), port,
                             options, cwd=folder)
        status, _ = await self.wait_healthy(http_client(self), f"http://127.0.0.1:{port}",
                                            process)
        self.assertEqual(status, 200)
        self.assertEqual(os.listdir(folder), [], f"twistd {' '.join(options)} left files")
        os.kill(_pid_of(process), signal.SIGTERM)
        self.assertIsInstance(await process.ended, ProcessDone)

    def test_a_pid_file_is_ignored_by_git(self):
        with open(os.path.join(PACKAGE_ROOT, ".gitignore")) as f:
            patterns = [line.strip() for line in f if line.strip() and line[0] != "#"]
        self.assertTrue(any(fnmatch.fnmatch("twistd.pid", p) for p in patterns), patterns)


class ExampleConfigTests(TwistdMixin, TestCase):
    """The shipped example config runs as is: the README's first command."""

    timeout = 60

    async def test_example_config_serves_its_demo_models(self):
        import shutil
        import tempfile
        folder = tempfile.mkdtemp(prefix="llmnode-example-")
        self.addCleanup(shutil.rmtree, folder, True)
        config = os.path.join(folder, "config.example.yaml")
        with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "etc",
                               "config.example.yaml")) as f:
            text = f.read()
        # Only the demo models' fixed ports change: another process may hold them here.
        text, changed = re.subn(r"(?m)^(    port: )\d+$",
                                lambda m: m.group(1) + str(free_port()), text)
        self.assertEqual(changed, 6)
        with open(config, "w") as f:
            f.write(text)
        port = free_port()
        process = self.spawn(config, port)
        http = http_client(self)
        url = f"http://127.0.0.1:{port}"
        status, health = await self.wait_healthy(http, url, process)
        self.assertEqual(status, 200)
        self.assertEqual(health["models"]["stopped"], 6)
        status, body, _ = await post_json(http, url + "/v1/chat/completions", {
            "model": "demo", "messages": [{"role": "user", "content": "hello"}]})
        self.assertEqual(status, 200, body)
        status, body, _ = await post_json(http, url + "/v1/embeddings", {
            "model": "text-embedding-demo", "input": "hello"})
        self.assertEqual(status, 200, body)
        status, body, _ = await post_json(http, url + "/v1/rerank", {
            "model": "demo-rerank", "query": "fruit", "documents": ["apple", "car"]})
        self.assertEqual(status, 200, body)
        status, body, _ = await post_json(http, url + "/v1/images/generations", {
            "model": "demo-image", "prompt": "a fox"})
        self.assertEqual(status, 200, body)
        response = await http.post(url + "/v1/audio/speech", json={
            "model": "demo-tts", "input": "hello"})
        self.assertEqual((await response.content())[:4], b"RIFF")
        response = await http.post(url + "/v1/audio/transcriptions",
                                   data={"model": "demo-whisper"},
                                   files={"file": ("a.wav", b"RIFF....")})
        self.assertEqual((await response.json())["text"][:20], "transcribe: 8 bytes,")
        os.kill(process.transport.pid, signal.SIGTERM)
        reason = await process.ended
        self.assertIsInstance(reason, ProcessDone)
