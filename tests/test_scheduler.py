"""The scheduler, pure: events in, decisions out, time as plain numbers, no reactor."""

from __future__ import annotations

from types import MappingProxyType

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmnode.config import Model, Plan
from llmnode.devices import Device
from llmnode.errors import Overloaded, Unavailable
from llmnode.lifecycle import DRAINING, FAILED, RUNNING, STARTING, STOPPED, STOPPING
from llmnode.scheduler import Arm, Forward, Policy, Reject, Scheduler, Start, Stop


def model(id, mb=600, port=None, **kw):
    plan = Plan(name="CPU", required_devices=("cpu",), script_path="x",
                memory_mb=MappingProxyType({"cpu": mb}))
    return Model(id=id, mode="Chat", port=port or 10000 + sum(map(ord, id)), plans=(plan,), **kw)


def cpu(total=1000, free=None):
    return {"cpu": Device("cpu", "cpu", "cpu", total, total if free is None else free)}


class World:
    """Drives a scheduler: keeps what its decisions say (tickets, in flight, starts, stops)."""

    def __init__(self, models, policy=Policy(), total=1000):
        self.s = Scheduler(models, policy)
        self.now = 0.0
        self.forwarded: dict[int, str] = {}
        self.rejected: dict[int, Exception] = {}
        self.starts: list[str] = []
        self.stops: list[tuple[str, str]] = []
        self.armed = None
        self.apply(self.s.devices_changed(cpu(total), self.now))

    def apply(self, decisions):
        for d in decisions:
            if isinstance(d, Forward):
                self.forwarded[d.ticket] = d.model_id
            elif isinstance(d, Reject):
                self.rejected[d.ticket] = d.error
            elif isinstance(d, Start):
                self.starts.append(d.model_id)
            elif isinstance(d, Stop):
                self.stops.append((d.model_id, d.reason))
            elif isinstance(d, Arm):
                self.armed = d.at
        return decisions

    def request(self, model_id):
        """A request: admitted at once (None) or queued (its ticket)."""
        if self.s.try_admit(model_id):
            return None
        decisions = self.apply(self.s.arrive(model_id, self.now))
        return decisions[0].ticket

    def finish(self, model_id):
        self.apply(self.s.finish(model_id, self.now))

    def ready(self, model_id, load=1.0):
        self.apply(self.s.started(model_id, self.now, load))

    def stopped(self, model_id):
        self.apply(self.s.stopped(model_id, self.now))

    def advance(self, seconds):
        self.now += seconds
        if self.armed is not None and self.armed <= self.now:
            self.apply(self.s.tick(self.now))

    def state(self, model_id):
        return self.s.slots[model_id].state


class AdmissionTests(SynchronousTestCase):
    def test_a_cold_model_starts_once_and_its_queue_goes_together(self):
        w = World([model("a")])
        tickets = [w.request("a") for _ in range(200)]
        self.assertEqual(w.starts, ["a"])
        self.assertEqual(w.state("a"), STARTING)
        self.assertEqual(w.forwarded, {})
        w.ready("a")
        self.assertEqual(sorted(w.forwarded), sorted(tickets))
        self.assertEqual(w.s.slots["a"].in_flight, 200)
        self.assertIsNone(w.request("a"), "a running model admits at once")

    def test_a_model_that_can_never_fit_is_refused_at_once_with_the_reason(self):
        w = World([model("big", mb=5000)])
        ticket = w.request("big")
        error = w.rejected[ticket]
        self.assertIsInstance(error, Unavailable)
        self.assertIn("needs 5000 MB on cpu", error.message)
        self.assertEqual(w.starts, [])

    def test_a_full_queue_is_429_with_retry_after(self):
        w = World([model("a", max_queue=2)])
        w.request("a"), w.request("a")
        ticket = w.request("a")
        self.assertIsInstance(w.rejected[ticket], Overloaded)
        self.assertGreaterEqual(w.rejected[ticket].retry_after, 1)

    def test_a_failed_start_fails_every_waiter_with_its_reason(self):
        w = World([model("a")])
        tickets = [w.request("a") for _ in range(3)]
        w.apply(w.s.start_failed("a", w.now, "model 'a' exited with status 1: no weights"))
        self.assertEqual(sorted(w.rejected), sorted(tickets))
        self.assertTrue(all("no weights" in e.message for e in w.rejected.values()))
        self.assertEqual(w.state("a"), FAILED)
        self.assertEqual(w.s.ledger.of("a"), {})

    def test_a_client_that_leaves_before_the_start_never_starts_it(self):
        w = World([model("a"), model("b")])
        w.request("a")
        w.ready("a")
        w.request("a")  # a is busy
        ticket = w.request("b")
        self.assertEqual(w.starts, ["a"])
        w.apply(w.s.leave(ticket, w.now))
        w.advance(100)
        w.finish("a")
        w.finish("a")
        self.assertEqual(w.starts, ["a"], "nobody waits for b any more")
        self.assertEqual(w.state("a"), RUNNING)

    def test_waiting_for_others_ends_after_queue_timeout_saying_what_it_waited_for(self):
        w = World([model("a"), model("b")], Policy(queue_timeout=30, turn_min=100,
                                                    turn_max=100))
        w.request("a")
        w.ready("a")
        ticket = w.request("b")
        w.advance(30)
        error = w.rejected[ticket]
        self.assertIsInstance(error, Unavailable)
        self.assertIn("waited 30 s", error.message)
        self.assertIn("a finishing its turn", error.message)
        self.assertEqual(w.state("a"), RUNNING, "the drain nobody needs is called off")


class TurnTests(SynchronousTestCase):
    def busy(self, policy=Policy(), **models):
        w = World([model("a", **models.get("a", {})), model("b", **models.get("b", {}))],
                  policy)
        w.request("a")
        w.ready("a", load=1.0)
        return w

    def test_a_busy_model_keeps_its_turn_then_drains_and_the_waiting_one_starts(self):
        w = self.busy()
        ticket = w.request("b")
        turn = w.s.turn_length(w.s.slots["a"], w.s.slots["b"])
        self.assertEqual(turn, 2.0, "twice the swap: a's stop (unknown: 0) + b's load (1 s)")
        self.assertIsNone(w.request("a"), "a still admits within its turn")
        self.assertEqual(w.armed, turn)
        w.advance(turn)
        self.assertEqual(w.state("a"), DRAINING)
        queued_a = w.request("a")
        self.assertIsNotNone(queued_a, "a draining model admits nothing new")
        w.finish("a")
        self.assertEqual(w.stops, [], "never cut: one request still in flight")
        w.finish("a")
        self.assertEqual(w.stops, [("a", "turn")])
        w.stopped("a")
        self.assertEqual(w.starts, ["a", "b"])
        w.ready("b")
        self.assertIn(ticket, w.forwarded)
        self.assertNotIn(queued_a, w.forwarded)
        w.finish("b")
        self.assertEqual(w.stops[-1], ("a", "turn"), "b may be between two requests")
        w.advance(0.5)
        self.assertEqual(w.stops[-1], ("b", "evict"),
                         "idle for idle_grace within its turn: a's waiter gets the memory")
        w.stopped("b")
        w.ready("a")
        self.assertIn(queued_a, w.forwarded)

    def test_a_model_resident_longer_than_a_turn_drains_at_once(self):
        w = self.busy()
        w.advance(3600)
        w.request("b")
        self.assertEqual(w.state("a"), DRAINING)
        self.assertEqual(w.s.slots["a"].drain.for_model, "b")

    def test_turn_length_from_measured_costs_with_floor_cap_and_overrides(self):
        w = self.busy(Policy(turn_factor=2, turn_min=3, turn_max=50))
        a, b = w.s.slots["a"], w.s.slots["b"]
        self.assertEqual(w.s.turn_length(a, b), 3, "the floor")
        b.load_s, a.stop_s = 10.0, 2.0
        self.assertEqual(w.s.turn_length(a, b), 24)
        b.load_s = 100.0
        self.assertEqual(w.s.turn_length(a, b), 50, "the cap")
        w2 = self.busy(Policy(turn_time=7))
        self.assertEqual(w2.s.turn_length(w2.s.slots["a"], w2.s.slots["b"]), 7)
        w3 = self.busy(a={"turn_time": 1.5})
        self.assertEqual(w3.s.turn_length(w3.s.slots["a"], w3.s.slots["b"]), 1.5)

    def test_the_oldest_waiting_model_goes_first_and_priority_ages(self):
        w = World([model("a"), model("b"), model("c", priority=1)],
                  Policy(priority_step=10))
        w.request("a")
        w.ready("a")
        w.finish("a")
        w.request("a")  # a busy again
        w.request("b")
        w.advance(5)
        w.request("c")  # priority 1 = 10 s of waiting: ahead of b, which waited 5 s
        w.advance(100)
        w.finish("a")
        w.stopped("a")
        self.assertEqual(w.starts, ["a", "c"])
        w2 = World([model("a"), model("b"), model("c", priority=1)], Policy(priority_step=10))
        w2.request("a")
        w2.ready("a")
        w2.request("b")
        w2.advance(15)
        w2.request("c")  # b has waited 15 s: more than c's head start
        w2.advance(100)
        w2.finish("a")
        w2.stopped("a")
        self.assertEqual(w2.starts, ["a", "b"])

    def test_models_that_fit_together_never_take_turns(self):
        w = World([model("a", mb=400), model("b", mb=400)])
        w.request("a")
        w.request("b")
        self.assertEqual(w.starts, ["a", "b"])

    def test_memory_not_yet_given_back_is_read_again_soon(self):
        w = World([model("a"), model("b")])
        w.request("a")
        w.ready("a")
        w.finish("a")
        w.advance(0.5)
        w.request("b")
        self.assertEqual(w.stops, [("a", "evict")])
        w.apply(w.s.devices_changed(cpu(1000, free=300), w.now))
        w.stopped("a")
        self.assertEqual(w.starts, ["a"], "the device still reports a's memory used")
        self.assertAlmostEqual(w.armed - w.now, 0.1)
        w.apply(w.s.devices_changed(cpu(1000, free=1000), w.now))
        self.assertEqual(w.starts, ["a", "b"])

    def test_memory_not_yet_given_back_stops_no_other_model(self):
        w = World([model("a", mb=400), model("b", mb=400), model("c", mb=400)])
        for name in "ab":
            w.request(name)
            w.ready(name)
            w.finish(name)
        w.advance(1)
        w.request("c")
        self.assertEqual(len(w.stops), 1, "one of them makes room")
        w.apply(w.s.devices_changed(cpu(1000, free=100), w.now))
        w.stopped(w.stops[0][0])
        self.assertEqual(len(w.stops), 1, "the device lags behind the stop: nobody else stops")
        self.assertEqual(w.starts, ["a", "b"])
        w.apply(w.s.devices_changed(cpu(1000, free=500), w.now))
        self.assertEqual(w.starts, ["a", "b", "c"])

    def test_an_operator_stop_drains_and_a_start_of_another_port_holder_waits(self):
        w = World([model("a", mb=100, port=5), model("b", mb=100, port=5)])
        w.request("a")
        w.ready("a")
        w.apply(w.s.stop("a", "admin", w.now))
        self.assertEqual(w.state("a"), DRAINING)
        w.request("b")
        self.assertEqual(w.starts, ["a"], "b waits for port 5")
        w.finish("a")
        self.assertEqual(w.stops, [("a", "admin")])
        w.stopped("a")
        self.assertEqual(w.starts, ["a", "b"])


# -- properties over random traces ---------------------------------------------------------------

MODELS = [model("a"), model("b"), model("c"), model("small", mb=200, max_concurrency=2)]
events = st.lists(st.tuples(
    st.sampled_from(["arrive", "arrive", "arrive", "leave", "finish", "finish", "ready",
                     "fail", "stopped", "crash", "tick", "admin_stop", "admin_start"]),
    st.integers(0, len(MODELS) - 1), st.floats(0.01, 5.0)), max_size=120)


class Trace:
    """A world whose requests are tracked one by one, checking invariants on every step."""

    def __init__(self, test):
        self.test = test
        self.w = World(MODELS, Policy(queue_timeout=120, turn_min=1, turn_max=10))
        self.queued: dict[int, str] = {}  # ticket -> model, waiting
        self.in_flight = {m.id: 0 for m in MODELS}
        self.ended: set[int] = set()
        self.admin: set[int] = set()
        self.next_id = -1

    def check(self, decisions):
        s = self.w.s
        for d in decisions:
            if isinstance(d, Start):
                waiting = [t for t, m in self.queued.items() if m == d.model_id]
                self.test.assertTrue(waiting, f"start of {d.model_id} with nobody waiting")
            elif isinstance(d, Stop) and d.reason not in ("crash", "shutdown", "admin"):
                self.test.assertEqual(self.in_flight[d.model_id], 0,
                                      f"{d.model_id} stopped ({d.reason}) mid-request")
            elif isinstance(d, Forward):
                self.test.assertIn(d.ticket, self.queued)
                model_id = self.queued.pop(d.ticket)
                if d.ticket not in self.admin:
                    self.in_flight[model_id] += 1
                self.end(d.ticket)
            elif isinstance(d, Reject):
                self.test.assertIn(d.ticket, self.queued)
                self.test.assertTrue(d.error.message)
                self.queued.pop(d.ticket)
                self.end(d.ticket)
        self.test.assertLessEqual(s.ledger.reserved_mb("cpu"), 1000)
        for m in MODELS:
            self.test.assertEqual(s.slots[m.id].in_flight, self.in_flight[m.id])

    def end(self, ticket):
        self.test.assertNotIn(ticket, self.ended, "a request ended twice")
        self.ended.add(ticket)

    def step(self, op, index, seconds):
        w, s = self.w, self.w.s
        m = MODELS[index].id
        state = s.slots[m].state
        before = len(w.forwarded) + len(w.rejected)
        decisions = []
        if op == "arrive":
            if s.try_admit(m):
                self.in_flight[m] += 1
                return
            decisions = s.arrive(m, w.now)
            self.queued[decisions[0].ticket] = m
        elif op == "admin_start":
            decisions = s.arrive(m, w.now, start=True)
            self.queued[decisions[0].ticket] = m
            self.admin.add(decisions[0].ticket)
        elif op == "leave":
            mine = [t for t, owner in self.queued.items() if owner == m and t not in self.admin]
            if mine:
                self.queued.pop(mine[0])
                self.end(mine[0])
                decisions = s.leave(mine[0], w.now)
        elif op == "finish" and self.in_flight[m]:
            self.in_flight[m] -= 1
            decisions = s.finish(m, w.now)
        elif op == "ready" and state is STARTING:
            decisions = s.started(m, w.now, seconds)
        elif op == "fail" and state is STARTING:
            decisions = s.start_failed(m, w.now, "it failed")
        elif op == "stopped" and state is STOPPING:
            decisions = s.stopped(m, w.now)
        elif op == "crash" and state in (RUNNING, DRAINING):
            decisions = s.crashed(m, w.now, "exit status 1")
        elif op == "admin_stop":
            decisions = s.stop(m, "admin", w.now)
        elif op == "tick":
            w.now += seconds
            if w.armed is not None and w.armed <= w.now:
                decisions = s.tick(w.now)
        w.apply(decisions)
        self.check(decisions)
        del before

    def settle(self):
        """No new requests: requests finish, starts and stops complete, time passes. Every
        request must end within its bound."""
        s = self.w.s
        deadline = self.w.now + s.policy.queue_timeout + 60
        while self.queued or any(self.in_flight.values()) or any(
                slot.state in (STARTING, STOPPING) for slot in s.slots.values()):
            self.test.assertLess(self.w.now, deadline, f"stuck: {self.queued}")
            for m in MODELS:
                state = s.slots[m.id].state
                if self.in_flight[m.id]:
                    self.step("finish", MODELS.index(m), 0)
                elif state is STARTING:
                    self.step("ready", MODELS.index(m), 1.0)
                elif state is STOPPING:
                    self.step("stopped", MODELS.index(m), 0)
            self.step("tick", 0, 0.5)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None, database=None)
    @given(events)
    def test_invariants_hold_over_random_traces(self, trace):
        """Every request ends exactly once (forwarded, rejected with a reason, or left); no
        request in flight is cut by a swap; the memory reserved never exceeds the device; no
        start for a queue whose clients all left; and, once traffic stops, every waiting
        request is answered within its bound."""
        t = Trace(self)
        for op, index, seconds in trace:
            t.step(op, index, seconds)
        t.settle()
        self.assertEqual(t.queued, {})
        self.assertEqual(sum(t.in_flight.values()), 0)

    @settings(max_examples=100, deadline=None, database=None)
    @given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=60))
    def test_a_request_for_a_model_that_fits_alone_waits_about_a_turn_per_model_ahead(
            self, order):
        """Busy traffic to several models that each fit only alone: a waiting request is
        forwarded within (models ahead) x (turn + load + drain)."""
        policy = Policy(turn_min=2, turn_max=2, queue_timeout=1000)
        w = World([model("a"), model("b"), model("c")], policy)
        waiting: dict[int, tuple[str, float]] = {}
        in_flight: list[tuple[str, float]] = []  # (model, ends at)
        for model_id in order:
            ticket = w.request(model_id)
            if ticket is None:
                in_flight.append((model_id, w.now + 0.5))
            else:
                waiting[ticket] = (model_id, w.now)
            w.now += 0.1
        bound = 3 * (2 + 1.0 + 0.5 + 0.1) + 1
        while waiting or in_flight:
            for ticket in [t for t in waiting if t in w.forwarded]:
                model_id, since = waiting.pop(ticket)
                self.assertLessEqual(w.now - since, bound, f"{model_id} waited too long")
                in_flight.append((model_id, w.now + 0.5))
            self.assertFalse(set(waiting) & set(w.rejected))
            for item in [i for i in in_flight if i[1] <= w.now]:
                in_flight.remove(item)
                w.finish(item[0])
            for model_id, slot in w.s.slots.items():
                if slot.state is STARTING and slot.lifecycle.since + 1.0 <= w.now:
                    w.ready(model_id, 1.0)
                elif slot.state is STOPPING:
                    w.stopped(model_id)
            w.advance(0.05)
            self.assertLess(w.now, 1000)
        self.assertEqual(set(w.s.slots[m].state for m in "abc") - {RUNNING, STOPPED}, set())



