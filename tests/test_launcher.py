"""Backend processes with real children: start, readiness, stop, crash, port hygiene, reclaim."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile

import psutil
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

import llmnode
from llmnode.launcher import Backend, ModelLog, StartError, ports, reclaim
from llmnode.launcher.runtime import record_path
from llmnode.launcher.supervisor import exec_last

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(llmnode.__file__)))
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sleep(seconds: float) -> defer.Deferred:
    return deferLater(reactor, seconds, lambda: None)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(_living(p) for p in _members(pgid))


def _living(process) -> bool:
    """Whether C{process} is neither gone (it may end while the group is listed) nor a zombie."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _members(pgid: int) -> list:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


async def wait_until(condition, seconds: float = 10.0, what: str = "condition") -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill_group(pgid) -> None:
    if pgid:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def demo(port: int, *flags: str) -> str:
    return " ".join([PYTHON, "-m", "llmnode.demo.backend", "--port", str(port), "--alarm", "60",
                     *flags])


class ExecLastTests(unittest.SynchronousTestCase):
    """Which scripts run their server without a shell in between, and how they are rewritten."""

    def test_one_line_commands_exec_their_last_command(self):
        for command, rewritten in [
            ('llama-server -m m.gguf --port "$LLMNODE_PORT" 2>&1',
             'exec llama-server -m m.gguf --port "$LLMNODE_PORT" 2>&1'),
            ('cd models && ./serve "a;b|c"', 'cd models && exec ./serve "a;b|c"'),
            ("a; b || c 'x && y'", "a; b || exec c 'x && y'"),
            ('CUDA_VISIBLE_DEVICES=0 X="a b" vllm serve m', 'CUDA_VISIBLE_DEVICES=0 X="a b" exec '
                                                           'vllm serve m'),
            ("exec ./serve", "exec ./serve"),
        ]:
            self.assertEqual(exec_last(command), rewritten, command)

    def test_a_shell_stays_where_exec_would_change_the_script(self):
        for command in ["./serve | tee log", "./serve &", "a\nb", "./serve # note",
                        "./serve --threads $(nproc)", "./serve `nproc`", "(./serve)",
                        "{ a; ./serve; }", "if x; then ./serve; fi", "a && cd x", "X=1",
                        "trap 'cleanup' EXIT; ./serve", "./serve 'unclosed", "a &&"]:
            self.assertIsNone(exec_last(command), command)

    def test_assignments_before_exec_reach_the_program(self):
        done = subprocess.run(["/bin/sh", "-c", exec_last('A="x y" printenv A')],
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(done.stdout, "x y\n")


class BackendTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="llmnode-launcher-")
        self.runtime_dir = os.path.join(self.dir, "run")
        self.port = free_port()
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.retryAutomatically = False
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        self.log = ModelLog(os.path.join(self.dir, "logs", "m.log"))
        self.addCleanup(self.log.close)

    def backend(self, command: str, **overrides) -> Backend:
        options = dict(model_id="m", command=command,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": ROOT},
                       cwd=self.dir, port=self.port, health_path=None, start_timeout=20,
                       stop_timeout=5, log=self.log, runtime_dir=self.runtime_dir,
                       http=self.http)
        options.update(overrides)
        backend = Backend(reactor, **options)

        async def cleanup():
            kill_group(backend.pid)
            await backend.stop()

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(cleanup()))
        return backend

    async def get(self, path: str):
        response = await self.http.get(f"http://127.0.0.1:{self.port}{path}", timeout=5)
        await treq.content(response)
        return response.code

    async def test_start_serves_and_stop_leaves_no_process(self):
        """A started backend answers; after stop() its group, forked grandchild included, is
        gone, and so is its runtime record."""
        backend = self.backend(demo(self.port, "--fork-child"))
        await backend.start()
        self.assertEqual(await self.get("/v1/models"), 200)
        pgid = backend.pid
        self.assertEqual(os.getpgid(pgid), pgid)
        await wait_until(lambda: "child pid" in "\n".join(self.log.tail(50)), what="fork")
        self.assertGreaterEqual(len(_members(pgid)), 3)
        record = json.load(open(record_path(self.runtime_dir, "m")))
        self.assertEqual((record["pid"], record["pgid"]), (pgid, pgid))
        self.assertEqual(record["marker"], "llmnode-supervisor")
        await backend.stop()
        self.assertFalse(group_alive(pgid))
        self.assertFalse(os.path.exists(record_path(self.runtime_dir, "m")))
        await backend.stop()

    async def test_sigterm_ignored_is_killed_after_grace(self):
        backend = self.backend(demo(self.port, "--ignore-sigterm"), stop_timeout=0.5)
        await backend.start()
        pgid = backend.pid
        await backend.stop()
        self.assertFalse(group_alive(pgid))
        self.assertIn("SIGKILL", "\n".join(self.log.tail(10)))

    async def test_stop_command_runs_first(self):
        marker = os.path.join(self.dir, "stopped")
        backend = self.backend(demo(self.port), stop_command=f"touch {marker}; echo bye")
        await backend.start()
        await backend.stop()
        self.assertTrue(os.path.exists(marker))
        self.assertIn("bye", self.log.tail(10))
        self.assertFalse(group_alive(backend.pid))

    async def test_crash_fires_exited_at_once(self):
        backend = self.backend(demo(self.port, "--crash-after", "1", "--fork-child"))
        await backend.start()
        exited = backend.exited()
        pgid = backend.pid
        await self.get("/v1/models")
        status = await exited
        self.assertEqual(status, "exit status 3")
        self.assertEqual(await backend.exited(), "exit status 3")
        await wait_until(lambda: not group_alive(pgid), 5, "the crashed group to be swept")
        await backend.stop()

    async def test_killed_child_reported_as_signal(self):
        backend = self.backend(demo(self.port))
        await backend.start()
        exited = backend.exited()
        children = psutil.Process(backend.pid).children(recursive=True)
        self.assertTrue(children)
        for child in children:
            child.kill()
        self.assertEqual(await exited, "killed by signal 9")

    async def test_exit_at_once_fails_start_with_its_stderr(self):
        backend = self.backend(demo(self.port, "--exit-at-once", "'no GPU here'"))
        e = await self.assertFailure(defer.Deferred.fromCoroutine(backend.start()), StartError)
        self.assertEqual(e.reason, "exited")
        self.assertIn("exited with status 1 before it was ready", e.message)
        self.assertIn("no GPU here", e.message)
        self.assertFalse(group_alive(backend.pid))

    async def test_never_healthy_is_killed_at_timeout(self):
        backend = self.backend(demo(self.port, "--health-delay", "999"), start_timeout=1)
        e = await self.assertFailure(defer.Deferred.fromCoroutine(backend.start()), StartError)
        self.assertEqual(e.reason, "timeout")
        self.assertIn("/health", e.message)
        self.assertFalse(group_alive(backend.pid))

    async def test_stop_while_starting_ends_the_start(self):
        backend = self.backend(demo(self.port, "--start-delay", "999"))
        starting = defer.Deferred.fromCoroutine(backend.start())
        await sleep(0.3)
        await backend.stop()
        e = await self.assertFailure(starting, StartError)
        self.assertIn("stopped before it was ready", e.message)
        self.assertFalse(group_alive(backend.pid))

    async def test_cancelled_start_stops_the_process(self):
        backend = self.backend(demo(self.port, "--start-delay", "999"))
        starting = defer.Deferred.fromCoroutine(backend.start())
        await sleep(0.3)
        starting.cancel()
        await self.assertFailure(starting, defer.CancelledError)
        await wait_until(lambda: not group_alive(backend.pid), 8, "the group to be stopped")

    async def test_a_health_probe_slower_than_a_second_is_waited_for(self):
        script = os.path.join(self.dir, "slow_health.py")
        with open(script, "w") as f:
            f.write(SLOW_HEALTH)
        backend = self.backend(f"{PYTHON} {script} {self.port} 1.5", start_timeout=20)
        await backend.start()
        self.assertIsNotNone(backend.ready_at)
        self.assertGreaterEqual(backend.ready_at - backend.started_at, 1.5)

    async def test_a_health_probe_that_never_answers_fails_at_the_start_timeout_saying_so(self):
        script = os.path.join(self.dir, "slow_health.py")
        with open(script, "w") as f:
            f.write(SLOW_HEALTH)
        backend = self.backend(f"{PYTHON} {script} {self.port} 30", start_timeout=1.5)
        e = await self.assertFailure(defer.Deferred.fromCoroutine(backend.start()), StartError)
        self.assertEqual(e.reason, "timeout")
        self.assertIn("within 1.5 s", e.message)

    async def test_a_failed_start_shows_only_its_own_output(self):
        for run in ("first", "second"):
            backend = self.backend(demo(self.port, "--exit-at-once", f"{run}-run-output"))
            e = await self.assertFailure(defer.Deferred.fromCoroutine(backend.start()),
                                         StartError)
            self.assertIn(f"{run}-run-output", e.message)
        self.assertNotIn("first-run-output", e.message)

    async def test_a_backend_that_calls_setsid_is_stopped_too(self):
        backend = self.backend("exec setsid " + demo(self.port), stop_timeout=30)
        await backend.start()
        [(server, _)] = ports.listeners(self.port)
        self.addCleanup(kill_pid, server)
        self.assertNotEqual(os.getpgid(server), backend.pid, "it left the process group")
        await backend.stop()
        self.assertFalse(psutil.pid_exists(server) and
                         psutil.Process(server).status() != psutil.STATUS_ZOMBIE)
        self.assertIsNone(ports.describe_busy("127.0.0.1", self.port))
        self.assertNotIn("SIGKILL", "\n".join(self.log.tail(10)),
                         "SIGTERM reached it: no wait for the stop timeout")

    async def test_health_404_falls_back_to_models(self):
        backend = self.backend(demo(self.port, "--no-health"))
        await backend.start()
        self.assertEqual(await self.get("/health"), 404)

    async def test_port_busy_names_owner_and_leaves_it_alive(self):
        stranger = subprocess.Popen([PYTHON, "-c", (
            "import socket, signal, sys; signal.alarm(60); s = socket.socket(); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(('127.0.0.1', {self.port})); s.listen(); print('up', flush=True); "
            "sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(stranger.wait)
        self.addCleanup(stranger.kill)
        self.assertEqual(stranger.stdout.readline(), b"up\n")
        backend = self.backend(demo(self.port))
        e = await self.assertFailure(defer.Deferred.fromCoroutine(backend.start()), StartError)
        self.assertEqual(e.reason, "port_busy")
        self.assertIn(str(self.port), e.message)
        self.assertIn(f"pid {stranger.pid}", e.message)
        self.assertIsNone(backend.pid)
        self.assertIsNone(stranger.poll())

    async def test_restart_on_the_same_port_right_after_stop(self):
        """Connections of the stopped backend closing (TIME_WAIT) do not make the port busy."""
        first = self.backend(demo(self.port))
        await first.start()
        self.assertEqual(await self.get("/v1/models"), 200)
        await first.stop()
        second = self.backend(demo(self.port))
        await second.start()
        self.assertEqual(await self.get("/v1/models"), 200)
        self.assertIn("ready on port", "\n".join(self.log.tail(5)))

    async def test_missing_working_directory_is_a_spawn_error(self):
        backend = self.backend(demo(self.port), cwd=os.path.join(self.dir, "missing"))
        e = await self.assertFailure(defer.Deferred.fromCoroutine(backend.start()), StartError)
        self.assertEqual(e.reason, "spawn")
        self.assertIn("missing", e.message)

    async def test_long_line_is_logged_truncated(self):
        backend = self.backend(demo(self.port, "--long-line", "100"))
        await backend.start()
        await backend.stop()
        text = open(self.log.path, encoding="utf-8").read()
        self.assertIn("…[truncated", text)
        self.assertLess(max(len(line.encode()) for line in text.splitlines()), 8192 + 200)


SLOW_HEALTH = r"""
import http.server, signal, sys, time
signal.alarm(60)
port, delay = int(sys.argv[1]), float(sys.argv[2])


class Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(delay)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Slow).serve_forever()
"""


NODE_SCRIPT = r"""
import os, signal, sys
signal.alarm(60)
from twisted.internet import reactor, defer
from twisted.web.client import Agent
import treq
from llmnode.launcher import Backend, ModelLog

directory, port, command = sys.argv[1], int(sys.argv[2]), sys.argv[3]
backend = Backend(reactor, model_id="m", command=command, env=dict(os.environ), cwd=directory,
                  port=port, health_path=None, start_timeout=20, stop_timeout=1,
                  log=ModelLog(os.path.join(directory, "node-m.log")),
                  runtime_dir=os.path.join(directory, "run"),
                  http=treq.client.HTTPClient(Agent(reactor)))

async def main():
    await backend.start()
    print("ready", backend.pid, flush=True)

defer.Deferred.fromCoroutine(main()).addErrback(lambda f: (print(f), reactor.stop()))
reactor.run()
"""


class NodeDeathTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="llmnode-launcher-")
        self.port = free_port()

    def spawn_node(self, command: str) -> tuple[subprocess.Popen, int]:
        env = dict(os.environ, PYTHONPATH=ROOT)
        node = subprocess.Popen([PYTHON, "-c", NODE_SCRIPT, self.dir, str(self.port), command],
                                env=env, stdout=subprocess.PIPE)
        self.addCleanup(node.wait)
        self.addCleanup(node.kill)
        line = node.stdout.readline().split()
        self.assertEqual(line[:1], [b"ready"])
        pgid = int(line[1])
        self.addCleanup(kill_group, pgid)
        return node, pgid

    async def test_backends_die_with_their_node(self):
        node, pgid = self.spawn_node(demo(self.port, "--ignore-sigterm", "--fork-child"))
        self.assertTrue(group_alive(pgid))
        node.kill()
        node.wait()
        await wait_until(lambda: not group_alive(pgid), 8, "the orphaned group to be gone")

    async def test_a_setsid_backend_dies_with_its_node(self):
        node, pgid = self.spawn_node("exec setsid " + demo(self.port))
        [(server, _)] = ports.listeners(self.port)
        self.addCleanup(kill_pid, server)
        node.kill()
        node.wait()
        await wait_until(lambda: not psutil.pid_exists(server)
                         or psutil.Process(server).status() == psutil.STATUS_ZOMBIE, 8,
                         "the backend outside the group to be gone")

    async def test_reclaim_stops_a_leftover_whose_supervisor_was_killed(self):
        node, pgid = self.spawn_node(demo(self.port))
        runtime_dir = os.path.join(self.dir, "run")
        [(server, _)] = ports.listeners(self.port)
        self.addCleanup(kill_pid, server)
        node.send_signal(signal.SIGSTOP)
        self.addCleanup(node.send_signal, signal.SIGCONT)
        os.kill(pgid, signal.SIGKILL)  # the supervisor only: its backend runs on
        await wait_until(lambda: not psutil.pid_exists(pgid)
                         or psutil.Process(pgid).status() == psutil.STATUS_ZOMBIE, 8,
                         "the supervisor to die")
        self.assertTrue(psutil.pid_exists(server))
        record = json.load(open(os.path.join(runtime_dir, "m.json")))
        record["node_pid"] = 1  # as if the node had died
        with open(os.path.join(runtime_dir, "m.json"), "w") as f:
            json.dump(record, f)
        logged = []
        log = Logger(observer=logged.append)
        self.assertEqual(reclaim(runtime_dir, log), [pgid])
        self.assertFalse(psutil.pid_exists(server)
                         and psutil.Process(server).status() != psutil.STATUS_ZOMBIE)
        self.assertIsNone(ports.describe_busy("127.0.0.1", self.port))
        [event] = logged
        self.assertIn(str(server), formatEvent(event))
        self.assertIn("is gone", formatEvent(event))
        self.assertEqual(os.listdir(runtime_dir), [])

    async def test_reclaim_kills_recorded_leftover_only(self):
        node, pgid = self.spawn_node(demo(self.port))
        runtime_dir = os.path.join(self.dir, "run")
        # The node is frozen rather than killed, so its backend outlives it as a leftover
        # would; its record then points at a node that no longer counts as running.
        stranger = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"],
                                    start_new_session=True)
        self.addCleanup(stranger.wait)
        self.addCleanup(stranger.kill)
        with open(os.path.join(runtime_dir, "forged.json"), "w") as f:
            json.dump({"pid": stranger.pid, "pgid": stranger.pid,
                       "create_time": psutil.Process(stranger.pid).create_time(),
                       "node_pid": 1, "command": "sleep", "marker": "llmnode-supervisor"}, f)
        node.send_signal(signal.SIGSTOP)
        self.addCleanup(node.send_signal, signal.SIGCONT)
        self.assertEqual(reclaim(runtime_dir, Logger()), [])  # its node still runs
        record = json.load(open(os.path.join(runtime_dir, "m.json")))
        record["node_pid"] = 1
        with open(os.path.join(runtime_dir, "m.json"), "w") as f:
            json.dump(record, f)
        self.assertEqual(reclaim(runtime_dir, Logger()), [pgid])
        self.assertFalse(group_alive(pgid))
        self.assertIsNone(stranger.poll())
        self.assertEqual(os.listdir(runtime_dir), [])
