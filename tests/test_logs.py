"""The node's own log: JSON lines, level filtering, and where twistd writes them."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile

from twisted.application.service import Application, IServiceCollection, Service
from twisted.internet import reactor
from twisted.logger import ILogObserver, LogLevel, Logger
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmnode.config import Program
from llmnode.logs import (MAX_TEXT, customised, install_observer, json_record, make_observer,
                          twistd_log_stream)
from llmnode.tap import TwistdNode
from tests.support.nodes import PACKAGE_ROOT, demo_model, free_port, sleep, write_config
from tests.support.twistd import TWISTD, Twistd



def emit(observer, level=LogLevel.info, namespace="llmnode.test", **fields):
    Logger(namespace=namespace, observer=observer).emit(level, fields.pop("format", "{x}"),
                                                        **fields)


class ObserverTests(SynchronousTestCase):
    def test_json_lines_have_time_level_namespace_text(self):
        stream = io.StringIO()
        observer = make_observer(Program(log_format="json"), stream)
        emit(observer, x="model chat started")
        emit(observer, LogLevel.warn, "llmnode.service", x="auto_start failed")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        self.assertEqual([(r["level"], r["namespace"], r["text"]) for r in lines],
                         [("INFO", "llmnode.test", "model chat started"),
                          ("WARNING", "llmnode.service", "auto_start failed")])
        self.assertRegex(lines[0]["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")

    def test_a_failure_carries_its_traceback_in_one_line(self):
        stream = io.StringIO()
        observer = make_observer(Program(log_format="json"), stream)
        try:
            1 / 0
        except ZeroDivisionError:
            Logger(observer=observer).failure("sweeper failed")
        [line] = stream.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["level"], "CRITICAL")
        self.assertIn("sweeper failed", record["text"])
        self.assertIn("ZeroDivisionError", record["text"])

    def test_long_text_is_bounded(self):
        record = json_record({"log_format": "{x}", "x": "y" * (MAX_TEXT * 2),
                              "log_level": LogLevel.info, "log_time": 0.0})
        self.assertLess(len(record["text"]), MAX_TEXT + 100)
        self.assertIn("truncated", record["text"])
        self.assertEqual(record["time"], "1970-01-01T00:00:00.000+00:00")

    def test_an_unserialisable_field_does_not_break_the_line(self):
        stream = io.StringIO()
        observer = make_observer(Program(log_format="json"), stream)
        emit(observer, x=object())
        self.assertIn("object object at", json.loads(stream.getvalue())["text"])

    def test_level_filters_in_both_formats(self):
        for log_format in ("json", "text"):
            stream = io.StringIO()
            observer = make_observer(Program(log_format=log_format, log_level="WARNING"),
                                     stream)
            emit(observer, LogLevel.debug, x="debug-line")
            emit(observer, LogLevel.info, x="info-line")
            emit(observer, LogLevel.warn, x="warn-line")
            emit(observer, LogLevel.error, x="error-line")
            output = stream.getvalue()
            self.assertNotIn("info-line", output, log_format)
            self.assertNotIn("debug-line", output, log_format)
            self.assertIn("warn-line", output, log_format)
            self.assertIn("error-line", output, log_format)
        stream = io.StringIO()
        emit(make_observer(Program(log_level="DEBUG"), stream), LogLevel.debug, x="dbg")
        self.assertIn("dbg", stream.getvalue())

    def test_text_format_is_twisted_plain_text(self):
        stream = io.StringIO()
        emit(make_observer(Program(), stream), x="plain line")
        self.assertRegex(stream.getvalue(), r"^\d{4}-\d\d-\d\dT.* \[llmnode.test#info\] plain line")

    def test_customised(self):
        self.assertFalse(customised(Program()))
        self.assertTrue(customised(Program(log_format="json")))
        self.assertTrue(customised(Program(log_level="ERROR")))


class DestinationTests(SynchronousTestCase):
    def test_foreground_without_logfile_is_stdout(self):
        self.assertIs(twistd_log_stream({"nodaemon": True, "logfile": None}), sys.stdout)
        self.assertIs(twistd_log_stream({"nodaemon": True, "logfile": "-"}), sys.stdout)

    def test_logfile_is_honoured(self):
        path = os.path.join(tempfile.mkdtemp(prefix="llmnode-logs-"), "node.log")
        for nodaemon in (True, False):
            stream = twistd_log_stream({"nodaemon": nodaemon, "logfile": path})
            self.addCleanup(stream.close)
            self.assertIsInstance(stream, LogFile)
            self.assertEqual(stream.path, path)

    def test_twistd_decides_the_rest(self):
        self.assertIsNone(twistd_log_stream(None))
        self.assertIsNone(twistd_log_stream({"nodaemon": True, "syslog": True}))
        self.assertIsNone(twistd_log_stream({"nodaemon": True, "logger": "a.b"}))
        self.assertIsNone(twistd_log_stream({"nodaemon": False, "logfile": "-"}))

    def test_the_observer_becomes_the_applications(self):
        application = Application("llmnode")
        install_observer(application, Program(log_format="json"), io.StringIO())
        self.assertTrue(ILogObserver.providedBy(application.getComponent(ILogObserver)))

    def test_twistd_node_installs_only_when_asked(self):
        for stream, installed in ((io.StringIO(), True), (None, False)):
            application = Application("llmnode")
            node = Service()
            TwistdNode(node, Program(log_format="json"), stream).setServiceParent(application)
            self.assertEqual(application.getComponent(ILogObserver) is not None, installed)
            self.assertIs(node.parent.parent, IServiceCollection(application))


class TwistdLogTests(TestCase):
    timeout = 60

    def spawn(self, config: str, *args: str) -> Twistd:
        process = Twistd()
        env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", *args, "llmnode",
                "--config", config, "--port", str(free_port())]
        transport = reactor.spawnProcess(process, sys.executable, argv, env=env,
                                         path=os.path.dirname(config))
        self.addCleanup(self.stop, transport, process)
        return process

    async def stop(self, transport, process):
        if not process.ended.called:
            transport.signalProcess("TERM")
            for _ in range(100):
                if process.ended.called:
                    break
                await sleep(0.1)
            else:
                transport.signalProcess("KILL")
        await process.ended

    async def wait_for(self, read, needle: str) -> str:
        for _ in range(300):
            text = read()
            if needle in text:
                return text
            await sleep(0.05)
        self.fail(f"never logged {needle!r}: {read()[-3000:]!r}")

    def config(self, **program) -> str:
        models = {"broken": demo_model(free_port(), flags="--exit-at-once boom",
                                       auto_start=True, start_timeout=20)}
        return write_config(self, models, **program)

    async def test_json_lines_on_stdout(self):
        process = self.spawn(self.config(log_format="json"))
        text = await self.wait_for(lambda: process.output.decode(errors="replace"),
                                   "auto_start of broken failed")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        self.assertTrue(all(set(r) == {"time", "level", "namespace", "text"} for r in records))
        levels = {r["level"] for r in records}
        self.assertIn("INFO", levels)
        self.assertIn("WARNING", levels)
        self.assertTrue(any(r["text"].startswith("llmnode serving 1 models") for r in records))

    async def test_warning_level_hides_info_and_logfile_is_honoured(self):
        config = self.config(log_format="json", log_level="WARNING")
        path = os.path.join(os.path.dirname(config), "node.log")
        self.spawn(config, f"--logfile={path}")

        def read():
            try:
                with open(path, encoding="utf-8") as f:
                    return f.read()
            except FileNotFoundError:
                return ""

        text = await self.wait_for(read, "auto_start of broken failed")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        self.assertEqual({r["level"] for r in records} - {"WARNING", "ERROR", "CRITICAL"}, set())
        self.assertFalse(any("llmnode serving" in r["text"] for r in records))
