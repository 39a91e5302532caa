"""The node's live state, and the thin code that carries out the scheduler's decisions.

L{llmnode.scheduler.Scheduler} decides; L{Node} tells it what happened and does what it says:
it answers waiting requests, starts and stops backends through the L{NodeEffects} the service
provides, and keeps the one timer the scheduler asks for. A L{ModelRuntime} is the face of one
model to the proxy, the management API, the sweeper and the metrics.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, deque
from dataclasses import replace
from typing import Any, Mapping, Optional, Protocol, Sequence, cast

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from llmnode.config import Config, Model, Program
from llmnode.costs import CostBook
from llmnode.devices.interfaces import Device
from llmnode.errors import NodeError
from llmnode.lifecycle import (DRAINING, FAILED, RUNNING, STARTING, STATES, STOPPED, STOPPING,
                               Lifecycle, State, Transition)
from llmnode.observer import OneShotObserver
from llmnode.placement import Placement
from llmnode.scheduler import (Arm, CrashHistory, CrashPolicy, Decision, Forget, Forward, Policy,
                               Queued, Reject, Scheduler, Slot, Start, Stop)

__all__ = ["STOPPED", "STARTING", "RUNNING", "DRAINING", "STOPPING", "FAILED", "STATES",
           "CrashHistory", "CrashPolicy", "Node", "ModelRuntime", "NodeEffects",
           "BackendProcess", "Ticket", "backend_environment", "policy_of"]


class BackendProcess(Protocol):
    """What the node needs of one run of a backend (see L{llmnode.launcher.Backend})."""

    pid: Optional[int]

    async def start(self) -> None:
        """Spawn it and wait until it is healthy; raise if it cannot start."""

    def stop(self) -> defer.Deferred[None]:
        """Stop it (abandoning a start); fire when nothing of it is left."""

    def exited(self) -> defer.Deferred[str]:
        """Fire with a short status text once its main process exited."""


class NodeEffects(Protocol):
    """What the node asks of the world (the service implements it; tests fake it)."""

    def make_backend(self, model: Model, placement: Placement) -> BackendProcess:
        """A new, unstarted backend for C{model} on C{placement}."""

    def refresh_devices(self) -> defer.Deferred[Optional[Mapping[str, Device]]]:
        """Read the devices again; fire with the new C{{id: Device}} snapshot (None when
        there is no device monitor)."""

    def log_path(self, model: Model) -> str:
        """The model's log file."""

    def measure(self, pgid: int, devices: Mapping[str, Device]) -> defer.Deferred[dict[str, float]]:
        """Fire with C{{device id: MB}} used by the process group C{pgid} (see
        L{llmnode.costs.group_usage})."""


def policy_of(program: Program, crash: CrashPolicy = CrashPolicy()) -> Policy:
    """The scheduler's knobs from the C{program} section."""
    return Policy(queue_timeout=program.queue_timeout, turn_factor=program.turn_factor,
                  turn_min=program.turn_min, turn_max=program.turn_max,
                  turn_time=program.turn_time, priority_step=program.priority_step,
                  idle_grace=program.idle_grace, memory_margin=program.memory_margin,
                  crash=crash)


class Ticket:
    """A request (or an operator's start) waiting in its model's queue.

    @ivar ready: fires with the backend's (host, port) when the request may be sent, or fails
        with a L{NodeError}. Cancelling it takes the request off the queue.
    @ivar forwarded: the scheduler counted it in flight; end it with
        L{ModelRuntime.request_finished}.
    """

    __slots__ = ("id", "runtime", "ready", "forwarded", "start")

    def __init__(self, id: int, runtime: "ModelRuntime", start: bool) -> None:
        self.id = id
        self.runtime = runtime
        self.start = start
        self.forwarded = False
        self.ready: defer.Deferred[tuple[str, int]] = defer.Deferred(self._cancelled)

    def _cancelled(self, _: defer.Deferred[tuple[str, int]]) -> None:
        self.runtime.node._leave(self)


class ModelRuntime:
    """One configured model as the rest of the node sees it: its state, backend and counters.

    @ivar last_used: clock seconds when the last request ended (or the backend became ready).
    """

    log = Logger()

    def __init__(self, node: "Node", slot: Slot) -> None:
        self.node = node
        self.slot = slot
        self._id = slot.model.id
        self.backend: Optional[BackendProcess] = None
        self.requests_served = 0
        self.starts = 0
        self.crashes = 0
        self.responses: Counter[tuple[str, Optional[int]]] = Counter()
        self.start_durations: deque[float] = deque(maxlen=10_000)
        self.started_at: Optional[float] = None
        self.last_start_duration: Optional[float] = None
        self.last_error_at: Optional[float] = None
        self._starting = False
        self.address = ("127.0.0.1", slot.model.port)

    # -- what the scheduler knows ------------------------------------------------------------

    @property
    def model(self) -> Model:
        return self.slot.model

    @property
    def lifecycle(self) -> Lifecycle:
        return self.slot.lifecycle

    @property
    def state(self) -> State:
        return self.slot.lifecycle.state

    @property
    def in_flight(self) -> int:
        return self.slot.in_flight

    @property
    def queued(self) -> int:
        return self.slot.requests_queued

    @property
    def last_used(self) -> Optional[float]:
        return self.slot.last_used

    @property
    def last_error(self) -> Optional[str]:
        return self.slot.last_error

    @property
    def placement(self) -> Optional[Placement]:
        return self.slot.placement

    @property
    def evictions(self) -> int:
        return self.slot.stops["evict"] + self.slot.stops["turn"]

    # -- requests ----------------------------------------------------------------------------

    def try_admit(self) -> bool:
        """Admit a request at once if the model is running with room and nobody is queued;
        end it with L{request_finished}."""
        return self.node.scheduler.try_admit(self._id)

    def enqueue(self) -> Ticket:
        """Queue a request that L{try_admit} did not take; see L{Ticket}."""
        return self.node._enqueue(self, start=False)

    def request_finished(self, endpoint: Optional[str] = None,
                         status: Optional[int] = None) -> None:
        """A request that was admitted (or forwarded) ended, however it ended."""
        self.requests_served += 1
        if endpoint is not None:
            self.responses[(endpoint, status)] += 1
        node = self.node
        decisions = node.scheduler.finish(self._id, node.clock.seconds())
        if decisions:
            node._apply(decisions)
        if node._idle is not None and self.slot.in_flight == 0:
            node._check_idle()

    def request_abandoned(self, ticket: Optional[Ticket], endpoint: Optional[str] = None,
                  status: Optional[int] = None) -> None:
        """A request that was never forwarded ended (rejected, or its client left)."""
        if endpoint is not None:
            self.responses[(endpoint, status)] += 1
        if ticket is not None:
            self.node._leave(ticket)

    def requeue(self) -> Ticket:
        """An admitted request found the backend gone before anything was sent: it leaves the
        in-flight count and waits in the queue again (for the restarted backend)."""
        node = self.node
        node._apply(node.scheduler.finish(self._id, node.clock.seconds()))
        return self.enqueue()

    # -- operators -----------------------------------------------------------------------------

    def start(self) -> defer.Deferred[tuple[str, int]]:
        """Start the model (through its queue, like a request); fire with its (host, port).

        An operator's start lifts a crash hold-back.
        """
        if self.state is RUNNING:
            return defer.succeed(self.address)
        if self.slot.history.held_until is not None:
            self.log.info("{model}: the crash hold-back is lifted by an operator's start",
                          model=self._id)
        return self.node._enqueue(self, start=True).ready

    def stop(self, reason: str = "admin") -> defer.Deferred[Transition | None]:
        """Stop the model: requests in flight finish first (C{admin}, C{reload}); C{idle} only
        stops a model with nothing in flight. Fires once it is stopped (or failed)."""
        node = self.node
        done = self.lifecycle.when(STOPPED, FAILED)
        node._apply(node.scheduler.stop(self._id, reason, node.clock.seconds()))
        return done.addCallback(lambda _: None)

    # -- carrying out decisions --------------------------------------------------------------

    async def _start(self, placement: Placement) -> None:
        node, clock = self.node, self.node.clock
        self.starts += 1
        self._starting = True
        began = clock.seconds()
        backend = None
        try:
            backend = self.backend = node.effects.make_backend(self.model, placement)
            await backend.start()
        except Exception as e:
            self._starting = False
            self.backend = None
            if self.state is STOPPING:
                node._apply(node.scheduler.stopped(self._id, clock.seconds()))
                return
            message = getattr(e, "message", None) or str(e) or type(e).__name__
            self.log.warn("{model} failed to start: {error}", model=self._id,
                          error=message[:2000])
            self.last_error_at = clock.seconds()
            if not message.startswith(f"model {self._id!r}"):
                message = f"model {self._id!r} failed to start: {message}"
            node._apply(node.scheduler.start_failed(
                self._id, clock.seconds(), message, counts=not isinstance(e, NodeError)))
            return
        self._starting = False
        if self.state is STOPPING:
            self.backend = None
            await backend.stop()
            node._apply(node.scheduler.stopped(self._id, clock.seconds()))
            return
        now = clock.seconds()
        self.started_at = now
        self.last_start_duration = now - began
        self.start_durations.append(self.last_start_duration)
        self.log.info("{model} ready on port {port} in {duration:.2f} s (pid {pid})",
                      model=self._id, port=self.model.port,
                      duration=self.last_start_duration, pid=backend.pid)
        backend.exited().addCallback(self._exited, backend)
        node._apply(node.scheduler.started(self._id, now, self.last_start_duration))

    def _stop(self, reason: str) -> None:
        if self._starting:
            if self.backend is not None:
                self.backend.stop()  # the start fails and reports the stop
            return
        backend, self.backend = self.backend, None
        node = self.node
        if backend is None:
            node._apply(node.scheduler.stopped(self._id, node.clock.seconds()))
            return
        self.log.info("stopping {model} (pid {pid}): {reason}", model=self._id,
                      pid=backend.pid, reason=self.lifecycle.reason or reason)

        def gone(_: object) -> None:
            node._apply(node.scheduler.stopped(self._id, node.clock.seconds()))
            node._refresh_soon()  # the memory may be back: the scheduler may place a waiter

        d = defer.maybeDeferred(backend.stop)
        d.addErrback(lambda f: self.log.failure("stopping {model}", f, model=self._id))
        d.addCallback(gone)

    def _exited(self, status: str, backend: BackendProcess) -> None:
        """The backend's main process is gone; unless we stopped it, that is a crash."""
        if backend is not self.backend or self.state not in (RUNNING, DRAINING):
            return
        self.crashes += 1
        self.last_error_at = self.node.clock.seconds()
        self.log.error("{model} crashed: {status}", model=self._id, status=status)
        node = self.node
        node._apply(node.scheduler.crashed(self._id, node.clock.seconds(), status))

    # -- reporting -----------------------------------------------------------------------------

    def wait_reason(self) -> str:
        """What a queued request of this model waits for, in words."""
        return self.node.scheduler.wait_reason(self._id, self.node.clock.seconds())

    def idle_seconds(self) -> Optional[float]:
        slot = self.slot
        if slot.in_flight or self.state is not RUNNING or slot.last_used is None:
            return None
        return self.node.clock.seconds() - slot.last_used

    def info(self) -> dict[str, Any]:
        """What C{GET /api/models/{alias}/info} shows."""
        placement = self.placement
        backend = self.backend
        now = self.node.clock.seconds()
        info = {
            "id": self.model.id,
            "aliases": list(self.model.aliases),
            "mode": self.model.mode,
            "state": self.state.value,
            "port": self.model.port,
            "pid": getattr(backend, "server_pid", None),
            "supervisor_pid": getattr(backend, "pid", None),
            "plan": placement.plan.name if placement is not None else None,
            "devices": dict(placement.devices) if placement is not None else {},
            "memory_mb": dict(placement.memory) if placement is not None else {},
            "started_at": self.started_at if self.state in (RUNNING, DRAINING) else None,
            "last_used": self.last_used,
            "idle_seconds": self.idle_seconds(),
            "in_flight": self.in_flight,
            "requests_served": self.requests_served,
            "starts": self.starts,
            "crashes": self.crashes,
            "stops": dict(self.slot.stops),
            "last_start_duration": self.last_start_duration,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "held_back_for": self.slot.history.retry_after(now),
            "log_file": self.node.effects.log_path(self.model),
        }
        info.update(self.node.scheduler.describe(self._id, now))
        return info


def backend_environment(model: Model, placement: Placement,
                        base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The complete environment a backend starts with: inherited, plus llmnode's own."""
    env = dict(os.environ if base is None else base)
    env["LLMNODE_MODEL"] = model.id
    env["LLMNODE_PORT"] = str(model.port)
    env.setdefault("LLMNODE_PYTHON", sys.executable)
    gpus = [device for device in placement.devices.values() if device.startswith("gpu")]
    env["LLMNODE_DEVICES"] = ",".join(placement.devices.values())
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(device[3:] for device in gpus)
    env.update(placement.plan.env)
    return env


class Node:
    """All runtimes of one configuration, the scheduler, and the code that carries out its
    decisions.

    @param effects: starts backends and reads devices (see L{NodeEffects}).
    """

    log = Logger()

    def __init__(self, config: Config, clock: IReactorTime, effects: NodeEffects, *,
                 crash_policy: CrashPolicy = CrashPolicy(), policy: Optional[Policy] = None,
                 costs: Optional[CostBook] = None) -> None:
        self.config = config
        self.clock = clock
        self.effects = effects
        self.costs = costs if costs is not None else CostBook()
        self.scheduler = Scheduler(config.models, policy or policy_of(config.program,
                                                                      crash_policy),
                                   clock.seconds(), self.costs)
        self._measuring = False
        self._warned: dict[tuple[str, str, str], float] = {}
        self._runtimes = {model.id: ModelRuntime(self, self.scheduler.slots[model.id])
                          for model in config.models}
        self._retired: dict[str, ModelRuntime] = {}
        self._tickets: dict[int, Ticket] = {}
        self._pending: deque[Decision] = deque()
        self._applying = False
        self._timer: Optional[IDelayedCall] = None
        self._idle: Optional[OneShotObserver[None]] = None
        self._index()

    def _index(self) -> None:
        self._names = {name: runtime for runtime in self._runtimes.values()
                       for name in (runtime.slot.pending_model or runtime.model).names}

    def lookup(self, name: str) -> Optional[ModelRuntime]:
        """The runtime of the model whose id or alias is C{name}."""
        return self._names.get(name)

    def runtimes(self) -> list[ModelRuntime]:
        """Every runtime, in config order."""
        return list(self._runtimes.values())

    def _runtime(self, model_id: str) -> Optional[ModelRuntime]:
        return self._runtimes.get(model_id) or self._retired.get(model_id)

    # -- events in -------------------------------------------------------------------------------

    def devices_changed(self, devices: Mapping[str, Device]) -> None:
        """A new device snapshot (the service calls this after every refresh): decisions that
        waited for memory, and a new measurement of what each running model uses."""
        self._apply(self.scheduler.devices_changed(devices, self.clock.seconds()))
        self._measure(devices)

    # -- learned costs ---------------------------------------------------------------------------

    def _measure(self, devices: Mapping[str, Device]) -> None:
        """Measure every running backend's process group (one measurement at a time)."""
        if self._measuring:
            return
        running = [(runtime, runtime.backend, runtime.placement) for runtime in self._all()
                   if runtime.state in (RUNNING, DRAINING) and runtime.backend is not None
                   and runtime.backend.pid and runtime.placement is not None]
        if not running:
            return
        self._measuring = True
        measured = defer.gatherResults(
            [self.effects.measure(cast(int, backend.pid), devices) for _, backend, _ in running],
            consumeErrors=True)

        def record(usages: list[dict[str, float]]) -> None:
            for (runtime, _, placement), usage in zip(running, usages):
                self._record_usage(runtime, placement, usage)
            self._save_costs()

        measured.addCallback(record)
        measured.addErrback(lambda f: self.log.failure("measuring the models' memory", f))
        measured.addBoth(lambda _: setattr(self, "_measuring", False))

    def _record_usage(self, runtime: "ModelRuntime", placement: Placement,
                      usage: Mapping[str, float]) -> None:
        model = runtime.model
        declared_plan = next((p for p in model.plans if p.name == placement.plan.name), None)
        for requirement, device_id in placement.devices.items():
            if device_id not in usage:
                continue
            peak = self.costs.record_usage(model.id, placement.plan, requirement,
                                           usage[device_id])
            if peak is None or declared_plan is None:
                continue
            declared = declared_plan.memory_mb.get(requirement)
            key = (model.id, placement.plan.name, requirement)
            if declared is not None and peak > declared and peak > self._warned.get(key, 0.0):
                self._warned[key] = peak * 1.1
                self.log.warn(
                    "{model} (plan {plan}) uses {peak:.0f} MB on {device}, more than its "
                    "memory_mb {declared:.0f}: it is placed by {peak:.0f} MB from now on",
                    model=model.id, plan=placement.plan.name, peak=peak, device=device_id,
                    declared=declared)

    def _save_costs(self) -> None:
        try:
            self.costs.save()
        except OSError as e:
            self.log.warn("cannot save the learned costs to {path}: {error}",
                          path=self.costs.path, error=e.strerror or e)

    def _enqueue(self, runtime: ModelRuntime, start: bool) -> Ticket:
        decisions = self.scheduler.arrive(runtime.model.id, self.clock.seconds(), start=start)
        queued = decisions[0]
        assert isinstance(queued, Queued)
        ticket = Ticket(queued.ticket, runtime, start)
        self._tickets[ticket.id] = ticket
        if not self.scheduler.devices_known:
            self._refresh_soon()
        self._apply(decisions[1:])
        return ticket

    def _leave(self, ticket: Ticket) -> None:
        if self._tickets.pop(ticket.id, None) is not None:
            self._apply(self.scheduler.leave(ticket.id, self.clock.seconds()))

    def _refresh_soon(self) -> None:
        if self.scheduler.closed:
            return
        def read(devices: Optional[Mapping[str, Device]]) -> None:
            if devices is not None:  # None: a service not started has no device monitor
                self.devices_changed(devices)

        self.effects.refresh_devices().addCallback(read).addErrback(
            lambda f: self.log.failure("reading the devices", f))

    # -- decisions out -----------------------------------------------------------------------------

    def _apply(self, decisions: Sequence[Decision]) -> None:
        """Carry out C{decisions} in order. Decisions made while carrying them out (a waiter's
        callback may end a request) are queued behind them, never interleaved."""
        if not decisions:
            return
        self._pending.extend(decisions)
        if self._applying:
            return
        self._applying = True
        try:
            while self._pending:
                decision = self._pending.popleft()
                try:
                    self._carry_out(decision)
                except Exception:
                    self.log.failure("carrying out {decision}", decision=decision)
        finally:
            self._applying = False

    def _carry_out(self, decision: Any) -> None:  # a Decision, told apart by its type
        kind = type(decision)
        if kind is Forward:
            ticket = self._tickets.pop(decision.ticket, None)
            if ticket is None:
                return  # a reload's own restart
            runtime = ticket.runtime
            if ticket.ready.called:  # cancelled while the decision was on its way
                if not ticket.start:
                    self._apply(self.scheduler.finish(decision.model_id, self.clock.seconds()))
                return
            ticket.forwarded = not ticket.start
            ticket.ready.callback(runtime.address)
        elif kind is Reject:
            ticket = self._tickets.pop(decision.ticket, None)
            if ticket is None:
                self.log.warn("{model}: {error}", model=decision.model_id,
                              error=decision.error.message)
            elif not ticket.ready.called:
                ticket.ready.errback(decision.error)
        elif kind is Start:
            target = self._runtime(decision.model_id)
            assert target is not None
            d = defer.Deferred.fromCoroutine(target._start(decision.placement))
            d.addErrback(lambda f: self.log.failure("starting {model}", f,
                                                    model=decision.model_id))
        elif kind is Stop:
            target = self._runtime(decision.model_id)
            assert target is not None
            target._stop(decision.reason)
        elif kind is Forget:
            self._retired.pop(decision.model_id, None)
        elif kind is Arm:
            self._arm(decision.at)

    def _arm(self, at: Optional[float]) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if at is not None and not self.scheduler.closed:
            self._timer = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        d = self.effects.refresh_devices()
        d.addErrback(lambda f: self.log.failure("reading the devices", f))

        def then(devices: Optional[Mapping[str, Device]]) -> None:
            if devices is not None:
                self._apply(self.scheduler.devices_changed(devices, self.clock.seconds()))
            self._apply(self.scheduler.tick(self.clock.seconds()))

        d.addCallback(then)

    # -- the whole node ------------------------------------------------------------------------

    def idle(self) -> defer.Deferred[None]:
        """Fire once no request is in flight on any model."""
        if self._idle is None:
            self._idle = OneShotObserver()
        waiter = self._idle.when_fired()
        self._check_idle()
        return waiter

    def _check_idle(self) -> None:
        if self._idle is not None and not any(
                runtime.in_flight for runtime in self._all()):
            observer, self._idle = self._idle, None
            observer.fire(None)

    def _all(self) -> list[ModelRuntime]:
        return list(self._runtimes.values()) + list(self._retired.values())

    def stop_all(self) -> defer.Deferred[Any]:
        """An operator's stop of every model (each drains first); fire when all are stopped."""
        return defer.DeferredList([runtime.stop("admin") for runtime in self._all()],
                                  consumeErrors=True)

    def shutdown(self) -> defer.Deferred[Any]:
        """The node is stopping: reject every waiter and stop every backend now (requests
        still in flight are cut); fire when all are gone."""
        self._apply(self.scheduler.shutdown(self.clock.seconds()))
        self._save_costs()
        waits = [runtime.lifecycle.when(STOPPED, FAILED) for runtime in self._all()]
        return defer.DeferredList(waits, consumeErrors=True)

    def reload(self, config: Config) -> dict[str, list[str]]:
        """Switch to C{config} (see L{Scheduler.reload}); C{program} changes are reported,
        not applied.

        @return: model ids by outcome, and what of the C{program} section needs a restart.
        """
        outcome, decisions = self.scheduler.reload(config.models, self.clock.seconds())
        outcome["restart_required"] = _program_changes(self.config.program, config.program)
        self.config = replace(config, program=self.config.program)
        runtimes = {}
        for model in config.models:
            runtime = self._runtimes.get(model.id) or self._retired.pop(model.id, None)
            slot = self.scheduler.slots[model.id]
            if runtime is None or runtime.slot is not slot:
                runtime = ModelRuntime(self, slot)
            runtimes[model.id] = runtime
        for model_id in outcome["removed"]:
            if model_id in self.scheduler.slots:
                self._retired[model_id] = self._runtimes[model_id]
        self._runtimes = runtimes
        self._index()
        self._apply(decisions)
        return outcome


def _program_changes(old: Program, new: Program) -> list[str]:
    """The C{program} keys whose new values only take effect when the node restarts."""
    return [f"program.{name}" for name in old.__dataclass_fields__
            if getattr(old, name) != getattr(new, name)]

