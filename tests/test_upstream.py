"""C{/upstream/{model}/...}: a model's backend reached through a whole node, as it is.

The node runs in memory (L{tests.support.memory}): its backends are the demo backend's
resource, served without a process or a socket."""

from __future__ import annotations

import hashlib
import json

from twisted.trial.unittest import SynchronousTestCase

from tests.support.memory import memory_model, start_memory_node


class UpstreamTests(SynchronousTestCase):
    def node(self, **program):
        self.service = start_memory_node(self, {
            "llama": memory_model(9101, aliases=["l"]),
            "embed": memory_model(9102, mode="Embedding"),
        }, **program)

    def call(self, method, path, body=None, headers=None):
        return self.service.call(method, "/upstream" + path, body, headers,
                                 allow_redirects=False)

    def test_pages_method_query_headers_and_body_pass_through(self):
        self.node()
        response, page = self.call("GET", "/llama/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/html; charset=utf-8"])
        self.assertIn(b"llmnode demo backend", page)
        for method in ("GET", "DELETE", "PUT", "PATCH", "POST"):
            body = b"raw \x00 bytes" if method != "GET" else None
            response, content = self.call(
                method, "/l/debug/echo?slot=1&a=%2F", body, {"X-Thing": ["yes"]})
            answer = json.loads(content)
            self.assertEqual(response.code, 200, answer)
            echo = answer["llmnode_echo"]
            self.assertEqual((answer["method"], echo["path"], echo["query"]),
                             (method, "/debug/echo", "slot=1&a=%2F"))
            self.assertEqual(echo["headers"]["x-thing"], "yes")
            self.assertEqual(echo["body_sha256"], hashlib.sha256(body or b"").hexdigest())
        runtime = self.service.node.lookup("llama")
        self.assertEqual((runtime.starts, runtime.in_flight), (1, 0))
        self.assertEqual(runtime.responses[("upstream", 200)], 6)

    def test_any_mode_is_reachable_and_started_on_demand(self):
        self.node()
        response, content = self.call("GET", "/embed/props")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(content)["total_slots"], 1)
        self.assertEqual(self.service.node.lookup("embed").state, "running")

    def test_the_model_folder_without_its_slash_redirects(self):
        self.node()
        response, _ = self.call("GET", "/llama?x=1")
        self.assertEqual(response.code, 301)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/upstream/llama/?x=1"])
        self.assertEqual(self.service.node.lookup("llama").starts, 0)

    def test_unknown_model_is_a_404(self):
        self.node()
        for path in ("/nobody/props", "/", ""):
            response, content = self.call("GET", path)
            self.assertEqual(response.code, 404, path)
            self.assertIn("error", json.loads(content))

    def test_the_v1_keys_apply_and_the_nodes_key_is_not_forwarded(self):
        self.node(api_keys=["client-key"], admin_api_keys=["admin-key"])
        response, _ = self.call("GET", "/llama/props")
        self.assertEqual(response.code, 401)
        response, _ = self.call("GET", "/llama/props",
                                      headers={"Authorization": ["Bearer admin-key"]})
        self.assertEqual(response.code, 401)
        response, content = self.call("GET", "/llama/props",
                                             headers={"Authorization": ["Bearer client-key"]})
        self.assertEqual(response.code, 200)
        self.assertNotIn("authorization", json.loads(content)["llmnode_echo"]["headers"])
