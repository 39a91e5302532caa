"""The idle sweeper stops models idle longer than their alive_time, and nothing else."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from llmnode.config import Model
from llmnode.sweeper import Sweeper, alive_time_s, due


class DueTests(SynchronousTestCase):

    def test_decision(self):
        self.assertTrue(due(100, 60, 40, 0, "running"))
        self.assertFalse(due(99.9, 60, 40, 0, "running"))
        self.assertFalse(due(1000, 60, 40, 1, "running"))
        self.assertFalse(due(1000, 60, None, 0, "running"))
        self.assertFalse(due(1000, 0, 40, 0, "running"))
        for state in ("starting", "stopping", "stopped", "crashed"):
            self.assertFalse(due(1000, 60, 40, 0, state))

    def test_alive_time_in_seconds(self):
        self.assertEqual(alive_time_s(None, 30), 1800)
        self.assertEqual(alive_time_s(0.5, 30), 30)
        self.assertEqual(alive_time_s(0, 30), 0)
        self.assertEqual(alive_time_s(None, 0), 0)


class FakeRuntime:

    def __init__(self, id, alive_time=None, last_used=0.0, in_flight=0, state="running",
                 stop_result=None):
        self.model = Model(id=id, mode="Chat", port=1, plans=(), alive_time=alive_time)
        self.last_used = last_used
        self.in_flight = in_flight
        self.state = state
        self.stop_result = stop_result
        self.stops: list[float] = []
        self.reasons: list[str] = []

    def stop(self, reason="admin"):
        self.reasons.append(reason)
        self.stops.append(self.clock.seconds())
        if self.stop_result is not None:
            return self.stop_result()
        self.state = "stopped"
        return succeed(None)


class SweeperTests(SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.runtimes: list[FakeRuntime] = []
        self.lines: list[str] = []
        self.sweeper = Sweeper(self.clock, lambda: self.runtimes, default_alive_time_min=2,
                               log=Logger(observer=lambda e: self.lines.append(formatEvent(e))))
        self.addCleanup(self.sweeper.stop)
        self.sweeper.start()

    def add(self, *args, **kw):
        runtime = FakeRuntime(*args, **kw)
        runtime.clock = self.clock
        self.runtimes.append(runtime)
        return runtime

    def run_for(self, seconds, step=0.25):
        for _ in range(int(seconds / step)):
            self.clock.advance(step)

    def test_stops_soon_after_the_deadline_and_not_before(self):
        short = self.add("short", alive_time=0.5)
        default = self.add("default")
        self.run_for(29.5)
        self.assertEqual((short.stops, default.stops), ([], []))
        self.run_for(5)
        self.assertEqual(len(short.stops), 1)
        self.assertTrue(30 <= short.stops[0] <= 35, short.stops)
        self.run_for(120 - 34.5 + 6)
        self.assertEqual(len(default.stops), 1)
        self.assertTrue(120 <= default.stops[0] <= 125, default.stops)
        self.assertEqual(len(short.stops), 1)
        self.assertTrue(any("stopping short: idle for 30 s" in line for line in self.lines))

    def test_never_stops_a_model_mid_request(self):
        busy = self.add("busy", alive_time=0.1, in_flight=1)
        self.run_for(600, step=1)
        self.assertEqual(busy.stops, [])
        busy.in_flight, busy.last_used = 0, self.clock.seconds()
        self.run_for(5, step=1)
        self.assertEqual(busy.stops, [])
        self.run_for(3, step=1)
        self.assertEqual(len(busy.stops), 1)

    def test_only_running_models(self):
        runtimes = [self.add(state, alive_time=0.1, state=state)
                    for state in ("starting", "stopping", "stopped", "crashed")]
        unused = self.add("never-used", alive_time=0.1, last_used=None)
        forever = self.add("forever", alive_time=0)
        self.run_for(100, step=1)
        self.assertEqual([r.stops for r in runtimes + [unused, forever]], [[]] * 6)

    def test_failing_stop_is_logged_and_retried_later(self):
        def broken():
            raise RuntimeError("kill failed")

        flaky = self.add("flaky", alive_time=0.1, stop_result=broken)
        rejecting = self.add("rejecting", alive_time=0.1,
                             stop_result=lambda: fail(ValueError("no such process")))
        self.run_for(8, step=1)
        self.assertEqual((flaky.stops, rejecting.stops), ([6], [6]))
        self.assertEqual(sum("idle stop of flaky failed" in line for line in self.lines), 1)
        self.assertEqual(sum("idle stop of rejecting failed" in line for line in self.lines), 1)
        self.run_for(10, step=1)
        self.assertEqual((flaky.stops, rejecting.stops), ([6, 16], [6, 16]))

    def test_one_stop_at_a_time_per_model(self):
        pending = Deferred()
        slow = self.add("slow", alive_time=0.1, stop_result=lambda: pending)
        self.run_for(20, step=1)
        self.assertEqual(len(slow.stops), 1)
        pending.errback(RuntimeError("gave up"))
        self.run_for(10, step=1)
        self.assertEqual(len(slow.stops), 2)

    def test_a_broken_model_list_does_not_stop_the_sweeper(self):
        model = self.add("m", alive_time=0.1)
        self.runtimes.append(None)
        self.run_for(10, step=1)
        self.assertTrue(any("idle sweeper failed on a model" in line for line in self.lines))
        self.assertEqual(model.stops, [6])
        broken = Sweeper(self.clock, lambda: 1 / 0, 1,
                         log=Logger(observer=lambda e: self.lines.append(formatEvent(e))))
        broken.start()
        self.addCleanup(broken.stop)
        self.run_for(3, step=1)
        self.assertTrue(any("could not list models" in line for line in self.lines))
        self.assertTrue(broken.running)

    def test_stop_ends_the_loop(self):
        self.sweeper.stop()
        model = self.add("m", alive_time=0.1)
        self.run_for(60, step=1)
        self.assertEqual(model.stops, [])
        self.assertFalse(self.sweeper.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])
