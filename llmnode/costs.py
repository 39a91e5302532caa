"""Learned costs: what each model really uses on each device, and how long it takes to load.

L{CostBook} keeps, per model and plan, the peak memory measured on each of the plan's
requirements and the last load time (spawn to healthy), in
C{<runtime_dir>/learned/costs.json}, so that they survive restarts and reloads. Figures are keyed by a fingerprint of the plan's
C{script_path} and C{required_devices}: a changed command forgets them.

The scheduler places a plan without C{memory_mb} by its learned peak plus a margin; with
nothing learned the model starts alone on the device (L{UNKNOWN}). A declared figure
wins, unless the measured peak is larger: then the larger is used and the node warns.

L{group_usage} measures one backend's process group (I/O: run it off the reactor thread).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, cast

from llmnode.config import Model, Plan

if TYPE_CHECKING:
    from llmnode.devices.interfaces import Device

#: A need nobody knows yet (no C{memory_mb} and nothing learned): the model starts alone on
#: the device and reserves all the memory it has free then (see L{llmnode.placement}).
UNKNOWN = math.inf

_MB = 1024 * 1024
_VERSION = 1


def costs_path(runtime_dir: str) -> str:
    """Where a node keeps its learned costs (not beside the backend records, which the next
    node reclaims)."""
    return os.path.join(runtime_dir, "learned", "costs.json")


def fingerprint(plan: Plan) -> str:
    """What identifies a plan's figures: its command and its devices."""
    text = json.dumps([plan.script_path, list(plan.required_devices)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class PlanCosts:
    """The figures learned for one plan of one model.

    @ivar peak_mb: requirement (as written in the plan) -> the most memory measured on the
        device it was placed on, in MB.
    """

    fingerprint: str
    load_s: Optional[float] = None
    peak_mb: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "load_s": self.load_s,
                "peak_mb": dict(self.peak_mb)}


class CostBook:
    """Learned figures per model and plan; plain data, saved with L{save}.

    @param path: the JSON file; None keeps the figures in memory only.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path
        self._plans: dict[tuple[str, str], PlanCosts] = {}
        self.dirty = False

    # -- reading ---------------------------------------------------------------------------

    def get(self, model_id: str, plan: Plan) -> Optional[PlanCosts]:
        """The figures of C{plan}, unless its command or devices changed since."""
        costs = self._plans.get((model_id, plan.name))
        if costs is None or costs.fingerprint != fingerprint(plan):
            return None
        return costs

    def load_s(self, model: Model) -> Optional[float]:
        """The learned load time of the first of C{model}'s plans that has one."""
        for plan in model.plans:
            costs = self.get(model.id, plan)
            if costs is not None and costs.load_s is not None:
                return costs.load_s
        return None

    def effective(self, model: Model, margin: float) -> Model:
        """C{model} with every plan's memory filled in for placement: a declared figure (or
        the measured peak, if larger); else the learned peak times C{1 + margin}; else
        L{UNKNOWN}."""
        plans = []
        changed = False
        for plan in model.plans:
            costs = self.get(model.id, plan)
            memory = dict(plan.memory_mb)
            for requirement in plan.required_devices:
                peak = costs.peak_mb.get(requirement) if costs is not None else None
                declared = _declared(plan, requirement)
                if declared is not None:
                    if peak is not None and peak > declared:
                        memory[cast(str, _key(plan, requirement))] = peak
                elif peak is not None:
                    memory[requirement] = peak * (1.0 + margin)
                else:
                    memory[requirement] = UNKNOWN
            if memory != dict(plan.memory_mb):
                changed = True
                plan = replace(plan, memory_mb=MappingProxyType(memory))
            plans.append(plan)
        return replace(model, plans=tuple(plans)) if changed else model

    def info(self, model: Model) -> dict[str, dict[str, Any]]:
        """Per plan: declared and learned figures (for the API and C{llmnode check})."""
        result: dict[str, dict[str, Any]] = {}
        for plan in model.plans:
            costs = self.get(model.id, plan)
            result[plan.name] = {
                "declared_mb": {r: _declared(plan, r) for r in plan.required_devices},
                "learned_peak_mb": dict(costs.peak_mb) if costs is not None else {},
                "learned_load_s": costs.load_s if costs is not None else None,
            }
        return result

    def items(self) -> Iterable[tuple[tuple[str, str], PlanCosts]]:
        return self._plans.items()

    # -- learning ----------------------------------------------------------------------------

    def _entry(self, model_id: str, plan: Plan) -> PlanCosts:
        costs = self.get(model_id, plan)
        if costs is None:
            costs = self._plans[(model_id, plan.name)] = PlanCosts(fingerprint(plan))
        return costs

    def record_load(self, model_id: str, plan: Plan, seconds: float) -> None:
        self._entry(model_id, plan).load_s = round(seconds, 3)
        self.dirty = True

    def record_usage(self, model_id: str, plan: Plan, requirement: str,
                     mb: float) -> Optional[float]:
        """Note C{mb} in use on C{requirement}'s device; the new peak if it grew, else None."""
        costs = self._entry(model_id, plan)
        if mb <= costs.peak_mb.get(requirement, 0.0):
            return None
        costs.peak_mb[requirement] = round(mb, 1)
        self.dirty = True
        return costs.peak_mb[requirement]

    # -- the file ------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the file; a missing or unreadable one leaves the book empty.

        @raise ValueError: the file is not a costs file (the caller logs it).
        """
        if self.path is None or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            raise ValueError(f"{self.path} is not a version {_VERSION} costs file")
        for model_id, plans in data.get("models", {}).items():
            for plan_name, entry in plans.items():
                self._plans[(model_id, plan_name)] = PlanCosts(
                    str(entry["fingerprint"]), entry.get("load_s"),
                    {str(k): float(v) for k, v in entry.get("peak_mb", {}).items()})

    def save(self) -> None:
        """Write the file (atomically) if anything changed since the last save."""
        if self.path is None or not self.dirty:
            return
        models: dict[str, dict[str, dict[str, Any]]] = {}
        for (model_id, plan_name), costs in sorted(self._plans.items()):
            models.setdefault(model_id, {})[plan_name] = costs.as_json()
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        temporary = f"{self.path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            json.dump({"version": _VERSION, "models": models}, f, indent=1, sort_keys=True)
        os.replace(temporary, self.path)
        self.dirty = False


def _declared(plan: Plan, requirement: str) -> Optional[float]:
    key = _key(plan, requirement)
    return None if key is None else float(plan.memory_mb[key])


def _key(plan: Plan, requirement: str) -> Optional[str]:
    """The C{memory_mb} key written for C{requirement} (case may differ), or None."""
    if requirement in plan.memory_mb:
        return requirement
    for key in plan.memory_mb:
        if key.strip().lower() == requirement.strip().lower():
            return key
    return None


def group_usage(pgid: int, devices: Mapping[str, "Device"],
                members: Callable[[int], list[int]], process: Any = None) -> dict[str, float]:
    """MB each device holds for the processes of group C{pgid}: what the device reports per
    process where it reports processes (NVML), else, on a C{cpu} device, their resident
    memory (psutil). Blocking: run it in a thread.

    @param members: C{members(pgid)} lists the group's pids.
    @param process: C{psutil.Process} (tests pass a fake).
    """
    import psutil  # here, not above: C{llmnode check} reads costs without psutil installed

    process = process or psutil.Process
    pids = set(members(pgid))
    usage: dict[str, float] = {}
    if not pids:
        return usage
    rss: Optional[float] = None
    for device in devices.values():
        if device.processes:
            usage[device.id] = sum(mb for pid, mb in device.processes if pid in pids)
        elif device.kind == "cpu":
            if rss is None:
                rss = 0.0
                for pid in pids:
                    try:
                        rss += process(pid).memory_info().rss / _MB
                    except psutil.Error:
                        pass
            usage[device.id] = rss
    return usage
