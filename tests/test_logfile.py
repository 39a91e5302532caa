"""The per-model log file: timestamps, bounded lines, partial lines, rotation, tail."""

from __future__ import annotations

import os
import re
import tempfile

from twisted.trial import unittest

from llmnode.launcher import ModelLog

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d ")


class ModelLogTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="llmnode-log-")
        self.path = os.path.join(self.dir, "logs", "qwen.log")
        self.now = 1_700_000_000.25

    def make(self, **options) -> ModelLog:
        log = ModelLog(self.path, clock=lambda: self.now, **options)
        self.addCleanup(log.close)
        return log

    def lines(self, path=None) -> list[str]:
        with open(path or self.path, encoding="utf-8") as f:
            return f.read().splitlines()

    def test_every_line_is_timestamped(self):
        log = self.make()
        log.write(b"loading model\nlistening on 127.0.0.1:9000\n")
        lines = self.lines()
        self.assertEqual(len(lines), 2)
        for line in lines:
            self.assertRegex(line, STAMP)
        self.assertTrue(lines[0].endswith(" loading model"))
        self.assertIn(".250", lines[0])

    def test_partial_lines_wait_for_their_end(self):
        log = self.make()
        log.write(b"progress: 10%")
        log.write(b"err: half", "err")
        self.assertFalse(os.path.exists(self.path) and self.lines())
        log.write(b" 20%\r\nnext")
        log.write(b" a line\n", "err")
        self.assertEqual([STAMP.sub("", line) for line in self.lines()],
                         ["progress: 10% 20%", "err: half a line"])
        log.flush()
        self.assertEqual(log.tail(1), ["next"])

    def test_long_line_is_cut_with_a_marker(self):
        log = self.make(max_line=100)
        log.write(b"x" * 60)
        log.write(b"y" * 100_000)
        log.write(b"z\nshort\n")
        first, second = [STAMP.sub("", line) for line in self.lines()]
        self.assertEqual(first, "x" * 60 + "y" * 40 + f"…[truncated {100_000 - 40 + 1} bytes]")
        self.assertEqual(second, "short")

    def test_hundred_kb_without_newline_is_bounded_in_memory(self):
        log = self.make(max_line=8192)
        for _ in range(100):
            log.write(b"a" * 1024)
        self.assertLessEqual(sum(len(p.head) for p in log._partials.values()), 8192)
        log.close()
        (line,) = self.lines()
        self.assertIn(f"…[truncated {100 * 1024 - 8192} bytes]", line)

    def test_invalid_utf8_is_replaced(self):
        log = self.make()
        log.write(b"caf\xc3\xa9 \xff\n")
        self.assertEqual(log.tail(), ["café \ufffd"])

    def test_rotation_keeps_the_last_backups(self):
        log = self.make(max_bytes=200, backups=2)
        for i in range(30):
            log.write(f"line {i:02d} ".encode() + b"." * 40 + b"\n")
        files = sorted(os.listdir(os.path.dirname(self.path)))
        self.assertEqual(files, ["qwen.log", "qwen.log.1", "qwen.log.2"])
        for name in files:
            self.assertLessEqual(os.path.getsize(os.path.join(self.dir, "logs", name)), 200)
        newest = self.lines()[-1]
        self.assertIn("line 29", newest)
        older = self.lines(self.path + ".1")[-1]
        self.assertLess(int(older.split("line ")[1][:2]), 29)

    def test_rotation_without_backups_truncates(self):
        log = self.make(max_bytes=100, backups=0)
        for i in range(10):
            log.write(f"line {i} ".encode() + b"-" * 40 + b"\n")
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["qwen.log"])
        self.assertIn("line 9", self.lines()[-1])

    def test_tail_and_notes(self):
        log = self.make()
        for i in range(30):
            log.write(f"{i}\n".encode())
        log.note("started pid 42")
        self.assertEqual(log.tail(3), ["28", "29", "[llmnode] started pid 42"])
        self.assertEqual(log.tail(0), [])

    def test_write_after_close_appends(self):
        log = self.make()
        log.write(b"first run\n")
        log.close()
        log.write(b"second run\n")
        log.close()
        self.assertEqual([STAMP.sub("", line) for line in self.lines()],
                         ["first run", "second run"])
