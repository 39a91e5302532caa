"""
Tests for L{llmnode.demo.llamacpp}: a real llama.cpp server on a tiny model.
"""

import json
import os
import signal
import sys
import textwrap

import yaml

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ProcessDone, ProcessExitedAlready, ProcessTerminated)
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from treq.client import HTTPClient

import llmnode
from llmnode.config import load_config
from llmnode.service import NodeService
from tests.support.nodes import base_url, free_port, http_client, post_json
from tests.support.tiny_gguf import write_tiny_gguf

try:
    import xllamacpp  # noqa: F401
except ImportError as e:
    _IMPORT_ERROR = "xllamacpp cannot be imported here: %s" % (e,)
else:
    _IMPORT_ERROR = None

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(llmnode.__file__))
_WAIT = 30
_TAIL = 4096


class ServerProcess(ProcessProtocol):
    """
    Follow one script run: where it listens, its stderr tail, how it ended.
    """

    def __init__(self):
        self.listening = Deferred()
        self.ended = Deferred()
        self.status = None
        self._stdout = b""
        self.stderr = b""

    def outReceived(self, data):
        self._stdout += data
        while b"\n" in self._stdout and not self.listening.called:
            line, self._stdout = self._stdout.split(b"\n", 1)
            if line.startswith(b"listening on "):
                where = line.split()[2].decode("ascii")
                host, port = where.rsplit(":", 1)
                self.listening.callback((host, int(port)))

    def errReceived(self, data):
        self.stderr = (self.stderr + data)[-_TAIL:]

    def processEnded(self, reason):
        self.status = reason.value
        if not self.listening.called:
            self.listening.errback(
                RuntimeError("exited before listening: %s\n%s" % (
                    reason.value, self.stderr.decode("utf-8", "replace"))))
        if not self.ended.called:
            self.ended.callback(reason.value)


class LlamaCppScriptTests(TestCase):
    """
    Run C{python -m llmnode.demo.llamacpp} and talk to it over HTTP.
    """

    def setUp(self):
        if _IMPORT_ERROR is not None:
            raise SkipTest(_IMPORT_ERROR)
        folder = self.mktemp()
        os.makedirs(folder)
        self.model = write_tiny_gguf(os.path.join(folder, "tiny.gguf"))
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    def spawn(self, *arguments):
        """
        Start the script with C{arguments}; kill it at cleanup.
        """
        process = ServerProcess()
        argv = [sys.executable, "-m", "llmnode.demo.llamacpp"]
        argv += list(arguments)
        env = {"PATH": os.environ.get("PATH", ""),
               "PYTHONPATH": _PACKAGE_ROOT}
        transport = reactor.spawnProcess(
            process, sys.executable, argv, env=env)
        self.addCleanup(self._kill, process, transport)
        return process

    async def _kill(self, process, transport):
        if process.status is None:
            try:
                transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
        await process.ended

    async def start(self, *extra):
        """
        Start a server on a free port for the tiny model; return its URL.
        """
        process = self.spawn(
            "--model", self.model.path, "--port", "0", "--threads", "1",
            "--alias", "tiny", *extra)
        host, port = await process.listening.addTimeout(_WAIT, reactor)
        return "http://%s:%d" % (host, port)

    async def post(self, url, body):
        response = await self.http.post(
            url, data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": ["application/json"]})
        return response, await response.text("utf-8")

    async def test_health_and_models(self):
        """
        Once the script says where it listens, C{/health} answers 200 and
        C{/v1/models} lists the model under its alias.
        """
        url = await self.start()
        health = await self.http.get(url + "/health")
        self.assertEqual(200, health.code)
        self.assertEqual("ok", (await health.json())["status"])
        models = await (await self.http.get(url + "/v1/models")).json()
        self.assertEqual(["tiny"], [m["id"] for m in models["data"]])

    async def test_chat_completion(self):
        """
        A chat completion answers one assistant message of at most
        C{max_tokens} tokens, with usage counts.
        """
        url = await self.start()
        response, text = await self.post(url + "/v1/chat/completions", {
            "model": "tiny", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello"}]})
        self.assertEqual(200, response.code, text)
        answer = json.loads(text)
        self.assertEqual("chat.completion", answer["object"])
        message = answer["choices"][0]["message"]
        self.assertEqual("assistant", message["role"])
        self.assertIsInstance(message["content"], str)
        usage = answer["usage"]
        self.assertTrue(1 <= usage["completion_tokens"] <= 8, usage)
        self.assertEqual(
            usage["prompt_tokens"] + usage["completion_tokens"],
            usage["total_tokens"])

    async def test_chat_stream(self):
        """
        A streamed chat completion is a series of SSE chunks ending with
        C{data: [DONE]}.
        """
        url = await self.start()
        response, text = await self.post(url + "/v1/chat/completions", {
            "model": "tiny", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "hello"}]})
        self.assertEqual(200, response.code, text)
        self.assertIn(
            "text/event-stream",
            response.headers.getRawHeaders("content-type")[0])
        events = [e for e in text.split("\n\n") if e.strip()]
        self.assertEqual("data: [DONE]", events[-1])
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        self.assertTrue(chunks)
        self.assertEqual(
            {"chat.completion.chunk"}, {c["object"] for c in chunks})
        content = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks)
        self.assertIsInstance(content, str)
        self.assertIsNotNone(chunks[-1]["choices"][0]["finish_reason"])

    async def test_completion(self):
        """
        A text completion answers a text choice.
        """
        url = await self.start()
        response, text = await self.post(url + "/v1/completions", {
            "model": "tiny", "max_tokens": 8, "prompt": "the model"})
        self.assertEqual(200, response.code, text)
        answer = json.loads(text)
        self.assertEqual("text_completion", answer["object"])
        self.assertIsInstance(answer["choices"][0]["text"], str)
        self.assertTrue(1 <= answer["usage"]["completion_tokens"] <= 8)

    async def test_embeddings(self):
        """
        With C{--embedding}, C{/v1/embeddings} answers one vector per input,
        as wide as the model.
        """
        url = await self.start("--embedding")
        response, text = await self.post(url + "/v1/embeddings", {
            "model": "tiny", "input": ["hello world", "the node"]})
        self.assertEqual(200, response.code, text)
        answer = json.loads(text)
        self.assertEqual(
            [self.model.n_embd] * 2,
            [len(item["embedding"]) for item in answer["data"]])
        self.assertGreater(answer["usage"]["prompt_tokens"], 0)

    async def test_sigterm(self):
        """
        SIGTERM stops the server with exit status 0.
        """
        process = self.spawn(
            "--model", self.model.path, "--port", "0", "--threads", "1")
        await process.listening.addTimeout(_WAIT, reactor)
        os.kill(process.transport.pid, signal.SIGTERM)
        status = await process.ended.addTimeout(_WAIT, reactor)
        self.assertIsInstance(status, ProcessDone)

    async def test_alarm(self):
        """
        The script exits on its own, with status 3, once its alarm rings.
        """
        process = self.spawn(
            "--model", self.model.path, "--port", "0", "--alarm", "1")
        await process.listening.addTimeout(_WAIT, reactor)
        status = await process.ended.addTimeout(_WAIT, reactor)
        self.assertIsInstance(status, ProcessTerminated)
        self.assertEqual(3, status.exitCode)

    async def test_missing_model(self):
        """
        A model path that does not exist ends the script with status 2 and
        a message naming the path, before it listens.
        """
        missing = os.path.abspath(self.mktemp())
        process = self.spawn("--model", missing, "--port", "0")
        status = await process.ended.addTimeout(_WAIT, reactor)
        self.assertEqual(2, status.exitCode)
        self.assertIn(missing.encode("utf-8"), process.stderr)
        self.assertFailure(process.listening, RuntimeError)
        await process.listening

    async def test_unloadable_model(self):
        """
        A file llama.cpp cannot load ends the script with status 1 before
        it listens.
        """
        junk = self.mktemp()
        with open(junk, "wb") as f:
            f.write(b"GGUF" + b"\0" * 60)
        process = self.spawn("--model", junk, "--port", "0")
        status = await process.ended.addTimeout(_WAIT, reactor)
        self.assertEqual(1, status.exitCode)
        self.assertIn(b"server did not start", process.stderr)
        self.assertFailure(process.listening, RuntimeError)
        await process.listening


def readme_recipe() -> str:
    """The YAML block of README's section on C{llmnode.demo.llamacpp}."""
    with open(os.path.join(_PACKAGE_ROOT, "README.rst")) as f:
        text = f.read()
    section = text[text.index("A real model without building llama.cpp"):]
    block = section[section.index(".. code-block:: yaml"):].split("\n\n", 2)[1]
    return textwrap.dedent(block)


class ReadmeRecipeTests(TestCase):
    """
    The README's llama.cpp recipe, as written, serves a GGUF file found
    beside the config.
    """

    timeout = 120

    async def node(self, with_model_file):
        """
        Run a node on the recipe (the model's port made free); return its
        URL, the model name and the relative model path.
        """
        recipe = yaml.safe_load(readme_recipe())
        (name, model), = recipe["Local-Models"].items()
        model["port"] = free_port()
        script = model["CPU"]["script_path"]
        relative = script.split("--model ", 1)[1].split()[0]
        self.assertFalse(os.path.isabs(relative))
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        if with_model_file:
            os.makedirs(os.path.dirname(os.path.join(folder, relative)))
            write_tiny_gguf(os.path.join(folder, relative))
        path = os.path.join(folder, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(dict(recipe, program={"host": "127.0.0.1",
                                                 "log_dir": "logs"}), f)
        service = NodeService(load_config(path), reactor, host="127.0.0.1",
                              port=0)
        service.startService()
        self.addCleanup(service.stopService)
        await service.when_ready()
        self.http = http_client(self)
        return base_url(service), name, relative

    async def test_chat_through_the_node(self):
        url, name, _ = await self.node(with_model_file=True)
        status, body, _ = await post_json(
            self.http, url + "/v1/chat/completions",
            {"model": name, "max_tokens": 4,
             "messages": [{"role": "user", "content": "hello"}]})
        self.assertEqual(200, status, body)
        self.assertEqual("assistant", body["choices"][0]["message"]["role"])

    async def test_missing_model_file_is_named_in_the_503(self):
        url, name, relative = await self.node(with_model_file=False)
        status, body, _ = await post_json(
            self.http, url + "/v1/chat/completions",
            {"model": name, "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(503, status, body)
        self.assertIn("no model file at " + relative,
                      body["error"]["message"])
