"""The endpoints beyond chat: audio, speech, images, responses, messages, llama.cpp's native
routes, routed by model through the real proxy; multipart routing; per-model parameter filters.

Most tests run in memory (L{tests.support.memory}): the proxy is served by the node's server on
a L{MemoryNet}, the demo backend is its resource on the same network, and time is a fake clock.
The streamed uploads stay on real sockets: their subject is a large body arriving in pieces
over TCP and reaching the backend before it ends."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from llmnode.config import Program
from llmnode.errors import BadRequest
from llmnode.web.client import make_client
from llmnode.web.body import max_body_bytes
from llmnode.web.multipart import boundary_of, form_fields
from llmnode.web.proxy import mount
from llmnode.web.root import Root
from tests.support.backends import ScriptedBackend
from tests.support.demo import spawn_demo
from tests.support.fake_node import FakeNode, FakeRuntime, model
from tests.support.net import (
    RawClient, http_client, http_request, listen_node, parse_response, raw_connect)
from tests.test_proxy import MemoryProxyCase

BOUNDARY = "llmnode-test-boundary"


def form(fields: dict, boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body: C{fields} maps a name to text, or to (filename, bytes)."""
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data = value
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n")
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n\r\n', value.encode()
        parts.append(f"--{boundary}\r\n{head}".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


class MultipartTests(SynchronousTestCase):
    """Finding the routing fields of an upload without parsing the files."""

    def test_fields_are_found_after_a_file_that_mentions_them(self):
        audio = b'Content-Disposition: form-data; name="model"\r\n\r\nfake\r\n' * 3
        body = b"preamble\r\n" + form({"file": ("a.wav", audio), "model": "whisper",
                                       "stream": "true"})
        spans = form_fields(body, BOUNDARY.encode(), frozenset({b"model", b"stream"}))
        self.assertEqual({name: body[a:b] for name, (a, b) in spans.items()},
                         {b"model": b"whisper", b"stream": b"true"})

    def test_the_boundary_may_be_quoted(self):
        self.assertEqual(boundary_of(b'Multipart/Form-Data; charset=x; boundary="a b"'), b"a b")
        self.assertEqual(boundary_of(b"multipart/form-data;boundary=xyz"), b"xyz")

    def test_a_body_that_is_not_a_whole_form_is_refused(self):
        whole = form({"model": "m", "file": ("f", b"data")})
        for content_type in (b"application/json", None, b"multipart/form-data"):
            self.assertRaises(BadRequest, boundary_of, content_type)
        for body in (b"", b"no boundary here", whole[:-20],
                     f"--{BOUNDARY}\r\nContent-Disposition: form-data".encode(),
                     f"--{BOUNDARY}garbage\r\n\r\n\r\n--{BOUNDARY}--".encode()):
            with self.assertRaises(BadRequest, msg=body):
                form_fields(body, BOUNDARY.encode(), frozenset({b"model"}))


class MemoryEndpointCase(MemoryProxyCase):
    """The proxy in memory, and helpers to post forms and check errors through it."""

    def post_form(self, path, fields):
        response, content = self.post(path, form(fields), {"Content-Type": FORM_TYPE})
        return response, json.loads(content)

    def assertError(self, response, content, status, param=None):
        payload = json.loads(content) if isinstance(content, bytes) else content
        self.assertEqual(response.code, status, payload)
        self.assertEqual(set(payload["error"]), {"message", "type", "param", "code"})
        self.assertEqual(payload["error"]["param"], param)
        return payload["error"]["message"]


class EndpointTests(MemoryEndpointCase):
    """Each endpoint reaches the backend of the model named in the request."""

    def test_every_endpoint_reaches_its_backend_path(self):
        runtimes = [FakeRuntime(model(name, mode), self.demo())
                    for name, mode in (("chat", "Chat"), ("whisper", "Audio"),
                                       ("tts", "Speech"), ("sd", "Image"))]
        self.serve(runtimes)
        messages = [{"role": "user", "content": "hi there"}]
        json_calls = {
            "/v1/responses": ({"model": "chat", "input": "hi there"},
                              lambda a: a["output"][0]["content"][0]["text"], "echo: hi there"),
            "/v1/messages": ({"model": "chat", "messages": messages, "max_tokens": 9},
                             lambda a: a["content"][0]["text"], "echo: hi there"),
            "/v1/messages/count_tokens": ({"model": "chat", "messages": messages},
                                          lambda a: a["input_tokens"], 2),
            "/completion": ({"model": "chat", "prompt": "once"},
                            lambda a: a["content"], "echo: once"),
            "/infill": ({"model": "chat", "input_prefix": "a", "input_suffix": "b"},
                        lambda a: a["content"], "echo: a|b"),
            "/tokenize": ({"model": "chat", "content": "one two"},
                          lambda a: len(a["tokens"]), 2),
            "/detokenize": ({"model": "chat", "tokens": [5, 6]},
                            lambda a: a["content"], "<5> <6>"),
            "/v1/images/generations": ({"model": "sd", "prompt": "a cat", "n": 2},
                                       lambda a: [i["revised_prompt"] for i in a["data"]],
                                       ["a cat", "a cat"]),
        }
        for path, (body, read, expected) in json_calls.items():
            response, answer = self.post_json(path, body)
            self.assertEqual(response.code, 200, (path, answer))
            self.assertEqual(read(answer), expected, path)
            self.assertEqual((answer["llmnode_echo"]["path"], answer["llmnode_echo"]["model"]),
                             (path, body["model"]))

        audio = bytes(range(256)) * 64
        digest = hashlib.sha256(audio).hexdigest()
        for path, task in (("/v1/audio/transcriptions", "transcribe"),
                           ("/v1/audio/translations", "translate")):
            response, answer = self.post_form(path, {"model": "whisper", "file": ("a.wav", audio)})
            self.assertEqual(response.code, 200, answer)
            self.assertEqual(answer["text"], f"{task}: {len(audio)} bytes, sha256 {digest}")
        response, answer = self.post_form(
            "/v1/images/edits", {"model": "sd", "image": ("i.png", audio), "prompt": "p"})
        self.assertEqual(answer["data"][0]["revised_prompt"], f"edit of {len(audio)} bytes: p")

        response, content = self.post("/v1/audio/speech",
                                      {"model": "tts", "input": "hello there", "voice": "x"})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"audio/wav"])
        self.assertEqual(content[:4] + content[8:12], b"RIFFWAVE")
        self.assertEqual([r.spawns for r in runtimes], [1, 1, 1, 1])
        for runtime in runtimes:
            self.net.wait(runtime.when_idle())

    def test_a_model_serves_only_its_modes_endpoints(self):
        runtimes = [FakeRuntime(model(name, mode), self.demo())
                    for name, mode in (("chat", "Chat"), ("whisper", "Audio"), ("base", "Base"),
                                       ("embed", "Embedding"))]
        self.serve(runtimes)
        message = self.assertError(*self.post_form(
            "/v1/audio/transcriptions", {"model": "chat", "file": ("a", b"x")}), 400, "model")
        self.assertIn("mode 'Chat'", message)
        self.assertIn("audio transcriptions", message)
        message = self.assertError(*self.post(
            "/v1/chat/completions", {"model": "whisper", "messages": []}), 400, "model")
        self.assertIn("mode 'Audio'", message)
        message = self.assertError(*self.post(
            "/v1/responses", {"model": "base", "input": "x"}), 400, "model")
        self.assertIn("mode 'Base'", message)
        message = self.assertError(*self.post(
            "/tokenize", {"model": "embed", "content": "x"}), 400, "model")
        self.assertIn("mode 'Embedding'", message)
        response, content = self.post("/tokenize", {"model": "base", "content": "x"})
        self.assertEqual(response.code, 200)
        self.assertEqual([r.spawns for r in runtimes], [0, 0, 1, 0])
        self.net.wait(runtimes[2].when_idle())

    def test_an_endpoints_list_overrides_the_mode(self):
        limited = dataclasses.replace(model("limited", "Chat"),
                                      endpoints=frozenset({"completions", "transcriptions"}))
        runtime = FakeRuntime(limited, self.demo())
        self.serve([runtime])
        message = self.assertError(*self.post(
            "/v1/chat/completions", {"model": "limited", "messages": []}), 400, "model")
        self.assertIn("endpoints list", message)
        response, answer = self.post_form(
            "/v1/audio/transcriptions", {"model": "limited", "file": ("a", b"xyz")})
        self.assertEqual(response.code, 200)
        self.net.wait(runtime.when_idle())


class UploadTests(MemoryEndpointCase):
    """Multipart uploads: routing errors, limits, the model rewritten in the form."""

    def test_bad_uploads_get_a_clear_400_and_start_nothing(self):
        runtime = FakeRuntime(model("whisper", "Audio"), self.demo())
        self.serve([runtime])
        path = "/v1/audio/transcriptions"
        message = self.assertError(*self.post_form(path, {"file": ("a.wav", b"RIFF")}),
                                   400, "model")
        self.assertIn("'model'", message)
        message = self.assertError(*self.post(path, {"model": "whisper"}), 400)
        self.assertIn("multipart/form-data", message)
        message = self.assertError(*self.post(
            path, form({"model": "whisper", "file": ("a", b"x")})[:-30],
            {"Content-Type": FORM_TYPE}), 400)
        self.assertIn("broken multipart body", message)
        self.assertError(*self.post_form(path, {"model": "nobody", "file": ("a", b"x")}),
                         404, "model")
        self.assertEqual(runtime.spawns, 0)

    def test_an_upload_over_the_limit_is_refused_before_the_backend_sees_it(self):
        runtime = FakeRuntime(model("whisper", "Audio"), self.demo())
        proxy = self.serve([runtime], Program(max_body_mb=1))
        body = form({"model": "whisper", "file": ("a.wav", b"\0" * (1024 * 1024 + 1))})
        client = self.net.connect(proxy.port, RawClient())
        client.transport.write(http_request(
            "POST", "/v1/audio/transcriptions", body, {"Content-Type": FORM_TYPE}))
        self.net.wait(client.when_received(b"}}"))
        status, _, content, _ = parse_response(client.data)
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(content)["error"]["code"], "request_too_large")
        self.assertEqual(runtime.spawns, 0)

    def test_upstream_model_is_written_into_the_form(self):
        renamed = model("whisper", "Audio", upstream_model="org/whisper-large")
        runtime = FakeRuntime(renamed, self.demo())
        self.serve([runtime])
        audio = b"\xff\xfe" * 5000
        response, answer = self.post_form(
            "/v1/audio/transcriptions", {"model": "whisper", "file": ("a", audio),
                                         "response_format": "verbose_json"})
        self.assertEqual(response.code, 200, answer)
        self.assertEqual(answer["llmnode_echo"]["model"], "org/whisper-large")
        self.assertIn(hashlib.sha256(audio).hexdigest(), answer["text"])
        self.assertEqual(answer["task"], "transcribe")
        self.net.wait(runtime.when_idle())


class ScriptedCase(MemoryEndpointCase):
    """A L{ScriptedBackend} behind the proxy, on the same in-memory network."""

    def scripted(self, script, model) -> ScriptedBackend:
        """Serve C{model} by C{script}; the backend."""
        backend = ScriptedBackend(script)
        port = self.net.listenTCP(0, Site(backend, reactor=self.net)).getHost().port
        self.runtime = FakeRuntime(model, lambda: ("127.0.0.1", port))
        self.serve([self.runtime])
        return backend


class DownloadTests(ScriptedCase):
    """Audio bytes stream out; a client that leaves closes the backend connection."""

    def test_client_leaving_mid_download_closes_the_backend(self):
        def script(exchange):
            exchange.request.setHeader(b"Content-Type", b"audio/wav")
            exchange.request.write(b"RIFF" + b"\0" * 4096)  # and then nothing more

        backend = self.scripted(script, model("tts", "Speech"))
        client = self.net.connect(self.proxy.port, RawClient())
        body = json.dumps({"model": "tts", "input": "a long speech"}).encode()
        client.transport.write(http_request("POST", "/v1/audio/speech", body))
        self.net.wait(client.when_received(b"RIFF"))
        client.transport.abortConnection()
        self.net.wait(backend.exchanges[0].closed)
        self.net.wait(self.runtime.when_idle())
        self.assertEqual((self.runtime.started, self.runtime.finished), (1, 1))


class FilterTests(ScriptedCase):
    """strip_params, default_params and set_params edit JSON bodies before they are sent."""

    def test_parameters_are_stripped_defaulted_and_set(self):
        def script(exchange):
            exchange.request.setHeader(b"Content-Type", b"application/json")
            exchange.request.write(b"{}")
            exchange.request.finish()

        filtered = dataclasses.replace(
            model("m", aliases=("alias",)), strip_params=("top_k", "absent"),
            default_params={"max_tokens": 64, "temperature": 0.7},
            set_params={"stop": ["</s>"], "seed": 1})
        backend = self.scripted(script, filtered)
        sent = {"model": "alias", "messages": [], "top_k": 40, "temperature": 0.1, "seed": 9}
        response, _ = self.post("/v1/chat/completions", sent)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(backend.exchanges[0].body), {
            "model": "alias", "messages": [], "temperature": 0.1, "seed": 1,
            "max_tokens": 64, "stop": ["</s>"]})
        response, _ = self.post("/v1/chat/completions", b"[1]")
        self.assertEqual(response.code, 400)
        self.assertEqual(len(backend.exchanges), 1)
        self.net.wait(self.runtime.when_idle())


class Receiver(Protocol):
    """A bare backend that reads what it is sent and never answers."""

    def __init__(self):
        self.received = 0
        self.lost: Deferred = Deferred()
        self._wanted: list = []

    def dataReceived(self, data):
        self.received += len(data)
        for wanted in [w for w in self._wanted if self.received >= w[0]]:
            self._wanted.remove(wanted)
            wanted[1].callback(self.received)

    def connectionLost(self, reason):
        self.lost.callback(None)

    def when_received(self, count: int) -> Deferred:
        waiter: Deferred = Deferred()
        self._wanted.append((count, waiter))
        return waiter


class StreamedUploadTests(TestCase):
    """A large upload reaches the backend as it arrives (through the node's own server, root
    and client), with the same answers as a small one: bytes over real sockets, arriving in
    pieces as TCP delivers them."""

    timeout = 60

    def setUp(self):
        self.client = http_client(self)

    def demo(self):
        return lambda: spawn_demo(self).ready

    async def post_form(self, port, path, fields):
        response = await self.client.post(f"http://127.0.0.1:{port}{path}", data=form(fields),
                                          headers={"Content-Type": FORM_TYPE})
        return response, json.loads(await response.content())

    def serve(self, runtimes, program=Program()):
        http, agent = make_client(reactor)
        self.addCleanup(agent.closeCachedConnections)
        root = Root()
        v1 = mount(root, FakeNode(runtimes), http, reactor, program)
        self.addCleanup(v1.close)
        _, port = listen_node(self, root, max_body_bytes=max_body_bytes(program.max_body_mb))
        return port

    async def test_the_backend_gets_the_upload_before_it_ends_and_loses_it_with_the_client(self):
        backend = Receiver()
        listening = reactor.listenTCP(0, Factory.forProtocol(lambda: backend),
                                      interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        address = ("127.0.0.1", listening.getHost().port)
        runtime = FakeRuntime(model("whisper", "Audio"), lambda: address)
        port = self.serve([runtime])
        client = await raw_connect(self, port)
        client.transport.write(upload_head(20 * 2**20) + b"\0" * 3 * 2**20)
        await backend.when_received(2 * 2**20)
        client.transport.abortConnection()
        await backend.lost
        await runtime.when_idle()
        self.assertEqual((runtime.started, runtime.finished), (1, 1))

    async def test_answers_match_a_small_uploads(self):
        runtime = FakeRuntime(model("whisper", "Audio", upstream_model="org/whisper"),
                              self.demo())
        other = FakeRuntime(model("chat", "Chat"), self.demo())
        port = self.serve([runtime, other])
        audio = bytes(range(256)) * (6 * 4096)  # 6 MiB
        digest = hashlib.sha256(audio).hexdigest()
        for fields in ({"model": "whisper", "file": ("a.wav", audio)},
                       {"file": ("a.wav", audio), "model": "whisper"}):
            response, answer = await self.post_form(port, "/v1/audio/transcriptions", fields)
            self.assertEqual(response.code, 200, answer)
            self.assertEqual(answer["text"], f"transcribe: {len(audio)} bytes, sha256 {digest}")
            self.assertEqual(answer["llmnode_echo"]["model"], "org/whisper")
        for fields, status in (({"model": "chat", "file": ("a.wav", audio)}, 400),
                               ({"file": ("a.wav", audio)}, 400),
                               ({"model": "nobody", "file": ("a.wav", audio)}, 404)):
            client = await raw_connect(self, port)
            body = form(fields)
            client.transport.write(http_request(
                "POST", "/v1/audio/transcriptions", body,
                {"Content-Type": FORM_TYPE, "Connection": "close"}))
            await client.lost
            answer, headers, content, _ = parse_response(client.data)
            self.assertEqual(answer, status, content)
            self.assertEqual(json.loads(content)["error"]["param"], "model")
        self.assertEqual((runtime.spawns, other.spawns), (1, 0))
        await runtime.when_idle()


def upload_head(length: int) -> bytes:
    """The head of an upload of C{length} bytes, and the form up to its file's bytes."""
    start = form({"model": "whisper"})[:-len(f"--{BOUNDARY}--\r\n")] + (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="a.wav"\r\n\r\n').encode()
    return (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM_TYPE}"
            f"\r\nContent-Length: {length}\r\n\r\n").encode() + start
