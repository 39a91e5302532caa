"""Run a real `twistd -n llmnode` process from a test."""

from __future__ import annotations

import os
import sys
from typing import Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from tests.support.nodes import PACKAGE_ROOT, get_json, sleep

TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class Twistd(ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ended = Deferred()

    def outReceived(self, data):
        self.output = (self.output + data)[-200000:]

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value)


class TwistdMixin:
    """For a TestCase: spawn twistd on a config, killed after the test."""

    def spawn(self, config: str, port: int, twistd_options=("-n", "--pidfile="),
              cwd: Optional[str] = None) -> Twistd:
        """Run C{twistd OPTIONS llmnode --config CONFIG --port PORT} in C{cwd} (default: the
        config's folder)."""
        process = Twistd()
        env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
        argv = [sys.executable, "-c", TWISTD, *twistd_options, "llmnode",
                "--config", config, "--port", str(port)]
        transport = reactor.spawnProcess(process, sys.executable, argv, env=env,
                                         path=cwd or os.path.dirname(config))
        self.addCleanup(self.kill, transport, process)
        return process

    def kill(self, transport, process):
        if not process.ended.called:
            transport.signalProcess("KILL")
        return process.ended

    async def wait_healthy(self, http, url, process):
        """(status, health) of the first answer of C{/api/health} that is not 503 "starting"."""
        for _ in range(200):
            if process.ended.called:
                self.fail(f"twistd exited: {process.output[-3000:]!r}")
            try:
                status, health = await get_json(http, url + "/api/health")
            except Exception:
                pass
            else:
                if status != 503:
                    return status, health
            await sleep(0.05)
        self.fail(f"twistd never answered: {process.output[-3000:]!r}")

