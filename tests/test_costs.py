"""Learned costs: what a model really uses and takes to load, remembered and placed by."""

from __future__ import annotations

import json
import os
from types import MappingProxyType

from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from llmnode.config import Model, Plan
from llmnode.costs import CostBook, fingerprint, group_usage
from llmnode.devices import Device
from llmnode.lifecycle import STARTING
from llmnode.placement import (UNKNOWN, Ledger, Resident, choose, explain, plan_eviction,
                               possible)
from llmnode.scheduler import Policy
from tests.test_node import Harness
from tests.test_scheduler import World


def plan(memory=None, script="serve.sh", name="CPU"):
    return Plan(name=name, required_devices=("cpu",), script_path=script,
                memory_mb=MappingProxyType(memory or {}))


def model(id="m", port=10001, **plan_keys):
    return Model(id=id, mode="Chat", port=port, plans=(plan(**plan_keys),))


def cpu(total=1000, free=None, processes=()):
    return {"cpu": Device("cpu", "cpu", "cpu", total, total if free is None else free,
                          processes=tuple(processes))}


class CostBookTests(SynchronousTestCase):
    def test_the_peak_only_grows_and_a_changed_command_forgets_it(self):
        book = CostBook()
        m = model()
        self.assertEqual(book.record_usage("m", m.plans[0], "cpu", 300), 300)
        self.assertIsNone(book.record_usage("m", m.plans[0], "cpu", 200))
        self.assertEqual(book.record_usage("m", m.plans[0], "cpu", 350), 350)
        self.assertEqual(book.get("m", m.plans[0]).peak_mb, {"cpu": 350})
        self.assertIsNone(book.get("m", plan(script="other.sh")))

    def test_figures_survive_a_restart_in_their_file(self):
        path = os.path.join(self.mktemp(), "learned", "costs.json")
        book = CostBook(path)
        m = model()
        book.record_usage("m", m.plans[0], "cpu", 420)
        book.record_load("m", m.plans[0], 12.3456)
        book.save()
        again = CostBook(path)
        again.load()
        costs = again.get("m", m.plans[0])
        self.assertEqual((costs.load_s, costs.peak_mb), (12.346, {"cpu": 420}))
        with open(path) as f:
            self.assertEqual(json.load(f)["models"]["m"]["CPU"]["fingerprint"],
                             fingerprint(m.plans[0]))

    def test_what_placement_uses(self):
        book = CostBook()
        learned, declared_low, declared_high, unknown = (
            model("a"), model("b", memory={"cpu": 100}), model("c", memory={"cpu": 900}),
            model("d"))
        for m in (learned, declared_low, declared_high):
            book.record_usage(m.id, m.plans[0], "cpu", 400)
        memory = {m.id: dict(book.effective(m, 0.1).plans[0].memory_mb)
                  for m in (learned, declared_low, declared_high, unknown)}
        self.assertAlmostEqual(memory["a"]["cpu"], 440, msg="the learned peak plus the margin")
        self.assertEqual(memory["b"], {"cpu": 400}, "the measured peak, above the declared")
        self.assertEqual(memory["c"], {"cpu": 900}, "a declared figure wins")
        self.assertEqual(memory["d"], {"cpu": UNKNOWN}, "nothing known yet")

    def test_a_group_is_measured_by_what_the_device_reports_for_its_processes(self):
        devices = {"gpu0": Device("gpu0", "gpu", "GPU", 8000, 2000,
                                  processes=((11, 3000), (12, 1000), (99, 2000))),
                   **cpu()}

        class Process:
            def __init__(self, pid):
                self.pid = pid

            def memory_info(self):
                return type("Info", (), {"rss": self.pid * 1024 * 1024})()

        usage = group_usage(10, devices, members=lambda pgid: [10, 11, 12], process=Process)
        self.assertEqual(usage, {"gpu0": 4000, "cpu": 33})


class UnknownNeedTests(SynchronousTestCase):
    def test_a_model_with_nothing_learned_starts_alone_on_all_that_is_free(self):
        unknown = CostBook().effective(model("new"), 0.1)
        ledger = Ledger()
        placement = choose(unknown, cpu(1000, free=900), ledger)
        self.assertEqual(dict(placement.memory), {"cpu": 900})
        ledger.reserve("other", {"cpu": 10})
        self.assertIsNone(choose(unknown, cpu(1000, free=900), ledger))
        self.assertIn("to itself", explain(unknown, cpu(), ledger))
        self.assertTrue(possible(unknown, cpu()))
        _, victims = plan_eviction(unknown, cpu(1000, free=900), ledger,
                                   [Resident("other", 0, 0.0, {"cpu": 10})], now=10)
        self.assertEqual(victims, ["other"], "everything on the device must go")

    def test_of_idle_models_the_one_quickest_to_load_back_goes_first(self):
        ledger = Ledger()
        ledger.reserve("slow", {"cpu": 400})
        ledger.reserve("quick", {"cpu": 400})
        residents = [Resident("slow", 0, 0.0, {"cpu": 400}, reload_s=40.0),
                     Resident("quick", 0, 0.0, {"cpu": 400}, reload_s=2.0)]
        _, victims = plan_eviction(model("new", memory={"cpu": 300}), cpu(1000, free=200),
                                   ledger, residents, now=100)
        self.assertEqual(victims, ["quick"])
        # Idle long enough, the slow one goes first after all.
        residents[0] = Resident("slow", 0, -2000.0, {"cpu": 400}, reload_s=40.0)
        _, victims = plan_eviction(model("new", memory={"cpu": 300}), cpu(1000, free=200),
                                   ledger, residents, now=100)
        self.assertEqual(victims, ["slow"])


class SchedulerCostTests(SynchronousTestCase):
    def test_first_start_alone_then_placed_by_what_it_used(self):
        w = World([model("a", port=1), model("b", port=2)], Policy())
        w.request("a")
        self.assertEqual(dict(w.s.slots["a"].placement.memory), {"cpu": 1000})
        w.ready("a", load=3.0)
        w.finish("a")
        w.s.costs.record_usage("a", w.s.slots["a"].model.plans[0], "cpu", 300)
        w.advance(1)
        w.request("b")
        self.assertEqual(w.stops, [("a", "evict")], "b knows nothing yet: alone too")
        w.stopped("a")
        w.ready("b", load=1.0)
        w.s.costs.record_usage("b", w.s.slots["b"].model.plans[0], "cpu", 200)
        w.finish("b")
        w.advance(1)
        w.request("a")
        self.assertEqual(w.stops[-1], ("b", "evict"), "b started alone: it holds all of it")
        w.stopped("b")
        self.assertEqual(w.state("a"), STARTING)
        self.assertAlmostEqual(w.s.slots["a"].placement.memory["cpu"], 330)
        w.ready("a", load=3.5)
        w.request("b")
        self.assertEqual(w.state("b"), STARTING, "by their learned figures both fit")
        self.assertAlmostEqual(w.s.slots["b"].placement.memory["cpu"], 220)
        self.assertEqual(w.stops[-1], ("b", "evict"), "nobody else was stopped")
        self.assertEqual(w.s.costs.load_s(w.s.slots["a"].model), 3.5, "the last load")


class NodeCostTests(SynchronousTestCase):
    def test_usage_is_learned_and_a_declared_figure_exceeded_is_warned_about(self):
        lines = []
        h = Harness([Model(id="m", mode="Chat", port=1, plans=(plan({"cpu": 100}),))])
        h.node.log = Logger(observer=lambda e: lines.append(formatEvent(e)))
        runtime = h.node.lookup("m")
        runtime.start()
        h.backends[0].started.callback(None)
        h.usage[1000] = {"cpu": 250.0}
        h.node.devices_changed({"cpu": h.cpu})
        costs = runtime.info()["costs"]["CPU"]
        self.assertEqual(costs["learned_peak_mb"], {"cpu": 250.0})
        self.assertEqual(costs["declared_mb"], {"cpu": 100.0})
        self.assertEqual([line for line in lines if "more than its memory_mb" in line],
                         ["m (plan CPU) uses 250 MB on cpu, more than its memory_mb 100: "
                          "it is placed by 250 MB from now on"])

    def test_a_restarted_node_places_by_what_the_last_one_learned(self):
        path = os.path.join(self.mktemp(), "costs.json")
        first = Harness([model("m", port=1)], costs=CostBook(path))
        runtime = first.node.lookup("m")
        runtime.start()
        first.backends[0].started.callback(None)
        first.usage[1000] = {"cpu": 200.0}
        first.node.devices_changed({"cpu": first.cpu})
        first.node.shutdown()
        book = CostBook(path)
        book.load()
        second = Harness([model("m", port=1)], costs=book)
        second.node.lookup("m").start()
        self.assertAlmostEqual(second.node.lookup("m").placement.memory["cpu"], 220)
