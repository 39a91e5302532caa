"""Plan choice, the memory ledger and the choice of models to stop (pure placement)."""

from __future__ import annotations

from types import MappingProxyType

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmnode.config import Model, Plan
from llmnode.devices import Device
from llmnode.placement import (Ledger, Resident, choose, explain, free_mb, matches,
                               plan_eviction)

RTX = "NVIDIA GeForce RTX 4060"


def device(id, total, free=None, name=None, kind="gpu"):
    return Device(id=id, kind=kind, name=name or id, total_mb=total,
                  free_mb=total if free is None else free)


def devices(*items):
    return {d.id: d for d in items}


def plan(name, *requirements, **memory):
    """A plan; memory keys use '_' for ' ' (rtx_4060 -> 'rtx 4060')."""
    return Plan(name=name, required_devices=tuple(requirements), script_path="run.sh",
                memory_mb=MappingProxyType({k.replace("_", " "): v for k, v in memory.items()}))


def model(id, *plans):
    return Model(id=id, mode="Chat", port=10000, plans=tuple(plans))


def resident(id, reserved, idle_since=0.0, in_flight=0):
    return Resident(id, in_flight, idle_since, MappingProxyType(reserved))


class MatchTests(SynchronousTestCase):

    def test_id_or_product_name_ignoring_case(self):
        gpu = device("gpu0", 8000, name=RTX)
        self.assertTrue(matches("gpu0", gpu))
        self.assertTrue(matches("GPU0", gpu))
        self.assertTrue(matches("rtx 4060", gpu))
        self.assertTrue(matches("NVIDIA", gpu))
        self.assertFalse(matches("rtx 4090", gpu))
        self.assertFalse(matches("gpu", device("cpu", 1, name="System RAM")))
        self.assertFalse(matches("", gpu))


class LedgerTests(SynchronousTestCase):

    def test_reserve_release_and_queries(self):
        ledger = Ledger()
        ledger.reserve("a", {"gpu0": 3000, "cpu": 1000})
        ledger.reserve("b", {"gpu0": 2000, "gpu1": 0})
        self.assertEqual(ledger.reserved_mb("gpu0"), 5000)
        self.assertEqual(ledger.holders("gpu0"), {"a": 3000, "b": 2000})
        self.assertEqual(ledger.holders("gpu1"), {})
        self.assertEqual(ledger.of("a"), {"gpu0": 3000, "cpu": 1000})
        ledger.reserve("a", {"gpu0": 100})
        self.assertEqual(ledger.reserved_mb("gpu0"), 2100)
        self.assertEqual(ledger.release("a"), {"gpu0": 100})
        self.assertEqual(ledger.release("a"), {})
        self.assertEqual((ledger.reserved_mb("gpu0"), ledger.of("a")), (2000, {}))

    def test_free_is_the_smaller_of_reported_and_ledger(self):
        ledger = Ledger()
        ledger.reserve("a", {"gpu0": 6000})
        self.assertEqual(free_mb(device("gpu0", 8000, free=7000), ledger), 2000)
        self.assertEqual(free_mb(device("gpu0", 8000, free=1000), ledger), 1000)
        ledger.reserve("b", {"gpu0": 4000})
        self.assertEqual(free_mb(device("gpu0", 8000), ledger), 0)


class ChooseTests(SynchronousTestCase):

    def setUp(self):
        self.ledger = Ledger()
        self.devices = devices(device("gpu0", 8000, name=RTX), device("cpu", 32000))

    def test_first_plan_that_fits_in_file_order(self):
        m = model("m", plan("GPU", "rtx 4060", rtx_4060=6000), plan("CPU", "cpu", cpu=16000))
        placement = choose(m, self.devices, self.ledger)
        self.assertEqual((placement.plan.name, dict(placement.devices), dict(placement.memory)),
                         ("GPU", {"rtx 4060": "gpu0"}, {"gpu0": 6000}))
        self.ledger.reserve("other", {"gpu0": 4000})
        placement = choose(m, self.devices, self.ledger)
        self.assertEqual((placement.plan.name, dict(placement.memory)), ("CPU", {"cpu": 16000}))
        self.ledger.reserve("big", {"cpu": 20000})
        self.assertIsNone(choose(m, self.devices, self.ledger))

    def test_plans_with_absent_devices_are_skipped(self):
        m = model("m", plan("H100", "h100", h100=1), plan("CPU", "cpu"))
        self.assertEqual(choose(m, self.devices, self.ledger).plan.name, "CPU")

    def test_requirement_without_memory_still_needs_a_device(self):
        m = model("m", plan("Both", "cpu", "rtx 4060", cpu=100))
        placement = choose(m, self.devices, self.ledger)
        self.assertEqual(dict(placement.memory), {"cpu": 100, "gpu0": 0})
        self.assertEqual(placement.device_ids, ("cpu", "gpu0"))
        self.assertIsNone(choose(model("m", plan("P", "cpu", "tpu")), self.devices, self.ledger))

    def test_two_requirements_never_share_a_device(self):
        m = model("m", plan("Two", "nvidia", "rtx", nvidia=1000, rtx=1000))
        self.assertIsNone(choose(m, self.devices, self.ledger))
        more = dict(self.devices, gpu1=device("gpu1", 8000, name=RTX))
        self.assertEqual(sorted(choose(m, more, self.ledger).memory), ["gpu0", "gpu1"])

    def test_best_fit_among_matching_devices(self):
        gpus = devices(device("gpu0", 24000, name=RTX), device("gpu1", 8000, name=RTX),
                       device("gpu2", 16000, name=RTX))
        small = model("small", plan("P", "rtx", rtx=6000))
        self.assertEqual(dict(choose(small, gpus, self.ledger).devices), {"rtx": "gpu1"})
        medium = model("medium", plan("P", "rtx", rtx=10000))
        self.assertEqual(dict(choose(medium, gpus, self.ledger).devices), {"rtx": "gpu2"})

    def test_memory_key_case_may_differ_from_requirement(self):
        m = model("m", plan("P", "rtx 4060", RTX_4060=9000))
        self.assertIsNone(choose(m, self.devices, self.ledger))


class EvictionTests(SynchronousTestCase):

    def setUp(self):
        self.ledger = Ledger()
        self.devices = devices(device("gpu0", 10000, name=RTX), device("cpu", 32000))
        self.residents = []

    def hold(self, id, reserved, idle_since=0.0, in_flight=0):
        self.ledger.reserve(id, reserved)
        self.residents.append(resident(id, reserved, idle_since, in_flight))
        used = {d: mb for d, mb in reserved.items()}
        for dev, mb in used.items():
            old = self.devices[dev]
            self.devices[dev] = Device(old.id, old.kind, old.name, old.total_mb, old.free_mb - mb)

    def evict(self, m, now=1000.0):
        return plan_eviction(m, self.devices, self.ledger, self.residents, now)

    def test_long_idle_small_models_go_first(self):
        self.hold("recent-small", {"gpu0": 2000}, idle_since=900)
        self.hold("old-small", {"gpu0": 2000}, idle_since=100)
        self.hold("old-big", {"gpu0": 6000}, idle_since=0)
        placement, victims = self.evict(model("new", plan("P", "gpu0", gpu0=2000)))
        self.assertEqual(victims, ["old-small"])
        self.assertEqual(dict(placement.memory), {"gpu0": 2000})

    def test_score_order_until_covered_and_nobody_needlessly(self):
        self.hold("a", {"gpu0": 1000}, idle_since=0)
        self.hold("b", {"gpu0": 1000}, idle_since=0)
        self.hold("c", {"gpu0": 1000}, idle_since=10)
        self.hold("big", {"gpu0": 7000}, idle_since=990)
        _, victims = self.evict(model("new", plan("P", "gpu0", gpu0=1000)))
        self.assertEqual(victims, ["a"])
        _, victims = self.evict(model("new", plan("P", "gpu0", gpu0=2500)))
        self.assertEqual(victims, ["a", "b", "c"])
        _, victims = self.evict(model("new", plan("P", "gpu0", gpu0=5000)))
        self.assertEqual(victims, ["big"])

    def test_busy_and_starting_models_are_never_candidates(self):
        self.hold("busy", {"gpu0": 5000}, idle_since=0, in_flight=1)
        self.hold("starting", {"gpu0": 3000}, idle_since=None)
        self.hold("idle", {"gpu0": 2000}, idle_since=0)
        self.assertIsNone(self.evict(model("new", plan("P", "gpu0", gpu0=3000))))
        _, victims = self.evict(model("new", plan("P", "gpu0", gpu0=2000)))
        self.assertEqual(victims, ["idle"])

    def test_all_or_nothing(self):
        self.hold("a", {"gpu0": 4000})
        self.hold("b", {"gpu0": 4000}, in_flight=2)
        self.assertIsNone(self.evict(model("new", plan("P", "gpu0", gpu0=8000))))

    def test_only_models_on_the_short_device_are_candidates(self):
        self.hold("on-cpu", {"cpu": 30000}, idle_since=0)
        self.hold("on-gpu", {"gpu0": 9000}, idle_since=999)
        _, victims = self.evict(model("new", plan("P", "gpu0", gpu0=5000)))
        self.assertEqual(victims, ["on-gpu"])

    def test_first_plan_feasible_by_evicting_wins(self):
        self.hold("gpu-user", {"gpu0": 9000}, in_flight=1)
        self.hold("cpu-user", {"cpu": 30000})
        placement, victims = self.evict(model(
            "new", plan("GPU", "gpu0", gpu0=5000), plan("CPU", "cpu", cpu=8000)))
        self.assertEqual((placement.plan.name, victims), ("CPU", ["cpu-user"]))

    def test_a_victim_on_two_short_devices_counts_on_both(self):
        self.hold("split", {"gpu0": 6000, "cpu": 20000})
        self.hold("cpu-only", {"cpu": 10000}, idle_since=999)
        _, victims = self.evict(model("new", plan("P", "gpu0", "cpu", gpu0=8000, cpu=10000)))
        self.assertEqual(victims, ["split"])

    def test_never_more_than_the_device_holds(self):
        self.hold("a", {"gpu0": 4000})
        self.assertIsNone(self.evict(model("new", plan("P", "gpu0", gpu0=12000))))

    def test_explanation_names_device_need_and_holders(self):
        self.hold("a", {"gpu0": 5000})
        self.hold("b", {"gpu0": 3000})
        m = model("demo-chat", plan("GPU", "rtx 4060", rtx_4060=4000), plan("TPU", "tpu"))
        self.assertEqual(
            explain(m, self.devices, self.ledger),
            f"cannot place demo-chat: plan GPU needs 4000 MB on gpu0 ({RTX}), 2000 MB free "
            "(8000 reserved by a, b) | plan TPU no device matches 'tpu'")


DEVICE_TOTALS = {"gpu0": 8000, "gpu1": 16000, "cpu": 32000}
DEVICE_NAMES = {"gpu0": "NVIDIA GeForce RTX 4060", "gpu1": "NVIDIA RTX A4000",
                "cpu": "System RAM"}

requirement = st.sampled_from(["gpu0", "gpu1", "cpu", "nvidia", "rtx"])
plans = st.lists(requirement, min_size=1, max_size=2, unique=True).flatmap(
    lambda reqs: st.builds(
        lambda mbs, i: Plan(name=f"plan{i}", required_devices=tuple(reqs), script_path="x",
                            memory_mb=MappingProxyType(dict(zip(reqs, mbs)))),
        st.lists(st.sampled_from([0, 1500, 3000, 5000, 7000, 12000, 20000]),
                 min_size=len(reqs), max_size=len(reqs)),
        st.integers(0, 9)))
models = st.lists(plans, min_size=1, max_size=3).map(tuple)
operations = st.lists(st.tuples(
    st.sampled_from(["start", "start", "ready", "ready", "begin", "begin", "end", "stop",
                     "crash", "tick"]),
    st.integers(0, 3), st.integers(1, 600)), min_size=5, max_size=80)


class SimulationTests(SynchronousTestCase):
    """A simulated node driven by random operations keeps the placement promises."""

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(models, min_size=4, max_size=4), operations,
           st.dictionaries(st.sampled_from(list(DEVICE_TOTALS)), st.integers(0, 4000)))
    def test_never_overbooks_and_never_evicts_busy_models(self, model_plans, ops, outside):
        catalogue = [Model(id=f"m{i}", mode="Chat", port=1, plans=p)
                     for i, p in enumerate(model_plans)]
        ledger = Ledger()
        running: dict[str, dict] = {}
        now = 0.0

        def snapshot():
            # A starting model has its reservation but does not use the memory yet.
            return {d: Device(d, "gpu", DEVICE_NAMES[d], total,
                              total - outside.get(d, 0)
                              - sum(ledger.of(m).get(d, 0) for m, r in running.items()
                                    if r["idle_since"] is not None))
                    for d, total in DEVICE_TOTALS.items()}

        def residents():
            return [Resident(m, r["in_flight"], r["idle_since"], ledger.of(m))
                    for m, r in running.items()]

        for op, index, seconds in ops:
            target = catalogue[index]
            state = running.get(target.id)
            if op == "start" and state is None:
                placement = choose(target, snapshot(), ledger)
                if placement is None:
                    eviction = plan_eviction(target, snapshot(), ledger, residents(), now)
                    if eviction is not None:
                        for victim in eviction[1]:
                            self.assertEqual(running[victim]["in_flight"], 0)
                            self.assertIsNotNone(running[victim]["idle_since"])
                            ledger.release(victim)
                            del running[victim]
                        placement = choose(target, snapshot(), ledger)
                        self.assertIsNotNone(placement, "eviction did not make room")
                if placement is not None:
                    ledger.reserve(target.id, placement.memory)
                    running[target.id] = {"in_flight": 0, "idle_since": None}
            elif op == "ready" and state is not None and state["idle_since"] is None:
                state["idle_since"] = now
            elif op == "begin" and state is not None:
                if state["idle_since"] is None:
                    state["idle_since"] = now
                state["in_flight"] += 1
            elif op == "end" and state is not None and state["in_flight"] > 0:
                state["in_flight"] -= 1
                if state["in_flight"] == 0:
                    state["idle_since"] = now
            elif op in ("stop", "crash") and state is not None:
                ledger.release(target.id)
                del running[target.id]
            elif op == "tick":
                now += seconds
            for d, total in DEVICE_TOTALS.items():
                self.assertLessEqual(ledger.reserved_mb(d), total)
