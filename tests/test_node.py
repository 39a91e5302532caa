"""The node carrying out the scheduler's decisions, driven synchronously with a Clock and
fake backends: shared starts, crashes, stops, accounting, reloads."""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmnode.config import Config, Model, Plan, Program
from llmnode.devices import Device
from llmnode.errors import Overloaded, Unavailable
from llmnode.node import (FAILED, RUNNING, STARTING, STOPPED, STOPPING, CrashHistory,
                          CrashPolicy, Node, backend_environment)


class FakeBackend:
    """A backend whose start, stop and exit the test controls."""

    def __init__(self, pid):
        self.pid = pid
        self.server_pid = pid
        self.started = defer.Deferred()
        self.stopped = 0
        self._exits = []

    async def start(self):
        await self.started

    def stop(self):
        self.stopped += 1
        if not self.started.called:
            self.started.errback(RuntimeError("killed"))
        return defer.succeed(None)

    def exited(self):
        d = defer.Deferred()
        self._exits.append(d)
        return d

    def crash(self, status="exit status 3"):
        for d in self._exits:
            d.callback(status)


@dataclass
class FakePlacement:
    plan: Plan
    devices: dict = field(default_factory=lambda: {"cpu": "cpu"})
    memory: dict = field(default_factory=lambda: {"cpu": 100})


def make_model(model_id="m", port=10001, memory=100, **kw):
    plan = Plan(name="CPU", required_devices=("cpu",), script_path="true",
                memory_mb={"cpu": memory}, env={"A": "1"})
    return Model(id=model_id, mode="Chat", port=port, plans=(plan,), **kw)


class Harness:
    """A node over fake backends and one cpu device of C{total_mb}; it is its own
    L{llmnode.node.NodeEffects}."""

    def __init__(self, models=None, total_mb=1000, program=Program(), costs=None):
        self.clock = Clock()
        self.backends = []
        self.usage: dict = {}
        self.cpu = Device(id="cpu", kind="cpu", name="cpu", total_mb=total_mb,
                          free_mb=total_mb)
        config = Config(program=program, models=tuple(models or [make_model()]))
        self.node = Node(config, self.clock, self, costs=costs,
                         crash_policy=CrashPolicy(limit=3, window=60, hold=30))
        self.node.devices_changed({"cpu": self.cpu})

    def make_backend(self, model, placement):
        backend = FakeBackend(pid=1000 + len(self.backends))
        self.backends.append(backend)
        return backend

    def refresh_devices(self):
        return defer.succeed({"cpu": self.cpu})

    def measure(self, pgid, devices):
        """What the test says the backend of pid C{pgid} uses (C{self.usage})."""
        return defer.succeed(self.usage.get(pgid, {}))

    def log_path(self, model):
        return f"/logs/{model.id}.log"

    def reserved(self, model_id="m"):
        return self.node.scheduler.ledger.of(model_id)


class StartTests(SynchronousTestCase):
    def test_concurrent_requests_share_one_start(self):
        h = Harness()
        runtime = h.node.lookup("m")
        waits = [runtime.start() for _ in range(50)]
        self.assertEqual(len(h.backends), 1)
        self.assertEqual(runtime.state, STARTING)
        h.backends[0].started.callback(None)
        results = [self.successResultOf(d) for d in waits]
        self.assertEqual(set(results), {("127.0.0.1", 10001)})
        self.assertEqual(runtime.state, RUNNING)
        self.assertEqual(runtime.starts, 1)

    def test_failed_start_fails_every_waiter_with_the_same_error(self):
        h = Harness()
        runtime = h.node.lookup("m")
        waits = [runtime.start() for _ in range(5)]
        h.backends[0].started.errback(RuntimeError("exited with status 1: no weights"))
        errors = {str(self.failureResultOf(d, Unavailable).value) for d in waits}
        self.assertEqual(len(errors), 1)
        self.assertIn("no weights", errors.pop())
        self.assertEqual(runtime.state, FAILED)
        self.assertEqual(h.reserved(), {}, "its memory is released")
        self.assertEqual(len(h.backends), 1, "no retry storm")

    def test_a_start_failure_without_text_still_says_why(self):
        h = Harness()
        runtime = h.node.lookup("m")
        waiting = runtime.start()
        h.backends[0].started.errback(defer.CancelledError())
        message = self.failureResultOf(waiting, Unavailable).value.message
        self.assertEqual(message, "model 'm' failed to start: CancelledError")
        self.assertIn("CancelledError", runtime.last_error)

    def test_cancelled_waiter_leaves_the_start_alone(self):
        h = Harness()
        runtime = h.node.lookup("m")
        leaving = runtime.start()
        staying = runtime.start()
        leaving.cancel()
        self.failureResultOf(leaving, defer.CancelledError)
        h.backends[0].started.callback(None)
        self.assertEqual(self.successResultOf(staying), ("127.0.0.1", 10001))
        self.assertEqual(runtime.state, RUNNING)

    def test_a_model_that_can_never_fit_is_refused_at_once_with_the_reason(self):
        h = Harness([make_model(memory=5000)])
        runtime = h.node.lookup("m")
        failure = self.failureResultOf(runtime.start(), Unavailable)
        self.assertIn("needs 5000 MB on cpu", failure.value.message)
        self.assertIn("not even on idle devices", failure.value.message)
        self.assertEqual(h.backends, [])
        self.assertEqual(runtime.state, STOPPED)
        self.assertEqual(h.reserved(), {})

    def test_running_model_answers_at_once(self):
        h = Harness()
        runtime = h.node.lookup("m")
        runtime.start()
        h.backends[0].started.callback(None)
        self.assertEqual(self.successResultOf(runtime.start()), ("127.0.0.1", 10001))
        self.assertEqual(len(h.backends), 1)


class CrashTests(SynchronousTestCase):
    def running(self, h):
        runtime = h.node.lookup("m")
        runtime.start()
        h.backends[-1].started.callback(None)
        self.assertEqual(runtime.state, RUNNING)
        return runtime

    def test_crash_changes_state_at_once(self):
        h = Harness()
        runtime = self.running(h)
        seen = []
        runtime.lifecycle.subscribe(lambda t: seen.append((t.old, t.new)))
        h.backends[0].crash("exit status 3")
        self.assertEqual(seen, [(RUNNING, STOPPING), (STOPPING, FAILED)],
                         "the group is swept, then the model is failed")
        self.assertIn("exit status 3", runtime.last_error)
        self.assertEqual(runtime.crashes, 1)
        self.assertEqual(h.backends[0].stopped, 1, "the rest of the group is swept")
        self.assertEqual(h.reserved(), {})

    def test_next_request_restarts_after_a_crash(self):
        h = Harness()
        runtime = self.running(h)
        h.backends[0].crash()
        d = runtime.start()
        self.assertEqual(len(h.backends), 2)
        h.backends[1].started.callback(None)
        self.successResultOf(d)
        self.assertEqual(runtime.state, RUNNING)

    def test_repeated_crashes_hold_the_model_back(self):
        h = Harness()
        for _ in range(3):
            self.running(h)
            h.clock.advance(5)
            h.backends[-1].crash()
        runtime = h.node.lookup("m")
        failure = self.failureResultOf(runtime.enqueue().ready, Unavailable)
        self.assertIn("held back", failure.value.message)
        self.assertAlmostEqual(failure.value.retry_after, 30)
        self.assertEqual(len(h.backends), 3)
        h.clock.advance(31)
        runtime.start()
        self.assertEqual(len(h.backends), 4, "starts are allowed again after the hold")

    def test_crashes_spread_over_time_are_not_held_back(self):
        h = Harness()
        for _ in range(4):
            self.running(h)
            h.clock.advance(40)
            h.backends[-1].crash()
        self.assertIsNone(h.node.lookup("m").slot.history.retry_after(h.clock.seconds()))

    def test_exit_after_stop_is_not_a_crash(self):
        h = Harness()
        runtime = self.running(h)
        self.successResultOf(runtime.stop())
        h.backends[0].crash("killed by signal 15")
        self.assertEqual(runtime.state, STOPPED)
        self.assertEqual(runtime.crashes, 0)


class StopTests(SynchronousTestCase):
    def test_stop_releases_memory_and_sets_stopped(self):
        h = Harness()
        runtime = h.node.lookup("m")
        runtime.start()
        h.backends[0].started.callback(None)
        self.successResultOf(runtime.stop())
        self.assertEqual(runtime.state, STOPPED)
        self.assertEqual(h.reserved(), {})
        self.assertIsNone(runtime.info()["pid"])

    def test_stop_while_starting_abandons_the_start(self):
        h = Harness()
        runtime = h.node.lookup("m")
        waiting = runtime.start()
        stopped = runtime.stop()
        self.successResultOf(stopped)
        self.assertEqual(runtime.state, STOPPED)
        self.failureResultOf(waiting, Unavailable)
        self.assertEqual(h.reserved(), {})
        self.assertEqual(h.backends[0].stopped, 1)
        self.assertEqual(len(h.backends), 1)

    def test_stop_all_stops_every_model(self):
        h = Harness([make_model("a", 1), make_model("b", 2)])
        for name in "ab":
            h.node.lookup(name).start()
        for backend in h.backends:
            backend.started.callback(None)
        self.successResultOf(h.node.stop_all())
        self.assertEqual([r.state for r in h.node.runtimes()], [STOPPED, STOPPED])
        self.assertEqual([b.stopped for b in h.backends], [1, 1])


class AccountingTests(SynchronousTestCase):
    def test_last_used_is_set_when_a_request_ends(self):
        h = Harness()
        runtime = h.node.lookup("m")
        runtime.start()
        h.backends[0].started.callback(None)
        self.assertTrue(runtime.try_admit())
        h.clock.advance(100)
        self.assertEqual(runtime.in_flight, 1)
        runtime.request_finished("chat", 200)
        self.assertEqual(runtime.in_flight, 0)
        self.assertEqual(runtime.last_used, 100)
        self.assertEqual(runtime.requests_served, 1)

    def test_a_request_whose_client_left_while_queued_is_not_served(self):
        h = Harness()
        runtime = h.node.lookup("m")
        ticket = runtime.enqueue()
        ticket.ready.cancel()
        self.failureResultOf(ticket.ready, defer.CancelledError)
        runtime.request_abandoned(ticket, "chat", 499)
        self.assertEqual(runtime.requests_served, 0)
        self.assertEqual(runtime.responses[("chat", 499)], 1)
        self.assertEqual(runtime.queued, 0)

    def test_lookup_by_alias(self):
        h = Harness([make_model("m", aliases=("gpt-4", "mm"))])
        self.assertIs(h.node.lookup("gpt-4"), h.node.lookup("m"))
        self.assertIsNone(h.node.lookup("M"))


class CrashHistoryTests(SynchronousTestCase):
    def test_hold_expires(self):
        history = CrashHistory(CrashPolicy(limit=2, window=10, hold=5))
        history.record(0)
        self.assertIsNone(history.retry_after(0))
        history.record(0)
        self.assertEqual(history.retry_after(0), 5)
        self.assertIsNone(history.retry_after(5))

    def test_an_operators_start_lifts_the_hold_back(self):
        h = Harness()
        runtime = h.node.lookup("m")
        for _ in range(3):
            runtime.start()
            h.backends[-1].started.callback(None)
            h.backends[-1].crash()
        self.failureResultOf(runtime.enqueue().ready, Unavailable)
        started = runtime.start()
        self.assertEqual(len(h.backends), 4, "the operator's start goes through")
        h.backends[-1].started.callback(None)
        self.successResultOf(started)
        self.assertIsNone(runtime.info()["held_back_for"])


class EnvironmentTests(SynchronousTestCase):
    def test_backend_environment(self):
        model = make_model()
        placement = FakePlacement(model.plans[0], devices={"rtx": "gpu1", "cpu": "cpu"})
        env = backend_environment(model, placement, base={"PATH": "/bin", "A": "0"})
        self.assertEqual(env["LLMNODE_MODEL"], "m")
        self.assertEqual(env["LLMNODE_PORT"], "10001")
        self.assertEqual(env["CUDA_VISIBLE_DEVICES"], "1")
        self.assertEqual(env["PATH"], "/bin")
        self.assertEqual(env["A"], "1", "the plan's env wins over the inherited one")
        self.assertIn("LLMNODE_PYTHON", env)


class ConcurrencyTests(SynchronousTestCase):
    def runtime(self, limit=2, queue=1):
        h = Harness([make_model(max_concurrency=limit, max_queue=queue)])
        runtime = h.node.lookup("m")
        runtime.start()
        h.backends[0].started.callback(None)
        return runtime

    def test_requests_over_the_limit_wait_for_a_slot(self):
        runtime = self.runtime()
        self.assertTrue(runtime.try_admit())
        self.assertTrue(runtime.try_admit())
        self.assertFalse(runtime.try_admit())
        third = runtime.enqueue()
        self.assertNoResult(third.ready)
        self.assertEqual(runtime.queued, 1)
        runtime.request_finished()
        self.assertEqual(self.successResultOf(third.ready), ("127.0.0.1", 10001))
        self.assertTrue(third.forwarded)
        self.assertEqual((runtime.queued, runtime.in_flight), (0, 2))

    def test_a_full_queue_answers_429(self):
        runtime = self.runtime(limit=1, queue=1)
        runtime.try_admit()
        runtime.enqueue()
        failure = self.failureResultOf(runtime.enqueue().ready, Overloaded)
        self.assertEqual(failure.value.status, 429)
        self.assertGreaterEqual(failure.value.retry_after, 1)

    def test_a_waiter_that_leaves_gives_up_its_place(self):
        runtime = self.runtime(limit=1, queue=5)
        runtime.try_admit()
        leaving, staying = runtime.enqueue(), runtime.enqueue()
        leaving.ready.cancel()
        self.failureResultOf(leaving.ready, defer.CancelledError)
        runtime.request_finished()
        self.successResultOf(staying.ready)
        runtime.request_finished()
        self.assertTrue(runtime.try_admit(), "the slot is free again")

    def test_no_limit_admits_everything(self):
        h = Harness()
        runtime = h.node.lookup("m")
        runtime.start()
        h.backends[0].started.callback(None)
        for _ in range(1000):
            self.assertTrue(runtime.try_admit())


class ReloadTests(SynchronousTestCase):
    def running_harness(self, *models):
        h = Harness(list(models))
        for runtime in h.node.runtimes():
            runtime.start()
        for backend in h.backends:
            backend.started.callback(None)
        h.clock.advance(0)
        return h

    def new_config(self, h, *models):
        return Config(program=h.node.config.program, models=tuple(models))

    def test_unchanged_model_keeps_its_backend(self):
        h = self.running_harness(make_model("a", 1), make_model("b", 2))
        outcome = h.node.reload(self.new_config(h, make_model("a", 1), make_model("b", 2)))
        h.clock.advance(0)
        self.assertEqual(outcome["unchanged"], ["a", "b"])
        self.assertEqual([b.stopped for b in h.backends], [0, 0])
        self.assertEqual(h.node.lookup("a").info()["pid"], 1000)

    def test_changed_model_restarts_with_the_new_settings(self):
        h = self.running_harness(make_model("a", 1))
        outcome = h.node.reload(self.new_config(h, make_model("a", 1, memory=200,
                                                              aliases=("new",))))
        self.assertEqual(outcome["changed"], ["a"])
        self.assertEqual(h.backends[0].stopped, 1)
        self.assertEqual(len(h.backends), 2, "started again because it was running")
        h.backends[1].started.callback(None)
        runtime = h.node.lookup("new")
        self.assertEqual(runtime.model.aliases, ("new",))
        self.assertEqual(runtime.state, RUNNING)
        self.assertEqual(h.reserved("a"), {"cpu": 200})

    def test_a_change_the_backend_does_not_depend_on_applies_without_a_restart(self):
        h = self.running_harness(make_model("a", 1))
        outcome = h.node.reload(self.new_config(h, make_model(
            "a", 1, aliases=("new",), max_concurrency=3, priority=2)))
        self.assertEqual(outcome["changed"], ["a"])
        self.assertEqual((h.backends[0].stopped, len(h.backends)), (0, 1),
                         "names, limits and scheduling settings leave the backend running")
        runtime = h.node.lookup("new")
        self.assertEqual((runtime.model.max_concurrency, runtime.state), (3, RUNNING))

    def test_changed_model_waits_for_its_requests(self):
        h = self.running_harness(make_model("a", 1))
        runtime = h.node.lookup("a")
        self.assertTrue(runtime.try_admit())
        h.node.reload(self.new_config(h, make_model("a", 1, start_timeout=5)))
        self.assertEqual(h.backends[0].stopped, 0, "never stopped mid-request")
        self.assertFalse(runtime.try_admit(), "a draining model admits nothing new")
        runtime.request_finished()
        self.assertEqual(h.backends[0].stopped, 1)
        self.assertEqual(runtime.model.start_timeout, 5)
        self.assertEqual(len(h.backends), 2, "started again with the new settings")

    def test_removed_model_stops_and_is_forgotten(self):
        h = self.running_harness(make_model("a", 1), make_model("b", 2))
        outcome = h.node.reload(self.new_config(h, make_model("a", 1)))
        self.assertEqual(outcome["removed"], ["b"])
        self.assertIsNone(h.node.lookup("b"))
        self.assertEqual(h.backends[1].stopped, 1)
        self.assertEqual([r.model.id for r in h.node.runtimes()], ["a"])

    def test_added_model_is_served(self):
        h = self.running_harness(make_model("a", 1))
        outcome = h.node.reload(self.new_config(h, make_model("a", 1), make_model("c", 3)))
        self.assertEqual(outcome["added"], ["c"])
        self.assertEqual(h.node.lookup("c").state, STOPPED)

    def test_a_model_re_added_on_a_busy_port_starts_once_the_old_backend_is_gone(self):
        h = self.running_harness(make_model("a", 1))
        old = h.node.lookup("a")
        self.assertTrue(old.try_admit())  # a stream in flight
        h.node.reload(self.new_config(h, make_model("b", 1)))
        b = h.node.lookup("b")
        waiting = b.enqueue()
        self.assertEqual(len(h.backends), 1, "b waits: a still holds port 1")
        self.assertIn("a to free port 1", b.info()["waiting_for"])
        old.request_finished()
        self.assertEqual(h.backends[0].stopped, 1)
        self.assertEqual(len(h.backends), 2, "b starts once a is gone")
        h.backends[1].started.callback(None)
        self.successResultOf(waiting.ready)

    def test_program_changes_are_reported_not_applied(self):
        h = self.running_harness(make_model("a", 1))
        config = Config(program=Program(port=9999), models=(make_model("a", 1),))
        outcome = h.node.reload(config)
        self.assertEqual(outcome["restart_required"], ["program.port"])
        self.assertEqual(h.node.config.program.port, 8080)
