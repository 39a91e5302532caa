"""Spawning the bundled demo backend (C{python -m llmnode.demo.backend}) from a test."""

from __future__ import annotations

import os
import re
import signal
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

import llmnode

_ROOT = os.path.dirname(llmnode.__path__[0])
_LISTENING = re.compile(rb"listening on [^\s:]+:(\d+) pid (\d+)\n")
_SETSID_EXEC = (
    "import os, sys; os.setsid(); "
    "os.execv(sys.executable, [sys.executable, '-m', 'llmnode.demo.backend'] + sys.argv[1:])"
)


class DemoBackend(ProcessProtocol):
    """One demo backend process, in its own session; killed (group) when the test ends.

    @ivar ready: fires with C{("127.0.0.1", port)} once it listens.
    @ivar ended: fires (with None) once the process has ended; C{reason} says how.
    """

    def __init__(self):
        self.ready: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self.output = b""
        self.pid = None
        self.reason = None
        self._gone = False

    def outReceived(self, data):
        self.output = (self.output + data)[-65536:]
        match = _LISTENING.search(self.output)
        if match and not self.ready.called:
            self.ready.callback(("127.0.0.1", int(match.group(1))))

    def errReceived(self, data):
        self.output = (self.output + data)[-65536:]

    def processEnded(self, reason):
        self._gone = True
        if not self.ready.called:
            self.ready.errback(RuntimeError(
                f"demo backend exited before listening: {self.output[-2000:]!r}"))
        self.reason = reason
        self.ended.callback(None)

    def kill(self) -> Deferred:
        """SIGKILL the process group; fire once the process has ended."""
        if not self._gone and self.pid is not None:
            for kill in (os.killpg, os.kill):
                try:
                    kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
        return self.ended


def spawn_demo(testcase, *args: str) -> DemoBackend:
    """Start a demo backend on a free port with C{args}; its L{DemoBackend} (await C{.ready})."""
    backend = DemoBackend()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _ROOT}
    argv = [sys.executable, "-c", _SETSID_EXEC, "--port", "0", "--alarm", "120", *args]
    transport = reactor.spawnProcess(backend, sys.executable, argv, env=env)
    backend.pid = transport.pid
    testcase.addCleanup(backend.kill)
    return backend
