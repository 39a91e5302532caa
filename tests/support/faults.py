"""Helpers for the fault-injection tests: real twistd nodes, stranger processes, raw clients."""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
from typing import Optional

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from llmnode.launcher.supervisor import group_members
from tests.support.net import parse_response
from tests.support.nodes import PACKAGE_ROOT, get_json, sleep
from tests.support.twistd import TWISTD

#: A process that holds a listening socket on a port and does nothing else.
_STRANGER = (
    "import signal, socket, sys; signal.alarm(120); s = socket.socket(); "
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('ready', flush=True); "
    "signal.pause()"
)


class Child(ProcessProtocol):
    """A child process whose output is kept (bounded) and whose end is a Deferred.

    @ivar ended: fires with the reason's value (C{ProcessDone} or C{ProcessTerminated}).
    """

    def __init__(self, ready_marker: bytes = b""):
        self.output = b""
        self.ended: Deferred = Deferred()
        self.ready: Deferred = Deferred()
        self._marker = ready_marker

    def outReceived(self, data):
        self.output = (self.output + data)[-200000:]
        if self._marker and not self.ready.called and self._marker in self.output:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"exited before it was ready: {self.tail()}"))
        self.ended.callback(reason.value)

    @property
    def pid(self) -> int:
        return self.transport.pid

    def tail(self, size: int = 3000) -> str:
        return self.output[-size:].decode("utf-8", "replace")


def _spawn(testcase, argv: list, cwd: str, marker: bytes = b"") -> Child:
    child = Child(marker)
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
    transport = reactor.spawnProcess(child, sys.executable, argv, env=env, path=cwd)

    def kill():
        if not child.ended.called:
            transport.signalProcess("KILL")
        child.ready.addErrback(lambda _: None)
        return child.ended

    testcase.addCleanup(kill)
    return child


def spawn_twistd(testcase, config: str, port: int) -> Child:
    """C{twistd -n llmnode --config CONFIG --port PORT}, killed after the test if still alive."""
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "llmnode",
            "--config", config, "--port", str(port)]
    return _spawn(testcase, argv, os.path.dirname(config))


async def wait_healthy(http, url: str, node: Child, seconds: float = 15.0) -> Optional[dict]:
    """Poll C{url}/api/health until the node answers 200 (return the health report); None if
    the node exits first or never answers."""
    deadline = reactor.seconds() + seconds
    while not node.ended.called and reactor.seconds() < deadline:
        try:
            status, health = await get_json(http, url + "/api/health")
            if status == 200:
                return health
        except Exception:
            pass
        await sleep(0.05)
    return None


async def stranger(testcase, port: int) -> Child:
    """A process that listens on C{port} on 127.0.0.1 (killed after the test)."""
    child = _spawn(testcase, [sys.executable, "-c", _STRANGER, str(port)], "/", b"ready")
    await child.ready
    return child


async def wait_until(predicate, seconds: float = 10.0, step: float = 0.05) -> bool:
    """Poll C{predicate()} until true or C{seconds} have passed; return its last value."""
    deadline = reactor.seconds() + seconds
    while True:
        value = predicate()
        if value or reactor.seconds() >= deadline:
            return value
        await sleep(step)


def group(pgid: int) -> list[int]:
    """The live (non-zombie) members of process group C{pgid}."""
    return group_members(pgid)


def demo_backends(model_port: int) -> list[int]:
    """Pids of demo backend processes serving C{model_port} (whoever started them)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if ("llmnode.demo.backend" in cmdline and "--port" in cmdline
                and cmdline[cmdline.index("--port") + 1:][:1] == [str(model_port)]):
            found.append(process.pid)
    return found


def raise_open_files_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards the hard limit if it is below C{needed}."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def blocking_request(port: int, method: str, target: bytes, body: bytes = b"",
                     headers: dict | None = None, timeout: float = 30.0):
    """One HTTP/1.1 exchange over a plain socket (C{Connection: close}), for threads.

    C{target} goes on the request line as given, so odd paths reach the server unchanged.
    @return: (status, headers with lower-case names -> lists, body, whether it was complete).
    """
    lines = [method.encode("ascii") + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1",
             b"Connection: close", b"Content-Length: %d" % len(body)]
    for name, value in (headers or {}).items():
        lines.append(name.encode("latin-1") + b": " + value.encode("latin-1"))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        received = bytearray()
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    return parse_response(bytes(received))


def openai_error(status: int, headers: dict, body: bytes) -> dict:
    """The C{error} object of an OpenAI-shaped JSON error answer, or AssertionError.

    A backend's own error answer passes through the node as it is, so other keys beside
    C{error} (the demo backend's C{llmnode_echo}) are allowed.
    """
    content_type = ",".join(headers.get("content-type", []))
    assert content_type.startswith("application/json"), (status, content_type, body[:300])
    payload = json.loads(body)
    assert isinstance(payload, dict) and isinstance(payload.get("error"), dict), (
        status, body[:300])
    error = payload["error"]
    assert {"message", "type", "param", "code"} <= set(error), (status, body[:300])
    assert isinstance(error["message"], str) and error["message"], (status, body[:300])
    return error
