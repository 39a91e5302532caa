"""Fault injection: backends and nodes that fail in every way we know, and what a client sees.

Each case checks three things: the affected request ends with a clear error (an OpenAI-shaped
answer, or a visibly incomplete stream), the node stays alive, and the next request is served.
"""

from __future__ import annotations

import json
import os
import signal

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessDone
from twisted.trial.unittest import TestCase

from tests.support.faults import (blocking_request, demo_backends, group, openai_error,
                                  raise_open_files_limit, spawn_twistd, stranger, wait_healthy,
                                  wait_until)
from tests.support.net import http_request, parse_response, raw_connect
from tests.support.nodes import (base_url, demo_model, free_port, get_json, http_client,
                                 pids_alive, post_json, sleep, start_node, write_config)

CHAT = "/v1/chat/completions"


def chat(model: str = "chat", **extra) -> dict:
    return dict({"model": model, "messages": [{"role": "user", "content": "hi"}]}, **extra)


class FaultCase(TestCase):
    timeout = 60

    async def node(self, models: dict, **program):
        self.service = await start_node(self, models, **program)
        self.http = http_client(self)
        self.url = base_url(self.service)

    async def info(self, name: str = "chat") -> dict:
        status, info = await get_json(self.http, f"{self.url}/api/models/{name}/info")
        self.assertEqual(status, 200)
        return info

    async def assertAlive(self):
        status, health = await get_json(self.http, self.url + "/api/health")
        self.assertEqual((status, health["status"]), (200, "ok"))

    async def assertServes(self, name: str):
        status, body, _ = await post_json(self.http, self.url + CHAT, chat(name))
        self.assertEqual(status, 200, body)
        self.assertEqual(body["object"], "chat.completion")

    def assertOpenAIError(self, status, body, headers, expected) -> dict:
        self.assertIn(status, expected if isinstance(expected, tuple) else (expected,), body)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(set(body), {"error"})
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})
        return body["error"]

    async def pid_group(self, name: str = "chat") -> tuple[int, list[int]]:
        """The supervisor pid of a model that is starting or running, and its group so far."""
        for _ in range(200):
            pid = (await self.info(name))["supervisor_pid"]
            if pid is not None:
                return pid, group(pid)
            await sleep(0.02)
        self.fail(f"model {name} never got a process group")


class BackendFaultTests(FaultCase):

    async def test_backend_dies_mid_stream(self):
        await self.node({"chat": demo_model(free_port(), flags="--die-mid-stream 3 --chunks 8")})
        client = await raw_connect(self, self.service.listening_port)
        client.transport.write(http_request("POST", CHAT, json.dumps(chat(stream=True)).encode(),
                                            {"Content-Type": "application/json",
                                             "Connection": "close"}))
        await client.lost
        status, headers, body, complete = parse_response(client.data)
        self.assertEqual(status, 200)
        self.assertNotIn("content-encoding", headers)
        self.assertFalse(complete, "the client must see the stream end incomplete")
        self.assertEqual(body.count(b"data: {"), 3)
        self.assertNotIn(b"[DONE]", body)
        self.assertTrue(await wait_until(lambda: self.service.node.lookup("chat").state
                                         == "failed"))
        info = await self.info()
        self.assertEqual(info["state"], "failed")
        self.assertIn("exit status 4", info["last_error"])
        await self.assertAlive()
        await self.assertServes("chat")
        self.assertEqual((await self.info())["starts"], 2)

    async def test_backend_that_never_listens_times_out(self):
        await self.node({"chat": demo_model(free_port(), flags="--start-delay 999",
                                            start_timeout=1)})
        answer = Deferred.fromCoroutine(post_json(self.http, self.url + CHAT, chat()))
        pid, members = await self.pid_group()
        status, body, headers = await answer
        error = self.assertOpenAIError(status, body, headers, 503)
        self.assertIn("within 1 s", error["message"])
        self.assertEqual(pids_alive(members + [pid]), [])
        self.assertEqual(group(pid), [])
        await self.assertAlive()

    async def test_backend_that_ignores_sigterm_is_killed(self):
        await self.node({"chat": demo_model(free_port(), flags="--ignore-sigterm",
                                            stop_timeout=0.5)})
        status, info, _ = await post_json(self.http, self.url + "/api/models/chat/start", {})
        self.assertEqual(status, 200, info)
        members = group(info["supervisor_pid"])
        self.assertGreaterEqual(len(members), 2)
        status, info, _ = await post_json(self.http, self.url + "/api/models/chat/stop", {})
        self.assertEqual((status, info["state"]), (200, "stopped"))
        self.assertEqual(pids_alive(members), [])
        self.assertEqual(group(members[0]), [])
        await self.assertAlive()
        await self.assertServes("chat")

    async def test_backend_that_exits_at_once_fails_every_waiter_once(self):
        await self.node({"chat": demo_model(free_port(),
                                            flags="--exit-at-once 'CUDA out of memory'"),
                         "spare": demo_model(free_port())})
        answers = await gatherResults([
            Deferred.fromCoroutine(post_json(self.http, self.url + CHAT, chat()))
            for _ in range(20)])
        messages = set()
        for status, body, headers in answers:
            error = self.assertOpenAIError(status, body, headers, 503)
            self.assertIn("CUDA out of memory", error["message"])
            self.assertTrue(headers.hasHeader(b"Retry-After"))
            messages.add(error["message"])
        self.assertEqual(len(messages), 1, "every waiter gets the same error")
        info = await self.info()
        self.assertEqual((info["starts"], info["state"]), (1, "failed"))
        await self.assertAlive()
        await self.assertServes("spare")

    async def test_model_port_taken_by_a_stranger(self):
        port = free_port()
        other = await stranger(self, port)
        await self.node({"chat": demo_model(port), "spare": demo_model(free_port())})
        status, body, headers = await post_json(self.http, self.url + CHAT, chat())
        error = self.assertOpenAIError(status, body, headers, 503)
        self.assertIn(f"port {port}", error["message"])
        self.assertEqual(pids_alive([other.pid]), [other.pid], "the stranger is left alone")
        self.assertFalse(other.ended.called)
        await self.assertAlive()
        await self.assertServes("spare")

    async def test_backend_speaking_garbage(self):
        await self.node({"chat": demo_model(free_port(), flags="--garbage", start_timeout=1),
                         "spare": demo_model(free_port())})
        status, body, headers = await post_json(self.http, self.url + CHAT, chat())
        error = self.assertOpenAIError(status, body, headers, (502, 503))
        self.assertIn("chat", error["message"])
        self.assertEqual((await self.info())["state"], "failed")
        await self.assertAlive()
        await self.assertServes("spare")

    async def test_backend_with_slow_headers_is_a_gateway_timeout(self):
        # Slow headers delay /health as well, and each health probe waits at most 1 s, so the
        # delay stays under a second: the start succeeds, the proxied request does not.
        await self.node({"chat": demo_model(free_port(), flags="--slow-headers 0.6"),
                         "spare": demo_model(free_port())},
                        backend_header_timeout=0.2)
        status, body, headers = await post_json(self.http, self.url + CHAT, chat())
        error = self.assertOpenAIError(status, body, headers, 504)
        self.assertIn("0.2 s", error["message"])
        self.assertEqual((await self.info())["state"], "running")
        await self.assertAlive()
        await self.assertServes("spare")


class LoadTests(FaultCase):

    async def test_a_thousand_requests_on_a_cold_model_share_one_start(self):
        raise_open_files_limit(4096)
        await self.node({"chat": demo_model(free_port())})
        answers = await gatherResults([
            Deferred.fromCoroutine(post_json(self.http, self.url + CHAT, chat()))
            for _ in range(1000)])
        statuses = [status for status, _, _ in answers]
        self.assertEqual(statuses, [200] * 1000, {s: statuses.count(s) for s in set(statuses)})
        info = await self.info()
        self.assertEqual((info["starts"], info["state"]), (1, "running"))
        self.assertEqual(info["requests_served"], 1000)


class TwistdCase(TestCase):
    """Tests against a real C{twistd -n llmnode} process."""

    timeout = 60

    async def twistd(self, config: str):
        """A node on a free port (another one if a parallel test run took the port first)."""
        http = http_client(self)
        for _ in range(3):
            port = free_port()
            node = spawn_twistd(self, config, port)
            url = f"http://127.0.0.1:{port}"
            if await wait_healthy(http, url, node) is not None:
                return node, http, url, port
            if b"Address already in use" not in node.output:
                break
        self.fail(f"twistd did not start: {node.tail()}")


class NodeProcessFaultTests(TwistdCase):
    """The node process signalled while it works."""

    async def sigterm_during_streams(self, shutdown_timeout: float,
                                     chunk_interval: float) -> list[bool]:
        """SIGTERM a node while 20 streams of 20 chunks are open; whether each one completed.

        Whatever the drain allows, a stream ends with C{data: [DONE]} or visibly incomplete,
        the node exits 0 and no backend process is left.
        """
        config = write_config(self, {"chat": demo_model(
            free_port(), flags=f"--chunks 20 --chunk-interval {chunk_interval}")},
            shutdown_timeout=shutdown_timeout)
        node, http, url, port = await self.twistd(config)
        status, info, _ = await post_json(http, url + "/api/models/chat/start", {})
        self.assertEqual(status, 200, info)
        members = group(info["supervisor_pid"])
        request = http_request("POST", CHAT, json.dumps(chat(stream=True)).encode(),
                               {"Content-Type": "application/json"})
        clients = []
        for _ in range(20):
            client = await raw_connect(self, port)
            client.transport.write(request)
            clients.append(client)
        await gatherResults([client.when_received(b"data: {") for client in clients])
        os.kill(node.pid, signal.SIGTERM)
        reason = await node.ended
        await gatherResults([client.lost for client in clients])
        self.assertIsInstance(reason, ProcessDone, node.tail())
        completed = []
        for client in clients:
            status, _, body, complete = parse_response(client.data)
            self.assertEqual(status, 200)
            if complete:
                self.assertTrue(body.endswith(b"data: [DONE]\n\n"), body[-200:])
            else:
                self.assertNotIn(b"[DONE]", body)
            completed.append(complete)
        self.assertEqual(pids_alive(members), [])
        return completed

    async def test_sigterm_drains_twenty_open_streams(self):
        self.assertEqual(await self.sigterm_during_streams(10, 0.1), [True] * 20)

    async def test_sigterm_cuts_streams_that_outlast_the_drain(self):
        self.assertEqual(await self.sigterm_during_streams(0.3, 0.5), [False] * 20)

    async def test_sigkill_then_a_new_node_on_the_same_config(self):
        model_port = free_port()
        config = write_config(self, {"chat": demo_model(model_port)})
        first, http, url, _ = await self.twistd(config)
        status, info, _ = await post_json(http, url + "/api/models/chat/start", {})
        self.assertEqual(status, 200, info)
        old = group(info["supervisor_pid"])
        self.assertGreaterEqual(len(old), 2)
        os.kill(first.pid, signal.SIGKILL)
        await first.ended
        second, http, url, _ = await self.twistd(config)
        self.assertTrue(await wait_until(lambda: not pids_alive(old), 10),
                        "the first node's backend outlived it")
        status, body, _ = await post_json(http, url + CHAT, chat())
        self.assertEqual(status, 200, body)
        _, info = await get_json(http, url + "/api/models/chat/info")
        self.assertEqual(info["starts"], 1)
        backends = demo_backends(model_port)
        self.assertEqual(len(backends), 1, "exactly one backend serves the model")
        self.assertIn(backends[0], group(info["supervisor_pid"]))
        self.assertEqual(pids_alive(old), [])


_NAMES = ("chat", "embed", "", " ", "chat ", "CHAT", "../chat", "é" * 100_000, "x" * 100_000,
          "模型", "\x00", "\ud7ff", "chat\n")
_SEGMENTS = (b"..", b"%2e%2e", b"%2E%2E%2F%2E%2E", b"%00", b"..%2f..", b".", b"",
             "ünïcødé".encode("utf-8"), b"\xff\xfe", b"chat%2F..%2Fchat", b"%ff", b"chat%00",
             b"stop-all", b"chat", b"a" * 4000, b"%", b"%zz", b"%c3%28")


def _json_values():
    from hypothesis import strategies as st
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=30))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
        max_leaves=10)


def _requests():
    """(method, target, body, headers) of malformed requests, with some well-formed ones."""
    from urllib.parse import quote

    from hypothesis import strategies as st
    values = _json_values()
    body = st.one_of(
        st.binary(max_size=2000),
        st.fixed_dictionaries({}, optional={
            "model": st.one_of(st.sampled_from(_NAMES), values),
            "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), values),
            "stream": values,
            "input": values,
            "query": values,
            "documents": values,
        }).map(lambda d: json.dumps(d).encode("utf-8")),
        values.map(lambda v: json.dumps(v).encode("utf-8")),
        st.fixed_dictionaries({
            "model": st.sampled_from(["chat", "embed"]),
            "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), values),
            "stream": st.one_of(st.booleans(), values),
        }, optional={"input": values, "max_tokens": values, "prompt": values})
        .map(lambda d: json.dumps(d).encode("utf-8")),
    )
    proxied = st.tuples(
        st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"]),
        st.sampled_from([b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings",
                         b"/v1/rerank", b"/rerank", b"/v1/models", b"/v1/chat/completions/x",
                         b"/v1/nope", b"/v1/chat/completions?x=%00&y=\xc3\xa9"]),
        body,
        st.sampled_from([{"Content-Type": "application/json"}, {},
                         {"Content-Type": "text/plain; charset=\xe9"}]))
    segment = st.one_of(st.sampled_from(_SEGMENTS),
                        st.text(max_size=40).map(lambda t: quote(t, safe="").encode("ascii")))
    management = st.tuples(
        st.sampled_from(["GET", "POST", "DELETE"]),
        st.tuples(segment, st.sampled_from([b"/info", b"/start", b"/stop", b"", b"/",
                                            b"/info/..", b"/%2e%2e/info"]))
        .map(lambda parts: b"/api/models/" + parts[0] + parts[1]),
        st.sampled_from([b"", b"{}", b"\x00\xff"]),
        st.just({}))
    return st.one_of(proxied, management)


def _fuzz(testcase, port: int, examples: int) -> None:
    """Send C{examples} generated requests to the node on C{port} (blocking; run in a thread)."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_requests())
    def check(request):
        try:
            _check(testcase, port, *request)
        except AssertionError as e:
            raise AssertionError(f"{e} for {str(request)[:600]}") from None

    check()


def _check(testcase, port: int, method: str, target: bytes, body: bytes, headers: dict) -> None:
    status, answer_headers, answer, complete = blocking_request(
        port, method, target, body, headers)
    if not all(0x21 <= byte <= 0x7e for byte in target):
        # Not HTTP at all (RFC 9112 section 3.2): twisted.web refuses the request line with a
        # bare 400 before any resource of the node sees it.
        testcase.assertEqual(status, 400)
        return
    testcase.assertTrue(complete, (status, answer[:300]))
    testcase.assertNotIn(status, (500, 501), answer[:500])
    if status >= 400:
        error = openai_error(status, answer_headers, answer)
        if status >= 500:
            testcase.assertIn(status, (502, 503, 504), error)
    elif ",".join(answer_headers.get("content-type", [])).startswith("application/json"):
        json.loads(answer)


class MalformedInputTests(TwistdCase):
    """Generated garbage against a real node process: never a crash, never a 500."""

    timeout = 90

    async def test_malformed_requests(self):
        from twisted.internet.threads import deferToThread
        config = write_config(self, {"chat": demo_model(free_port()),
                                     "embed": demo_model(free_port(), mode="Embedding")},
                              max_body_mb=0.5)
        node, http, url, port = await self.twistd(config)
        await deferToThread(_fuzz, self, port, 150)
        self.assertFalse(node.ended.called, node.tail())
        status, health = await get_json(http, url + "/api/health")
        self.assertEqual((status, health["status"]), (200, "ok"))
        self.assertNotIn(b"Traceback", node.output, node.tail(6000))
