"""CORS (program.cors_origins): preflights, headers on answers and errors, backends' own."""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from llmnode.config import Program
from llmnode.web.cors import Cors
from llmnode.web.proxy import mount
from llmnode.web.root import CorsRoot
from tests.support.backends import ScriptedBackend
from tests.support.fake_node import FakeNode, FakeRuntime, model
from tests.support.net import http_client, listen, listen_node
from tests.support.nodes import base_url, demo_model, free_port, start_node

APP = "http://app.example:3000"
CHAT = "/v1/chat/completions"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


class CorsTests(TestCase):
    timeout = 60

    async def node(self, **program):
        service = await start_node(self, {"m": demo_model(free_port())}, **program)
        self.url = base_url(service)
        self.http = http_client(self)

    async def call(self, method, path, headers, body=None):
        response = await self.http.request(method, self.url + path, headers=headers, data=body)
        return response, await response.content()

    def cors_headers(self, response) -> dict:
        return {name.decode().lower(): values for name, values in
                response.headers.getAllRawHeaders()
                if name.lower().startswith(b"access-control-") or name.lower() == b"vary"}

    async def test_preflight_is_answered_without_a_key(self):
        await self.node(cors_origins=[APP], api_keys=["k"])
        response, content = await self.call("OPTIONS", CHAT, {
            "Origin": [APP], "Access-Control-Request-Method": ["POST"],
            "Access-Control-Request-Headers": ["authorization, content-type"]})
        self.assertEqual((response.code, content), (204, b""))
        self.assertEqual(self.cors_headers(response), {
            "access-control-allow-origin": [APP.encode()],
            "access-control-allow-methods": [b"GET, POST, PUT, PATCH, DELETE, OPTIONS"],
            "access-control-allow-headers": [b"authorization, content-type"],
            "access-control-max-age": [b"600"],
            "vary": [b"Origin"]})

    async def test_answers_and_errors_carry_the_origin(self):
        await self.node(cors_origins=["*"], api_keys=["k"])
        origin = "http://anything.example"
        response, content = await self.call("POST", CHAT, {
            "Origin": [origin], "Authorization": ["Bearer k"],
            "Content-Type": ["application/json"]}, BODY)
        self.assertEqual(response.code, 200, content)
        self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"),
                         [origin.encode()])
        response, content = await self.call("POST", CHAT, {"Origin": [origin]}, BODY)
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"),
                         [origin.encode()])

    async def test_other_origins_get_no_cors_headers(self):
        await self.node(cors_origins=[APP])
        response, content = await self.call("OPTIONS", CHAT, {
            "Origin": ["http://evil.example"], "Access-Control-Request-Method": ["POST"]})
        self.assertEqual(response.code, 403)
        self.assertEqual(json.loads(content)["error"]["code"], "origin_not_allowed")
        self.assertEqual(self.cors_headers(response), {})
        response, _ = await self.call("GET", "/v1/models", {"Origin": ["http://evil.example"]})
        self.assertEqual((response.code, self.cors_headers(response)), (200, {}))

    async def test_off_by_default(self):
        await self.node()
        response, _ = await self.call("OPTIONS", CHAT, {
            "Origin": [APP], "Access-Control-Request-Method": ["POST"]})
        self.assertEqual(response.code, 405)
        response, _ = await self.call("GET", "/v1/models", {"Origin": [APP]})
        self.assertEqual(self.cors_headers(response), {})

    async def test_the_nodes_headers_replace_a_backends(self):
        def script(exchange):
            request = exchange.request
            request.setHeader(b"Access-Control-Allow-Origin", b"*")
            request.setHeader(b"Access-Control-Allow-Credentials", b"true")
            request.setHeader(b"Content-Type", b"application/json")
            request.write(b"{}")
            request.finish()

        _, backend_port = listen(self, ScriptedBackend(script))
        runtime = FakeRuntime(model("m"), lambda: ("127.0.0.1", backend_port))
        root = CorsRoot(cors=Cors([APP]))
        v1 = mount(root, FakeNode([runtime]), http_client(self), reactor, Program())
        self.addCleanup(v1.close)
        _, port = listen_node(self, root)
        self.url, self.http = f"http://127.0.0.1:{port}", http_client(self)
        response, _ = await self.call("POST", CHAT, {"Origin": [APP]}, BODY)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.cors_headers(response), {
            "access-control-allow-origin": [APP.encode()], "vary": [b"Origin"]})
        await runtime.when_idle()
