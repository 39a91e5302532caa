"""Bearer keys on /v1, /rerank, /api and /metrics: the guard alone, then a whole node (both in
memory)."""

from __future__ import annotations

import json

from treq.testing import StubTreq
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from llmnode.config import Program
from llmnode.web.auth import Guard, KeySet, open_paths_warning, warn_if_open
from llmnode.web.root import Root
from tests.support.memory import memory_model, start_memory_node


class Echo(Resource):
    """A leaf answering 200 with the Authorization header it received."""

    isLeaf = True

    def render(self, request):
        return json.dumps({"authorization": (request.getHeader(b"Authorization") or b"")
                           .decode()}).encode()


def tree(**program) -> StubTreq:
    root = Root(Guard(Program(**program)))
    for name in (b"v1", b"rerank", b"metrics", b"completion", b"infill", b"tokenize",
                 b"detokenize", b"upstream"):
        root.putChild(name, Echo())
    root.putChild(b"health", Echo())
    api = Resource()
    api.putChild(b"health", Echo())
    api.putChild(b"models", Echo())
    root.putChild(b"api", api)
    return StubTreq(root)


def status_of(client: StubTreq, path: str, key=None) -> int:
    headers = {b"Authorization": [b"Bearer " + key.encode()]} if key else {}
    return client.get("http://node" + path, headers=headers).result.code


class GuardTests(SynchronousTestCase):
    def test_no_keys_means_no_authentication(self):
        client = tree()
        for path in ("/v1/x", "/rerank", "/api/models", "/metrics", "/api/health"):
            self.assertEqual(status_of(client, path), 200, path)

    def test_api_keys_alone_protect_everything_but_health(self):
        client = tree(api_keys=("k1", "k2"))
        for path in ("/v1/x", "/rerank", "/api/models", "/metrics"):
            self.assertEqual(status_of(client, path), 401, path)
            self.assertEqual(status_of(client, path, "k1"), 200, path)
            self.assertEqual(status_of(client, path, "k2"), 200, path)
            self.assertEqual(status_of(client, path, "k3"), 401, path)
        self.assertEqual(status_of(client, "/api/health"), 200)

    def test_admin_keys_split_the_tree(self):
        client = tree(api_keys=("user",), admin_api_keys=("admin",))
        for path in ("/v1/x", "/rerank", "/completion", "/infill", "/tokenize", "/detokenize",
                     "/upstream/m/props"):
            self.assertEqual(status_of(client, path, "user"), 200, path)
            self.assertEqual(status_of(client, path, "admin"), 401, path)
        for path in ("/api/models", "/metrics"):
            self.assertEqual(status_of(client, path, "admin"), 200, path)
            self.assertEqual(status_of(client, path, "user"), 401, path)
        self.assertEqual(status_of(client, "/no/such/path", "user"), 401)
        self.assertEqual(status_of(client, "/no/such/path", "admin"), 404)

    def test_admin_keys_without_api_keys_leave_v1_open(self):
        client = tree(admin_api_keys=("admin",))
        self.assertEqual(status_of(client, "/v1/x"), 200)
        self.assertEqual(status_of(client, "/api/models"), 401)

    def test_health_needs_a_key_unless_open(self):
        client = tree(api_keys=("k",), open_health=False)
        for path in ("/api/health", "/health"):
            self.assertEqual(status_of(client, path), 401)
            self.assertEqual(status_of(client, path, "k"), 200)
        for path in ("/api/health", "/api/health/", "/health", "/health/"):
            self.assertEqual(status_of(tree(api_keys=("k",)), path), 200, path)
        self.assertEqual(status_of(tree(api_keys=("k",)), "/health/x"), 401)

    def test_metrics_open_without_metrics_auth(self):
        client = tree(api_keys=("k",), metrics_auth=False)
        self.assertEqual(status_of(client, "/metrics"), 200)
        self.assertEqual(status_of(client, "/api/models"), 401)

    def test_unauthorized_is_openai_shaped_with_a_challenge(self):
        client = tree(api_keys=("k",))
        response = client.get("http://node/v1/chat/completions").result
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders(b"WWW-Authenticate"),
                         [b'Bearer realm="llmnode"'])
        body = json.loads(client.content(response).result)
        self.assertEqual(body["error"]["code"], "invalid_api_key")
        self.assertEqual(body["error"]["type"], "invalid_request_error")
        response = client.get("http://node/v1/x",
                              headers={b"Authorization": [b"Bearer nope"]}).result
        self.assertIn(b'error="invalid_token"',
                      response.headers.getRawHeaders(b"WWW-Authenticate")[0])
        self.assertEqual(json.loads(client.content(response).result)["error"]["message"],
                         "invalid API key")

    def test_scheme_is_case_insensitive_and_others_are_refused(self):
        client = tree(api_keys=("k",))
        for header, expected in ((b"bearer k", 200), (b"BEARER  k ", 200), (b"Basic k", 401),
                                 (b"k", 401), (b"Bearer", 401), (b"Bearer kk", 401)):
            response = client.get("http://node/v1/x",
                                  headers={b"Authorization": [header]}).result
            self.assertEqual(response.code, expected, header)

    def test_an_accepted_key_is_not_passed_on(self):
        client = tree(api_keys=("k",))
        response = client.get("http://node/v1/x", headers={b"Authorization": [b"Bearer k"]})
        body = json.loads(client.content(response.result).result)
        self.assertEqual(body["authorization"], "")

    def test_without_keys_the_authorization_header_is_left_alone(self):
        client = tree()
        response = client.get("http://node/v1/x", headers={b"Authorization": [b"Bearer b"]})
        self.assertEqual(json.loads(client.content(response.result).result)["authorization"],
                         "Bearer b")

    def test_key_set(self):
        keys = KeySet.of(("alpha", "béta"))
        self.assertTrue(keys.accepts(b"alpha"))
        self.assertTrue(keys.accepts("béta".encode()))
        self.assertFalse(keys.accepts(b"alph"))
        self.assertFalse(keys.accepts(b"alphaa"))
        self.assertFalse(KeySet.of(()))


class OpenWarningTests(SynchronousTestCase):
    def test_loopback_never_warns(self):
        for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
            self.assertIsNone(open_paths_warning(host, Program()), host)

    def test_public_bind_without_keys_warns(self):
        for host in ("0.0.0.0", "::", "192.168.1.4", "node.example"):
            self.assertIn("without API keys", open_paths_warning(host, Program()), host)
        self.assertIn("/v1", open_paths_warning("0.0.0.0", Program(admin_api_keys=("a",))))
        self.assertIsNone(open_paths_warning("0.0.0.0", Program(api_keys=("k",))))

    def test_warn_if_open_logs_a_warning(self):
        events = []
        warn_if_open("0.0.0.0", Program(), Logger(observer=events.append))
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"].name, "warn")
        self.assertIn("0.0.0.0", events[0]["warning"])
        warn_if_open("127.0.0.1", Program(), Logger(observer=events.append))
        self.assertEqual(len(events), 1)


V1_ROUTES = [("GET", "/v1/models"), ("GET", "/v1/models/chat"),
             ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
             ("POST", "/v1/embeddings"), ("POST", "/v1/rerank"), ("POST", "/rerank")]
API_ROUTES = [("GET", "/api/devices"), ("GET", "/api/models"), ("GET", "/api/models/chat"),
              ("GET", "/api/models/chat/info"), ("POST", "/api/models/chat/stop"),
              ("POST", "/api/models/stop-all"), ("POST", "/api/models/chat/start")]


class LiveNodeTests(SynchronousTestCase):
    """A whole node, in memory (L{tests.support.memory})."""

    def node(self, **program):
        self.service = start_memory_node(self, {"chat": memory_model(9501)}, **program)

    def call(self, method, path, key=None):
        headers = {b"Content-Type": [b"application/json"]}
        if key is not None:
            headers[b"Authorization"] = [b"Bearer " + key.encode()]
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                "input": "x", "query": "q", "documents": ["d"], "prompt": "p"}
        return self.service.call_json(method, path, body if method == "POST" else None,
                                      headers)

    def test_every_route_needs_the_key(self):
        self.node(api_keys=["client-key"])
        for method, path in V1_ROUTES + API_ROUTES:
            status, body, headers = self.call(method, path)
            self.assertEqual(status, 401, path)
            self.assertEqual(body["error"]["code"], "invalid_api_key", path)
            self.assertTrue(headers.getRawHeaders(b"WWW-Authenticate"), path)
            status, _, _ = self.call(method, path, "wrong-key")
            self.assertEqual(status, 401, path)
        status, body, _ = self.call("GET", "/api/health")
        self.assertEqual((status, body["status"]), (200, "ok"))

    def test_the_key_opens_every_route(self):
        self.node(api_keys=["client-key"])
        for method, path in V1_ROUTES + API_ROUTES:
            status, body, _ = self.call(method, path, "client-key")
            self.assertNotIn(status, (401, 404, 500), (path, body))
        status, body, _ = self.call("POST", "/v1/chat/completions", "client-key")
        self.assertEqual(status, 200, body)
        self.assertNotIn("authorization", {k.lower() for k in body["llmnode_echo"]["headers"]},
                         "the node's key must not reach the backend")

    def test_admin_keys_guard_api_and_client_keys_do_not_open_it(self):
        self.node(api_keys=["client-key"], admin_api_keys=["admin-key"])
        for method, path in API_ROUTES:
            status, _, _ = self.call(method, path, "client-key")
            self.assertEqual(status, 401, path)
        status, body, _ = self.call("GET", "/api/models", "admin-key")
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in body["models"]], ["chat"])
        status, _, _ = self.call("GET", "/v1/models", "admin-key")
        self.assertEqual(status, 401)
        status, _, _ = self.call("GET", "/v1/models", "client-key")
        self.assertEqual(status, 200)

    def test_closed_health(self):
        self.node(api_keys=["client-key"], open_health=False)
        status, _, _ = self.call("GET", "/api/health")
        self.assertEqual(status, 401)
        status, _, _ = self.call("GET", "/api/health", "client-key")
        self.assertEqual(status, 200)

    def test_metrics_follow_the_admin_keys_unless_metrics_auth_is_off(self):
        self.node(api_keys=["client-key"], admin_api_keys=["admin-key"])
        for key, expected in ((None, 401), ("client-key", 401), ("admin-key", 200)):
            headers = {b"Authorization": [b"Bearer " + key.encode()]} if key else {}
            response, _ = self.service.call("GET", "/metrics", headers=headers)
            self.assertEqual(response.code, expected, key)

    def test_metrics_open_with_metrics_auth_false(self):
        self.node(api_keys=["client-key"], metrics_auth=False)
        response, content = self.service.call("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn(b"llmnode", content)
