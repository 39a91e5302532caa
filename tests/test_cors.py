"""CORS (program.cors_origins): preflights, headers on answers and errors, backends' own.

In memory (L{tests.support.memory}): a whole node, or the proxy over a scripted backend."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from llmnode.web.cors import Cors
from llmnode.web.root import CorsRoot
from tests.support.backends import ScriptedBackend
from tests.support.fake_node import FakeRuntime, model
from tests.support.memory import MemoryNet, MemoryProxy, memory_model, start_memory_node

APP = "http://app.example:3000"
CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


class CorsTests(SynchronousTestCase):
    def node(self, **program):
        self.server = start_memory_node(self, {"m": memory_model(9401)}, **program)

    def call(self, method, path, headers, body=None):
        return self.server.call(method, path, body, headers)

    def cors_headers(self, response) -> dict:
        return {name.decode().lower(): values for name, values in
                response.headers.getAllRawHeaders()
                if name.lower().startswith(b"access-control-") or name.lower() == b"vary"}

    def test_preflight_is_answered_without_a_key(self):
        self.node(cors_origins=[APP], api_keys=["k"])
        response, content = self.call("OPTIONS", CHAT, {
            "Origin": [APP], "Access-Control-Request-Method": ["POST"],
            "Access-Control-Request-Headers": ["authorization, content-type"]})
        self.assertEqual((response.code, content), (204, b""))
        self.assertEqual(self.cors_headers(response), {
            "access-control-allow-origin": [APP.encode()],
            "access-control-allow-methods": [b"GET, POST, PUT, PATCH, DELETE, OPTIONS"],
            "access-control-allow-headers": [b"authorization, content-type"],
            "access-control-max-age": [b"600"],
            "vary": [b"Origin"]})

    def test_answers_and_errors_carry_the_origin(self):
        self.node(cors_origins=["*"], api_keys=["k"])
        origin = "http://anything.example"
        response, content = self.call("POST", CHAT, {
            "Origin": [origin], "Authorization": ["Bearer k"],
            "Content-Type": ["application/json"]}, BODY)
        self.assertEqual(response.code, 200, content)
        self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"),
                         [origin.encode()])
        response, content = self.call("POST", CHAT, {"Origin": [origin]}, BODY)
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"),
                         [origin.encode()])

    def test_other_origins_get_no_cors_headers(self):
        self.node(cors_origins=[APP])
        response, content = self.call("OPTIONS", CHAT, {
            "Origin": ["http://evil.example"], "Access-Control-Request-Method": ["POST"]})
        self.assertEqual(response.code, 403)
        self.assertEqual(json.loads(content)["error"]["code"], "origin_not_allowed")
        self.assertEqual(self.cors_headers(response), {})
        response, _ = self.call("GET", "/v1/models", {"Origin": ["http://evil.example"]})
        self.assertEqual((response.code, self.cors_headers(response)), (200, {}))

    def test_off_by_default(self):
        self.node()
        response, _ = self.call("OPTIONS", CHAT, {
            "Origin": [APP], "Access-Control-Request-Method": ["POST"]})
        self.assertEqual(response.code, 405)
        response, _ = self.call("GET", "/v1/models", {"Origin": [APP]})
        self.assertEqual(self.cors_headers(response), {})

    def test_the_nodes_headers_replace_a_backends(self):
        self.check_the_nodes_headers_replace_a_backends(twisted_web=False)

    def test_the_nodes_headers_replace_a_backends_on_twisted_web(self):
        self.check_the_nodes_headers_replace_a_backends(twisted_web=True)

    def check_the_nodes_headers_replace_a_backends(self, twisted_web):
        def script(exchange):
            request = exchange.request
            request.setHeader(b"Access-Control-Allow-Origin", b"*")
            request.setHeader(b"Access-Control-Allow-Credentials", b"true")
            request.setHeader(b"Content-Type", b"application/json")
            request.write(b"{}")
            request.finish()

        net = MemoryNet()
        backend_port = net.listenTCP(0, Site(ScriptedBackend(script), reactor=net)).getHost().port
        runtime = FakeRuntime(model("m"), lambda: ("127.0.0.1", backend_port))
        self.server = MemoryProxy(self, [runtime], root=CorsRoot(cors=Cors([APP])), net=net,
                                  twisted_web=twisted_web)
        response, _ = self.call("POST", CHAT, {"Origin": [APP]}, BODY)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.cors_headers(response), {
            "access-control-allow-origin": [APP.encode()], "vary": [b"Origin"]})
        net.wait(runtime.when_idle())
