"""Where a model runs: plan choice, the memory ledger and the choice of models to stop.

Everything here is pure and synchronous; L{llmnode.scheduler} decides when to use it. Memory
figures are in MB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

from llmnode.config import Model, Plan
from llmnode.costs import UNKNOWN
from llmnode.devices.interfaces import Device

#: Seconds of reload time that weigh as much as the memory a model holds (L{eviction_score}).
RELOAD_WEIGHT_S = 10.0

#: At most this many device assignments are considered per plan.
ASSIGNMENT_LIMIT = 5000


def matches(requirement: str, device: Device) -> bool:
    """Whether a plan's device name names C{device}: its id, or part of its product name.

    Both comparisons ignore case (C{"rtx 4060"} matches C{"NVIDIA GeForce RTX 4060"}).
    """
    wanted = requirement.strip().lower()
    return bool(wanted) and (wanted == device.id.lower() or wanted in device.name.lower())


def need_mb(plan: Plan, requirement: str) -> float:
    """The memory C{plan} needs on the device matching C{requirement}; 0 when not given
    (L{UNKNOWN} when the scheduler filled in that nothing is known)."""
    if requirement in plan.memory_mb:
        return float(plan.memory_mb[requirement])
    for key, mb in plan.memory_mb.items():
        if key.strip().lower() == requirement.strip().lower():
            return float(mb)
    return 0.0


class Ledger:
    """Memory promised to models, from the moment a start is decided until they stop."""

    def __init__(self) -> None:
        self._by_model: dict[str, dict[str, float]] = {}

    def reserve(self, model_id: str, memory: Mapping[str, float]) -> None:
        """Record C{memory} (device id -> MB) for C{model_id}, replacing its earlier entry."""
        self._by_model[model_id] = {d: float(mb) for d, mb in memory.items()}

    def release(self, model_id: str) -> dict[str, float]:
        """Forget C{model_id}'s reservation; return what it held (empty when nothing)."""
        return self._by_model.pop(model_id, {})

    def reserved_mb(self, device_id: str) -> float:
        return sum(held.get(device_id, 0.0) for held in self._by_model.values())

    def holders(self, device_id: str) -> dict[str, float]:
        """C{{model_id: MB}} of every model with memory reserved on C{device_id}."""
        return {m: held[device_id] for m, held in self._by_model.items()
                if held.get(device_id, 0.0) > 0}

    def of(self, model_id: str) -> dict[str, float]:
        return dict(self._by_model.get(model_id, {}))

    def models(self) -> list[str]:
        return list(self._by_model)


def free_mb(device: Device, ledger: Ledger) -> float:
    """The smaller of what C{device} reports free and what the ledger leaves of its total.

    A running backend's memory is counted by both, which is conservative: it never
    double-books, at the price of under-using a device whose models use less than they
    reserved.
    """
    return max(0.0, min(device.free_mb, device.total_mb - ledger.reserved_mb(device.id)))


@dataclass(frozen=True)
class Placement:
    """A decision: which plan runs a model, on which devices, holding how much memory.

    @ivar devices: requirement (as written in the plan) -> device id.
    @ivar memory: device id -> MB reserved, for every assigned device (0 where the plan
        gives no figure), in requirement order.
    """

    model_id: str
    plan: Plan
    devices: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    memory: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def device_ids(self) -> tuple[str, ...]:
        """Every assigned device id, in requirement order."""
        return tuple(self.memory)


@dataclass(frozen=True)
class Resident:
    """A model holding (or about to hold) memory, as eviction sees it.

    @ivar idle_since: clock seconds since which it has had no request; None while starting
        (never evicted then).
    @ivar reserved: device id -> MB it holds in the ledger.
    @ivar reload_s: how long it takes to load back (measured; 0 when unknown).
    @ivar rank: how soon it can be freed, lower first: 0 already stopping or draining, 1 idle,
        2 busy with its turn over, 3 busy within its turn. Ranks above 1 are only given by the
        scheduler, which drains such a model before it stops it.
    """

    model_id: str
    in_flight: int
    idle_since: Optional[float]
    reserved: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    rank: int = 1
    reload_s: float = 0.0


def _assignments(plan: Plan, devices: Mapping[str, Device],
                 usable: Callable[[int, Device], bool],
                 order: Callable[[int, Device], float]) -> Iterator[tuple[Device, ...]]:
    """Every way to give each requirement its own usable device, best-ordered first."""
    requirements = plan.required_devices
    options = [sorted((d for d in devices.values() if matches(r, d) and usable(i, d)),
                      key=lambda d, i=i: order(i, d))  # type: ignore[misc]
               for i, r in enumerate(requirements)]
    chosen: list[Device] = []
    budget = [ASSIGNMENT_LIMIT]

    def walk(i: int) -> Iterator[tuple[Device, ...]]:
        if i == len(requirements):
            budget[0] -= 1
            yield tuple(chosen)
            return
        for device in options[i]:
            if budget[0] <= 0:
                return
            if any(device.id == c.id for c in chosen):
                continue
            chosen.append(device)
            yield from walk(i + 1)
            chosen.pop()

    return walk(0)


def _placement(model: Model, plan: Plan, assignment: Sequence[Device],
               unknown: Callable[[Device], float]) -> Placement:
    """The placement of C{plan} on C{assignment}; an L{UNKNOWN} need reserves
    C{unknown(device)}."""
    devices: dict[str, str] = {}
    memory: dict[str, float] = {}
    for requirement, device in zip(plan.required_devices, assignment):
        devices.setdefault(requirement, device.id)
        need = need_mb(plan, requirement)
        memory[device.id] = unknown(device) if need == UNKNOWN else need
    return Placement(model.id, plan, MappingProxyType(devices), MappingProxyType(memory))


def _fits(need: float, device: Device, ledger: Ledger) -> bool:
    """Whether C{need} fits on C{device} now; an L{UNKNOWN} need fits only a device nobody
    else holds memory on, with some memory free."""
    if need == UNKNOWN:
        return ledger.reserved_mb(device.id) == 0 and free_mb(device, ledger) > 0
    return free_mb(device, ledger) >= need


def choose(model: Model, devices: Mapping[str, Device], ledger: Ledger) -> Optional[Placement]:
    """The first plan, in file order, that fits now, or None.

    Where several devices match a requirement the best fit wins: the device whose free
    memory exceeds the need by the least, keeping roomier devices for bigger models.
    Two requirements of one plan never share a device.
    """
    for plan in model.plans:
        needs = [need_mb(plan, r) for r in plan.required_devices]
        for assignment in _assignments(
                plan, devices,
                usable=lambda i, d: _fits(needs[i], d, ledger),
                order=lambda i, d: (-free_mb(d, ledger) if needs[i] == UNKNOWN
                                    else free_mb(d, ledger) - needs[i])):
            return _placement(model, plan, assignment, lambda d: free_mb(d, ledger))
    return None


def eviction_score(resident: Resident, device_ids: Iterable[str], now: float) -> float:
    """Higher goes first: idle seconds / (GB held on C{device_ids}, at least 0.5, times
    1 + reload seconds / 10). Long-idle, small models that load back quickly go first: every
    10 s a model takes to load back counts as much as the memory it holds."""
    held_gb = sum(resident.reserved.get(d, 0.0) for d in device_ids) / 1024.0
    idle = max(0.0, now - resident.idle_since) if resident.idle_since is not None else 0.0
    return idle / (max(0.5, held_gb) * (1.0 + resident.reload_s / RELOAD_WEIGHT_S))


def _victims(shortfalls: Mapping[str, float], candidates: Sequence[Resident],
             now: float) -> Optional[list[Resident]]:
    """Candidates in descending score order until every shortfall is covered.

    Any victim the others cover for anyway is then spared (lowest score spared first), so
    nobody is stopped needlessly. None when even all candidates together fall short.
    """
    pool = [c for c in candidates if any(c.reserved.get(d, 0.0) > 0 for d in shortfalls)]
    pool.sort(key=lambda c: (c.rank, -eviction_score(c, shortfalls, now), c.reload_s,
                             c.model_id))

    def covers(group: Iterable[Resident]) -> bool:
        return all(sum(c.reserved.get(d, 0.0) for c in group) >= short
                   for d, short in shortfalls.items())

    chosen: list[Resident] = []
    for candidate in pool:
        chosen.append(candidate)
        if covers(chosen):
            break
    else:
        return None
    for candidate in reversed(list(chosen)):
        rest = [c for c in chosen if c is not candidate]
        if covers(rest):
            chosen = rest
    return chosen


def plan_eviction(model: Model, devices: Mapping[str, Device], ledger: Ledger,
                  residents: Sequence[Resident], now: float, *, busy_too: bool = False
                  ) -> Optional[tuple[Placement, list[str]]]:
    """The first plan, in file order, that would fit after stopping idle models.

    Candidates have no request in flight (any, with C{busy_too}: the scheduler drains them
    first), are not starting, and hold memory on a device that is short. Returns the placement
    and the ids of the models to stop, taken by L{Resident.rank}, then in descending
    L{eviction_score} order, until enough is freed, or None when no plan can be made to fit
    (all or nothing). Within a plan the device assignment needing the fewest victims wins.
    """
    candidates = [r for r in residents
                  if (busy_too or r.in_flight == 0) and r.idle_since is not None
                  and r.model_id != model.id]
    for plan in model.plans:
        needs = [need_mb(plan, r) for r in plan.required_devices]
        best: Optional[tuple[Placement, list[str]]] = None
        for assignment in _assignments(
                plan, devices,
                usable=lambda i, d: d.total_mb >= needs[i] or (
                    needs[i] == UNKNOWN and d.total_mb > 0),
                order=lambda i, d: -free_mb(d, ledger)):
            shortfalls = {}
            for i, d in enumerate(assignment):
                if needs[i] == UNKNOWN:  # alone on it: everything reserved there must go
                    if ledger.reserved_mb(d.id) > 0:
                        shortfalls[d.id] = ledger.reserved_mb(d.id)
                elif needs[i] > free_mb(d, ledger):
                    shortfalls[d.id] = needs[i] - free_mb(d, ledger)
            victims = _victims(shortfalls, candidates, now) if shortfalls else []
            if victims is None:
                continue
            if best is None or len(victims) < len(best[1]):
                best = (_placement(model, plan, assignment, lambda d: d.total_mb),
                        [v.model_id for v in victims])
                if not victims:
                    break
        if best is not None:
            return best
    return None


def explain(model: Model, devices: Mapping[str, Device], ledger: Ledger) -> str:
    """Why C{model} does not fit now, plan by plan, naming devices, needs and free memory."""
    if not model.plans:
        return f"cannot place {model.id}: it has no hardware plan"
    reasons = []
    for plan in model.plans:
        problems = []
        taken: set[str] = set()
        for requirement in plan.required_devices:
            need = need_mb(plan, requirement)
            found = [d for d in devices.values() if matches(requirement, d) and d.id not in taken]
            if not found:
                problems.append(f"no device matches {requirement!r}")
                continue
            device = max(found, key=lambda d: free_mb(d, ledger))
            taken.add(device.id)
            free = free_mb(device, ledger)
            if need == UNKNOWN:
                holders = ledger.holders(device.id)
                if holders:
                    problems.append(f"needs {device.id} ({device.name}) to itself (nothing "
                                    f"learned yet), held by {', '.join(sorted(holders))}")
                elif free <= 0:
                    problems.append(f"needs {device.id} ({device.name}) to itself (nothing "
                                    f"learned yet), 0 MB free")
            elif need > free:
                holders = ledger.holders(device.id)
                held = (f" ({ledger.reserved_mb(device.id):.0f} reserved by "
                        f"{', '.join(sorted(holders))})" if holders else "")
                problems.append(f"needs {need:.0f} MB on {device.id} ({device.name}), "
                                f"{free:.0f} MB free{held}")
        reasons.append(f"plan {plan.name} " + "; ".join(problems or ["should fit"]))
    return f"cannot place {model.id}: " + " | ".join(reasons)


def possible(model: Model, devices: Mapping[str, Device]) -> bool:
    """Whether some plan could fit on these devices were they empty."""
    for plan in model.plans:
        needs = [need_mb(plan, r) for r in plan.required_devices]
        for _ in _assignments(plan, devices,
                              usable=lambda i, d: d.total_mb >= needs[i] or (
                                  needs[i] == UNKNOWN and d.total_mb > 0),
                              order=lambda i, d: 0.0):
            return True
    return False
