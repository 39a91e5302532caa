"""The scheduler: every admission, start, drain and stop decision of the node, and nothing else.

It is pure and synchronous: the node tells it what happened (a request arrived or ended, a
client left, a start finished or failed, a backend stopped or crashed, the devices were read
again, its timer fired, an operator or a reload asked for something) and it answers with
L{Decision}s (forward this request, reject that one with a reason, start a model with a
placement, stop one, forget one, wake me at). L{llmnode.node.Node} carries them out; tests drive
this module with plain numbers for time.

Policy (README, "Scheduling"):

 - A loaded model admits its requests. A request for a model that needs memory held by others
   waits in its model's queue.
 - Models that hold that memory are chosen all-or-nothing (L{placement.plan_eviction}). An
   idle one is stopped at once. A busy one keeps admitting until its turn ends, then drains:
   it admits nothing new, its requests in flight finish, then it stops. A request in flight is
   never cut to make room.
 - A model within its turn that has had nothing in flight for C{idle_grace} seconds is idle:
   it is stopped at once (its clients were not just between two requests).
 - A turn lasts C{turn_factor} times the swap it would cost (the busy model's measured stop
   plus the waiting model's measured load), between C{turn_min} and C{turn_max}, unless
   C{turn_time} fixes it; it counts from when the model became ready, so a model that has been
   resident longer than a turn drains as soon as someone waits.
 - Of several waiting models, the one whose oldest request is oldest goes first; each point
   of C{priority} counts as C{priority_step} seconds of extra waiting (so a low priority model
   still gets its turn: its requests age).
 - A request is rejected only for a reason: its model can never fit, its start failed, its
   model is held back after repeated crashes, its queue is full (429), or it waited longer
   than C{queue_timeout}.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, replace
from itertools import count
from typing import Any, Mapping, Optional, Sequence, Union

from llmnode.config import Model
from llmnode.costs import CostBook
from llmnode.devices.interfaces import Device
from llmnode.errors import NodeError, Overloaded, Unavailable
from llmnode.lifecycle import (DRAINING, FAILED, LIVE, RUNNING, STARTING, STOPPED, STOPPING,
                               Lifecycle, State)
from llmnode.placement import (Ledger, Placement, Resident, choose, explain, plan_eviction,
                               possible)

#: Reasons a model stops (the label of C{llmnode_model_stops_total}).
STOP_REASONS = ("idle", "turn", "evict", "admin", "reload", "crash", "shutdown")


@dataclass(frozen=True)
class CrashPolicy:
    """After C{limit} crashes within C{window} seconds, hold the model back for C{hold} seconds."""

    limit: int = 3
    window: float = 60.0
    hold: float = 30.0


class CrashHistory:
    """Recent crashes and failed starts of one model, and the hold-back they cause."""

    def __init__(self, policy: CrashPolicy = CrashPolicy()) -> None:
        self._policy = policy
        self._times: list[float] = []
        self.held_until: Optional[float] = None

    def record(self, now: float) -> None:
        """Count one crash at C{now}; start a hold-back if the limit is reached."""
        self._times = [t for t in self._times if now - t < self._policy.window] + [now]
        if len(self._times) >= self._policy.limit:
            self.held_until = now + self._policy.hold
            self._times = []

    def retry_after(self, now: float) -> Optional[float]:
        """Seconds until starts are allowed again, or None when they are allowed now."""
        if self.held_until is None:
            return None
        left = self.held_until - now
        if left <= 0:
            self.held_until = None
            return None
        return left

    def reset(self) -> None:
        self._times = []
        self.held_until = None


@dataclass(frozen=True)
class Policy:
    """The scheduler's knobs (program options of the same names; seconds)."""

    queue_timeout: float = 600.0
    turn_factor: float = 2.0
    turn_min: float = 2.0
    turn_max: float = 60.0
    turn_time: Optional[float] = None
    priority_step: float = 10.0
    idle_grace: float = 0.25
    memory_margin: float = 0.1
    recheck_interval: float = 5.0
    reclaim_interval: float = 0.1
    reclaim_timeout: float = 30.0
    crash: CrashPolicy = CrashPolicy()


# -- decisions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Queued:
    """The request was given C{ticket}: it waits; a later L{Forward} or L{Reject} ends that."""

    ticket: int
    model_id: str


@dataclass(frozen=True)
class Forward:
    """Send the waiting request C{ticket} to its model's backend now (it is counted in flight;
    a start waiter only learns that the model is ready)."""

    ticket: int
    model_id: str


@dataclass(frozen=True)
class Reject:
    """Answer the waiting request C{ticket} with C{error}; it is no longer queued."""

    ticket: int
    model_id: str
    error: NodeError


@dataclass(frozen=True)
class Start:
    """Start the model's backend with C{placement} (its memory is reserved already)."""

    model_id: str
    placement: Placement


@dataclass(frozen=True)
class Stop:
    """Stop the model's backend (abandoning a start in progress); report L{Scheduler.stopped}."""

    model_id: str
    reason: str


@dataclass(frozen=True)
class Forget:
    """A model removed by a reload has stopped: drop it."""

    model_id: str


@dataclass(frozen=True)
class Arm:
    """Call L{Scheduler.tick} at clock time C{at} (None: no timer needed). Replaces the last."""

    at: Optional[float]


Decision = Union[Queued, Forward, Reject, Start, Stop, Forget, Arm]

#: What L{Scheduler.try_admit}'s callers get when nothing needs doing.
NOTHING: tuple[()] = ()


# -- per-model records -------------------------------------------------------------------------

@dataclass
class Waiter:
    """A queued request (C{start} False) or an operator's start (C{start} True)."""

    ticket: int
    model_id: str
    arrived: float
    start: bool = False


@dataclass
class Drain:
    """Why a model drains, and for which waiting model (None: not for a swap)."""

    reason: str
    for_model: Optional[str] = None


@dataclass
class Slot:
    """What the scheduler knows of one model."""

    model: Model
    lifecycle: Lifecycle
    history: CrashHistory
    queue: deque[Waiter] = field(default_factory=deque)
    in_flight: int = 0
    last_used: Optional[float] = None
    ready_at: Optional[float] = None
    placement: Optional[Placement] = None
    load_s: Optional[float] = None
    stop_s: Optional[float] = None
    stop_began: Optional[float] = None
    stop_reason: str = ""
    drain: Optional[Drain] = None
    pending_model: Optional[Model] = None
    retiring: bool = False
    last_error: Optional[str] = None
    waiting_for: str = ""
    forwarded_at_once: int = 0
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    stops: Counter[str] = field(default_factory=Counter)

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def requests_queued(self) -> int:
        return sum(1 for w in self.queue if not w.start)


#: The model settings its backend process depends on: a reload that changes any of them
#: restarts a running backend; other changes apply to it at once.
BACKEND_FIELDS = ("port", "plans", "health_path", "start_timeout", "stop_timeout")


def same_backend(old: Model, new: Model) -> bool:
    """Whether C{new} runs the same backend process as C{old} (see L{BACKEND_FIELDS})."""
    return all(getattr(old, name) == getattr(new, name) for name in BACKEND_FIELDS)


class Scheduler:
    """Owns every model's queue, the memory ledger and the lifecycle of every model.

    @param models: the configured models.
    @param policy: the knobs.
    """

    def __init__(self, models: Sequence[Model], policy: Policy = Policy(), now: float = 0.0,
                 costs: Optional[CostBook] = None) -> None:
        self.policy = policy
        self.costs = costs if costs is not None else CostBook()
        self.ledger = Ledger()
        self.devices: Mapping[str, Device] = {}
        self.devices_known = False
        self.slots: dict[str, Slot] = {}
        for model in models:
            self._add(model, now)
        self._tickets = count(1)
        self._where: dict[int, Slot] = {}
        self._waiting = 0
        self._armed: Optional[float] = None
        self._memory_short_since: Optional[float] = None
        self._last_stop_at: Optional[float] = None
        self._closed = False
        #: model id -> the waiting model it must make room for (as of the last decision).
        self._room_for: dict[str, str] = {}

    @property
    def closed(self) -> bool:
        """Whether L{shutdown} was called."""
        return self._closed

    def _add(self, model: Model, now: float) -> Slot:
        slot = Slot(model, Lifecycle(model.id, STOPPED, now), CrashHistory(self.policy.crash))
        self.slots[model.id] = slot
        return slot

    # -- requests --------------------------------------------------------------------------

    def try_admit(self, model_id: str) -> bool:
        """The fast path: admit a request at once if its model is running with a free slot and
        nobody queued before it. Otherwise nothing changes (call L{arrive})."""
        slot = self.slots[model_id]
        if slot.lifecycle.state is not RUNNING or slot.queue:
            return False
        limit = slot.model.max_concurrency
        if limit is not None and slot.in_flight >= limit:
            return False
        slot.in_flight += 1
        slot.forwarded_at_once += 1
        return True

    def arrive(self, model_id: str, now: float, *, start: bool = False) -> list[Decision]:
        """A request (or, with C{start}, an operator's start) that L{try_admit} did not take.

        The first decision is its L{Queued} ticket; a L{Forward} or L{Reject} of that ticket may
        follow at once or later.
        """
        slot = self.slots[model_id]
        ticket = next(self._tickets)
        decisions: list[Decision] = [Queued(ticket, model_id)]
        if self._closed:
            decisions.append(Reject(ticket, model_id, Unavailable(
                "the node is stopping", retry_after=5)))
            return decisions
        if not start and slot.requests_queued >= self._queue_room(slot):
            decisions.append(Reject(ticket, model_id, Overloaded(
                f"model {model_id!r} already has {slot.model.max_queue} requests waiting "
                f"(max_queue)", retry_after=self._retry_hint(slot))))
            return decisions
        if start and slot.history.retry_after(now) is not None:
            slot.history.reset()  # an operator's start lifts a crash hold-back
        self._enqueue(slot, Waiter(ticket, model_id, now, start))
        decisions.extend(self._reconcile(now))
        return decisions

    @staticmethod
    def _queue_room(slot: Slot) -> int:
        """How many requests may wait: C{max_queue}, plus the concurrency slots that will be
        free when the model runs (those wait only for the start)."""
        limit = slot.model.max_concurrency
        if limit is None:
            return slot.model.max_queue
        return slot.model.max_queue + max(0, limit - slot.in_flight)

    def _enqueue(self, slot: Slot, waiter: Waiter) -> None:
        slot.queue.append(waiter)
        self._where[waiter.ticket] = slot
        self._waiting += 1

    def _dequeue(self, slot: Slot, waiter: Waiter) -> None:
        slot.queue.remove(waiter)
        del self._where[waiter.ticket]
        self._waiting -= 1

    def finish(self, model_id: str, now: float) -> Sequence[Decision]:
        """A forwarded request ended (answered, failed or abandoned by its client)."""
        slot = self.slots.get(model_id)
        if slot is None:
            return NOTHING
        slot.in_flight = max(0, slot.in_flight - 1)
        slot.last_used = now
        if self._waiting or slot.lifecycle.state is DRAINING:
            return self._reconcile(now)
        return NOTHING

    def leave(self, ticket: int, now: float) -> Sequence[Decision]:
        """The client of a queued request left (or its answer was sent): it leaves the queue.

        Unknown tickets (already forwarded or rejected) are ignored.
        """
        slot = self._where.get(ticket)
        if slot is None:
            return NOTHING
        for waiter in slot.queue:
            if waiter.ticket == ticket:
                self._dequeue(slot, waiter)
                break
        return self._reconcile(now)

    # -- backends ----------------------------------------------------------------------------

    def started(self, model_id: str, now: float, load_s: Optional[float] = None) -> list[Decision]:
        """The model's backend answered its health path."""
        slot = self.slots[model_id]
        if slot.state is not STARTING:
            return []  # stopped meanwhile: the node stops the backend and reports stopped()
        slot.lifecycle.move(RUNNING, "ready", now)
        slot.ready_at = slot.last_used = now
        if load_s is not None:
            slot.load_s = load_s
            if slot.placement is not None:
                self.costs.record_load(model_id, slot.placement.plan, load_s)
        slot.last_error = None
        return self._reconcile(now)

    def start_failed(self, model_id: str, now: float, message: str, *,
                     counts: bool = True) -> list[Decision]:
        """The start failed and nothing of it is left. Its waiters get the failure.

        @param counts: whether it counts towards the crash hold-back (a placement refusal
            does not).
        """
        slot = self.slots[model_id]
        if slot.state is not STARTING:
            return []
        slot.lifecycle.move(FAILED, message, now)
        self._release(slot)
        slot.last_error = message
        if counts:
            slot.history.record(now)
        decisions: list[Decision] = []
        error = Unavailable(message, retry_after=slot.history.retry_after(now) or 1)
        for waiter in list(slot.queue):
            self._dequeue(slot, waiter)
            decisions.append(Reject(waiter.ticket, model_id, error))
        decisions.extend(self._reconcile(now))
        return decisions

    def crashed(self, model_id: str, now: float, status: str) -> list[Decision]:
        """The running backend exited on its own. Its memory counts as held until
        L{stopped}."""
        slot = self.slots[model_id]
        if slot.state not in (RUNNING, DRAINING):
            return []
        message = f"backend crashed ({status})"
        slot.last_error = message
        slot.history.record(now)
        return [self._begin_stop(slot, "crash", now, message)] + self._reconcile(now)

    def stopped(self, model_id: str, now: float) -> list[Decision]:
        """Nothing of the model's backend is left: its memory and port are free."""
        slot = self.slots.get(model_id)
        if slot is None or slot.state is not STOPPING:
            return []
        crashed = slot.stop_reason == "crash"
        slot.lifecycle.move(FAILED if crashed else STOPPED, slot.stop_reason, now)
        if slot.stop_began is not None and not crashed:
            slot.stop_s = now - slot.stop_began
        self._release(slot)
        self._last_stop_at = now
        decisions: list[Decision] = []
        if slot.retiring:
            decisions.extend(self._forget(slot))
        elif slot.pending_model is not None:
            self._apply_pending(slot)
        decisions.extend(self._reconcile(now))
        return decisions

    def _release(self, slot: Slot) -> None:
        self.ledger.release(slot.model.id)
        slot.placement = None
        slot.drain = None
        slot.ready_at = None

    def _apply_pending(self, slot: Slot) -> None:
        assert slot.pending_model is not None
        slot.model, slot.pending_model = slot.pending_model, None
        slot.history.reset()

    # -- devices and time ------------------------------------------------------------------

    def devices_changed(self, devices: Mapping[str, Device], now: float) -> list[Decision]:
        """A new device snapshot."""
        self.devices = devices
        self.devices_known = True
        if self._waiting:
            return self._reconcile(now)
        return []

    def tick(self, now: float) -> list[Decision]:
        """The timer asked for by the last L{Arm} fired."""
        self._armed = None
        return self._reconcile(now)

    # -- operators, the sweeper and reloads ----------------------------------------------------

    def stop(self, model_id: str, reason: str, now: float) -> list[Decision]:
        """Stop a model for C{reason}: C{idle} only if nothing is in flight; C{admin} and
        C{reload} drain first; C{shutdown} stops at once."""
        slot = self.slots.get(model_id)
        if slot is None:
            return []
        state = slot.state
        decisions: list[Decision] = []
        if reason == "admin":
            for waiter in [w for w in slot.queue if w.start]:
                self._dequeue(slot, waiter)
                decisions.append(Reject(waiter.ticket, model_id, Unavailable(
                    f"model {model_id!r} was stopped by an operator before it was ready")))
        if state is STARTING or (state in (RUNNING, DRAINING) and reason == "shutdown"):
            decisions.append(self._begin_stop(slot, reason, now))
        elif state is RUNNING and reason == "idle":
            if slot.in_flight == 0 and not slot.queue:
                decisions.append(self._begin_stop(slot, reason, now))
        elif state in (RUNNING, DRAINING) and reason != "idle":
            if state is RUNNING:
                slot.lifecycle.move(DRAINING, reason, now)
            slot.drain = Drain(reason)
        elif state is FAILED and reason == "admin":
            slot.lifecycle.move(STOPPED, reason, now)
        decisions.extend(self._reconcile(now))
        return decisions

    def shutdown(self, now: float) -> list[Decision]:
        """The node is stopping: reject every waiter, stop every model now."""
        self._closed = True
        decisions: list[Decision] = []
        for slot in list(self.slots.values()):
            for waiter in list(slot.queue):
                self._dequeue(slot, waiter)
                decisions.append(Reject(waiter.ticket, slot.model.id, Unavailable(
                    "the node is stopping", retry_after=5)))
            if slot.state in (STARTING, RUNNING, DRAINING):
                decisions.append(self._begin_stop(slot, "shutdown", now))
        decisions.append(self._arm(None))
        return decisions

    def reload(self, models: Sequence[Model],
               now: float) -> tuple[dict[str, list[str]], list[Decision]]:
        """Switch to C{models}: unchanged ones are left alone, changed ones drain and restart
        with the new settings (if they were running), removed ones drain, stop and are
        forgotten, added ones are added (and started if C{auto_start}).

        @return: model ids by outcome, and the decisions.
        """
        outcome: dict[str, list[str]] = {"unchanged": [], "changed": [], "added": [], "removed": []}
        decisions: list[Decision] = []
        wanted = {model.id for model in models}
        for model in models:
            slot = self.slots.get(model.id)
            if slot is None:
                slot = self._add(model, now)
                outcome["added"].append(model.id)
            elif slot.model == model and slot.pending_model is None and not slot.retiring:
                outcome["unchanged"].append(model.id)
                continue
            else:
                outcome["added" if slot.retiring else "changed"].append(model.id)
                slot.retiring = False
            if slot.state in (STOPPED, FAILED):
                slot.model, slot.pending_model = model, None
                slot.history.reset()
                if model.auto_start:
                    self._enqueue(slot, Waiter(next(self._tickets), model.id, now, True))
                continue
            if slot.pending_model is None and same_backend(slot.model, model):
                # Only how requests reach it changed (names, endpoints, filters, limits,
                # scheduling): the running backend stays.
                slot.model = model
                continue
            slot.pending_model = model
            if slot.state is not STOPPING and not any(w.start for w in slot.queue):
                # It was running (or starting): it runs again with the new settings.
                self._enqueue(slot, Waiter(next(self._tickets), model.id, now, True))
            decisions.extend(self._retire_backend(slot, now))
        for model_id, slot in list(self.slots.items()):
            if model_id in wanted or slot.retiring:
                continue
            outcome["removed"].append(model_id)
            slot.retiring = True
            if slot.state in (STOPPED, FAILED):
                decisions.extend(self._forget(slot))
            else:
                decisions.extend(self._retire_backend(slot, now))
        decisions.extend(self._reconcile(now))
        return outcome, decisions

    def _retire_backend(self, slot: Slot, now: float) -> list[Decision]:
        """Stop a starting backend now; let a running one drain first."""
        if slot.state is STARTING:
            return [self._begin_stop(slot, "reload", now)]
        if slot.state is RUNNING:
            slot.lifecycle.move(DRAINING, "reload", now)
        if slot.state is DRAINING:
            slot.drain = Drain("reload")
        return []

    def _forget(self, slot: Slot) -> list[Decision]:
        """Drop a removed model that holds nothing; its waiters learn why."""
        model_id = slot.model.id
        decisions: list[Decision] = []
        for waiter in list(slot.queue):
            self._dequeue(slot, waiter)
            decisions.append(Reject(waiter.ticket, model_id, Unavailable(
                f"model {model_id!r} was removed from the config")))
        del self.slots[model_id]
        decisions.append(Forget(model_id))
        return decisions

    # -- reporting -------------------------------------------------------------------------

    def turn_length(self, holder: Slot, waiting: Optional[Slot]) -> float:
        """How long C{holder} keeps admitting while C{waiting} needs its memory."""
        fixed = holder.model.turn_time if holder.model.turn_time is not None \
            else self.policy.turn_time
        if fixed is not None:
            return fixed
        load = None
        if waiting is not None:
            load = waiting.load_s if waiting.load_s is not None else self.costs.load_s(
                waiting.model)
        if load is None:
            known = [s.load_s for s in self.slots.values() if s.load_s is not None]
            load = sum(known) / len(known) if known else 0.0
        swap = (holder.stop_s or 0.0) + load
        return min(self.policy.turn_max, max(self.policy.turn_min, self.policy.turn_factor * swap))

    def turn_ends_at(self, slot: Slot) -> Optional[float]:
        """When C{slot}'s turn ends for the model that waits for it (None: nobody waits)."""
        if slot.state is not RUNNING or slot.ready_at is None:
            return None
        waiting = self.slots.get(self._room_for.get(slot.model.id, ""))
        if waiting is None:
            return None
        return slot.ready_at + self.turn_length(slot, waiting)

    def describe(self, model_id: str, now: float) -> dict[str, Any]:
        """The scheduler's part of a model's info."""
        slot = self.slots[model_id]
        oldest = min((w.arrived for w in slot.queue), default=None)
        drain = slot.drain
        return {
            "queued": slot.requests_queued,
            "oldest_wait_s": None if oldest is None else round(now - oldest, 3),
            "draining": None if drain is None else {"reason": drain.reason,
                                                     "for": drain.for_model},
            "turn_ends_at": self.turn_ends_at(slot),
            "waiting_for": self.wait_reason(model_id, now) if slot.queue else None,
            "load_s": slot.load_s,
            "stop_s": slot.stop_s,
            "priority": slot.model.priority,
            "costs": self.costs.info(slot.model),
        }

    def wait_reason(self, model_id: str, now: float) -> str:
        """What a queued request of C{model_id} waits for, in words."""
        slot = self.slots.get(model_id)
        if slot is None:
            return "removed"
        state = slot.state
        if state is STARTING:
            return f"loading {model_id}{self._estimate(slot)}"
        if state is DRAINING:
            return (f"{model_id} finishing {slot.in_flight} requests "
                    f"({slot.drain.reason if slot.drain else 'drain'}), then loading it again")
        if state is STOPPING:
            return f"{model_id} stopping, then loading it again"
        if state is RUNNING:
            return f"a free slot of {model_id} (max_concurrency {slot.model.max_concurrency})"
        return slot.waiting_for or f"loading {model_id}"

    @staticmethod
    def _estimate(slot: Slot) -> str:
        return f", ~{slot.load_s:.0f} s" if slot.load_s is not None else ""

    @staticmethod
    def _retry_hint(slot: Slot) -> float:
        return max(1.0, round(slot.load_s or 1.0))

    # -- the decision ------------------------------------------------------------------------

    def _begin_stop(self, slot: Slot, reason: str, now: float, why: str = "") -> Stop:
        slot.lifecycle.move(STOPPING, why or reason, now)
        slot.stop_reason = reason
        slot.stop_began = now
        slot.drain = None
        slot.stops[reason] += 1
        return Stop(slot.model.id, reason)

    def _reconcile(self, now: float) -> list[Decision]:
        """Everything that should happen now, given the queues, the models and the memory."""
        decisions: list[Decision] = []
        wake: list[float] = []
        for _ in range(2):
            self._admit_running(now, decisions)
            self._room_for = self._place_waiters(now, decisions, wake)
            self._settle_drains(now, self._room_for, decisions)
            self._admit_running(now, decisions)
            if not self._expire(now, decisions):
                break
            wake = [at for at in wake if at > now]  # what expired may have asked for these
        for slot in self.slots.values():
            if slot.queue and slot.state is not STARTING:
                wake.append(slot.queue[0].arrived + self.policy.queue_timeout)
        at = min(wake) if wake else None
        if at != self._armed:
            decisions.append(self._arm(at))
        return decisions

    def _arm(self, at: Optional[float]) -> Arm:
        self._armed = at
        return Arm(at)

    def _expire(self, now: float, decisions: list[Decision]) -> bool:
        """Reject waiters older than C{queue_timeout}; whether there were any. Waiting for the
        own model's start is bounded by its C{start_timeout} instead."""
        limit = self.policy.queue_timeout
        expired = False
        for slot in self.slots.values():
            if not slot.queue or slot.state is STARTING:
                continue
            for waiter in list(slot.queue):
                if now - waiter.arrived >= limit:
                    expired = True
                    self._dequeue(slot, waiter)
                    what = self.wait_reason(slot.model.id, now)
                    decisions.append(Reject(waiter.ticket, slot.model.id, Unavailable(
                        f"waited {now - waiter.arrived:.0f} s (queue_timeout) for model "
                        f"{slot.model.id!r}: still waiting for {what}",
                        retry_after=self._retry_hint(slot))))
        return expired

    def _admit_running(self, now: float, decisions: list[Decision]) -> None:
        for slot in self.slots.values():
            if slot.state is not RUNNING or not slot.queue:
                continue
            limit = slot.model.max_concurrency
            for waiter in list(slot.queue):
                if not waiter.start and limit is not None and slot.in_flight >= limit:
                    continue
                self._dequeue(slot, waiter)
                if not waiter.start:
                    slot.in_flight += 1
                    slot.waits.append(now - waiter.arrived)
                decisions.append(Forward(waiter.ticket, slot.model.id))

    def _order(self, now: float) -> list[Slot]:
        """Models with waiters that are not running, oldest (priority-weighted) first."""
        waiting = [s for s in self.slots.values() if s.queue and s.state is not RUNNING]
        step = self.policy.priority_step
        waiting.sort(key=lambda s: (s.queue[0].arrived - s.model.priority * step,
                                    s.queue[0].ticket))
        return waiting

    def _place_waiters(self, now: float, decisions: list[Decision],
                       wake: list[float]) -> dict[str, str]:
        """Start what can start; drain or stop what must make room. Returns the models that
        must make room, each with the model it makes room for."""
        needed: dict[str, str] = {}
        scratch = Ledger()
        for model_id in self.ledger.models():
            scratch.reserve(model_id, self.ledger.of(model_id))
        short = reclaiming = False
        for slot in self._order(now):
            model = self.costs.effective(slot.model, self.policy.memory_margin)
            slot.waiting_for = ""
            if slot.state in (STARTING, DRAINING, STOPPING):
                continue
            retry = slot.history.retry_after(now)
            if retry is not None:
                error = Unavailable(
                    f"model {model.id!r} is held back after repeated crashes (last error: "
                    f"{slot.last_error}); retry in {retry:.0f} s", retry_after=retry)
                for waiter in [w for w in slot.queue if not w.start]:
                    self._dequeue(slot, waiter)
                    decisions.append(Reject(waiter.ticket, model.id, error))
                if slot.queue:
                    wake.append(now + retry)
                continue
            blocker = self._port_holder(slot)
            if blocker is not None:
                slot.waiting_for = (f"{blocker.model.id} to free port {model.port} "
                                    f"({blocker.state})")
                continue
            if not self.devices_known:
                slot.waiting_for = "the first reading of the devices"
                continue
            if not possible(model, self.devices):
                error = Unavailable(explain(model, self.devices, self.ledger)
                                    + " (not even on idle devices)", retry_after=10)
                for waiter in list(slot.queue):
                    self._dequeue(slot, waiter)
                    decisions.append(Reject(waiter.ticket, model.id, error))
                continue
            placement = choose(model, self.devices, scratch)
            if placement is not None:
                self.ledger.reserve(model.id, placement.memory)
                scratch.reserve(model.id, placement.memory)
                slot.placement = placement
                slot.lifecycle.move(STARTING, "requested", now)
                slot.stop_reason = ""
                decisions.append(Start(model.id, placement))
                continue
            if self._reclaiming(now) and self._fits_by_ledger(model, scratch):
                # It fits by the ledger: the devices have not reported a model stopped a
                # moment ago as gone yet. Stopping more models now would be needless.
                reclaiming = True
                slot.waiting_for = "memory being given back: " + explain(
                    model, self.devices, scratch)[:300]
                continue
            residents = self._residents(slot, now)
            eviction = plan_eviction(model, self.devices, scratch, residents, now, busy_too=True)
            if eviction is None:
                if self._fits_by_ledger(model, scratch):
                    # The devices have not reported a stopped model's memory back yet.
                    reclaiming = True
                    slot.waiting_for = "memory being given back: " + explain(
                        model, self.devices, scratch)[:300]
                else:
                    # Held by models still starting or by processes the node does not own.
                    short = True
                    slot.waiting_for = "memory: " + explain(model, self.devices, scratch)[:300]
                continue
            target, victims = eviction
            scratch.reserve(model.id, target.memory)
            self._make_room(slot, [self.slots[v] for v in victims], now, decisions, wake,
                            needed)
        if reclaiming:
            wake.append(now + (self.policy.reclaim_interval if self._reclaiming(now)
                               else self.policy.recheck_interval))
        elif short:
            wake.append(now + self.policy.recheck_interval)
        return needed

    def _reclaiming(self, now: float) -> bool:
        """Whether a model stopped recently enough that a device may still report its memory
        in use (at most C{reclaim_timeout} seconds ago)."""
        return (self._last_stop_at is not None
                and now - self._last_stop_at < self.policy.reclaim_timeout)

    def _fits_by_ledger(self, model: Model, ledger: Ledger) -> bool:
        """Whether C{model} would fit now if the devices reported all that the ledger leaves."""
        settled = {d.id: replace(d, free_mb=d.total_mb) for d in self.devices.values()}
        return choose(model, settled, ledger) is not None

    def _port_holder(self, slot: Slot) -> Optional[Slot]:
        port = slot.model.port
        for other in self.slots.values():
            if other is not slot and other.model.port == port and other.state in LIVE:
                return other
        return None

    def _residents(self, waiting: Slot, now: float) -> list[Resident]:
        residents = []
        for slot in self.slots.values():
            if slot is waiting or slot.state is STARTING:
                continue
            reserved = self.ledger.of(slot.model.id)
            if not reserved:
                continue
            if slot.state in (STOPPING, DRAINING):
                rank = 0
            elif self._can_go(slot, waiting, now) is None:
                rank = 1 if slot.in_flight == 0 else 2
            else:
                rank = 3
            reload_s = slot.load_s if slot.load_s is not None else self.costs.load_s(slot.model)
            residents.append(Resident(model_id=slot.model.id, in_flight=slot.in_flight,
                                      idle_since=slot.last_used if slot.last_used is not None
                                      else now, reserved=reserved, rank=rank,
                                      reload_s=reload_s or 0.0))
        return residents

    def _can_go(self, slot: Slot, waiting: Slot, now: float) -> Optional[float]:
        """None if running C{slot} may be drained or stopped for C{waiting} now, else the
        time it may: when its turn ends, or, if it is idle within its turn, when it has been
        idle C{idle_grace} seconds (its clients may only be between two requests)."""
        ready = now if slot.ready_at is None else slot.ready_at
        ends = ready + self.turn_length(slot, waiting)
        if now >= ends:
            return None
        if slot.in_flight or slot.queue:
            return ends
        if slot.last_used is None:
            return None
        grace_ends = slot.last_used + self.policy.idle_grace
        return None if now >= grace_ends else min(ends, grace_ends)

    def _make_room(self, waiting: Slot, victims: list[Slot], now: float, decisions: list[Decision],
                   wake: list[float], needed: dict[str, str]) -> None:
        """Free the victims' memory for C{waiting}: all together, never cutting a request."""
        in_turn = []
        for victim in victims:
            needed[victim.model.id] = waiting.model.id
            if victim.state is RUNNING:
                until = self._can_go(victim, waiting, now)
                if until is not None:
                    in_turn.append((victim, until))
        if in_turn:
            first, _ = min(in_turn, key=lambda pair: pair[1])
            last = max(until for _, until in in_turn)
            wake.append(last)
            waiting.waiting_for = (f"{first.model.id} finishing its turn "
                                   f"({first.in_flight} requests, until {last:.3f}), then "
                                   f"loading {waiting.model.id}{self._estimate(waiting)}")
            return
        names = []
        for victim in victims:
            if victim.state is RUNNING:
                if victim.in_flight:
                    victim.lifecycle.move(DRAINING, "turn", now)
                    victim.drain = Drain("turn", waiting.model.id)
                else:
                    decisions.append(self._begin_stop(
                        victim, "evict", now, f"making room for {waiting.model.id}"))
            elif victim.state is DRAINING and victim.drain is not None \
                    and victim.drain.for_model is None:
                victim.drain.for_model = waiting.model.id
            if victim.state is DRAINING:
                names.append(f"{victim.model.id} finishing {victim.in_flight} requests")
            else:
                names.append(f"{victim.model.id} stopping")
        waiting.waiting_for = (", ".join(names) + f", then loading {waiting.model.id}"
                               + self._estimate(waiting))

    def _settle_drains(self, now: float, needed: dict[str, str], decisions: list[Decision]) -> None:
        """Drains that finished stop the model; turn drains nobody needs any more end."""
        for slot in list(self.slots.values()):
            if slot.state is not DRAINING:
                continue
            drain = slot.drain
            if (drain is not None and drain.reason == "turn"
                    and slot.model.id not in needed and not slot.retiring
                    and slot.pending_model is None):
                slot.lifecycle.move(RUNNING, "no longer needed", now)
                slot.drain = None
                continue
            if slot.in_flight == 0:
                reason = drain.reason if drain is not None else "turn"
                decisions.append(self._begin_stop(slot, reason, now))
