"""The node's live state: one L{ModelRuntime} per configured model, and the L{Node} that owns them.

A runtime is the only way a backend gets started or stopped: the proxy, the management API, the
sweeper and placement all go through L{ModelRuntime.ensure_running} and L{ModelRuntime.stop}, so
concurrent callers share one start and one stop.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmnode.config import Config, Model
from llmnode.errors import Overloaded, Unavailable

STOPPED = "stopped"
STARTING = "starting"
RUNNING = "running"
STOPPING = "stopping"
FAILED = "failed"
STATES = (STOPPED, STARTING, RUNNING, STOPPING, FAILED)


@dataclass(frozen=True)
class CrashPolicy:
    """After C{limit} crashes within C{window} seconds, hold the model back for C{hold} seconds."""

    limit: int = 3
    window: float = 60.0
    hold: float = 30.0


class CrashHistory:
    """Remembers recent crashes and failed starts of one model and decides the hold-back."""

    def __init__(self, clock, policy: CrashPolicy = CrashPolicy()):
        self._clock = clock
        self._policy = policy
        self._times: list[float] = []
        self.held_until: Optional[float] = None

    def record(self) -> None:
        """Count one crash now; start a hold-back if the limit is reached."""
        now = self._clock.seconds()
        self._times = [t for t in self._times if now - t < self._policy.window] + [now]
        if len(self._times) >= self._policy.limit:
            self.held_until = now + self._policy.hold
            self._times = []

    def retry_after(self) -> Optional[float]:
        """Seconds until starts are allowed again, or None when they are allowed now."""
        if self.held_until is None:
            return None
        left = self.held_until - self._clock.seconds()
        if left <= 0:
            self.held_until = None
            return None
        return left

    def reset(self) -> None:
        self._times = []
        self.held_until = None


class ModelRuntime:
    """The live state of one configured model: its backend, state, counters and in-flight requests.

    @ivar last_used: clock seconds when the last request ended (or the backend became ready).
    """

    log = Logger()

    def __init__(self, node: "Node", model: Model):
        self.node = node
        self.model = model
        self._clock = node.clock
        self.state = STOPPED
        self.backend = None
        self.placement = None
        self.in_flight = 0
        self.requests_served = 0
        self.starts = 0
        self.crashes = 0
        self.last_used: Optional[float] = None
        self.started_at: Optional[float] = None
        self.last_start_duration: Optional[float] = None
        self.last_error: Optional[str] = None
        self.last_error_at: Optional[float] = None
        self.evictions = 0
        self.responses: Counter = Counter()
        self.start_durations: deque[float] = deque(maxlen=10_000)
        self.history = CrashHistory(self._clock, node.crash_policy)
        self._start: Optional[_Shared] = None
        self._stop: Optional[_Shared] = None
        self._active = 0
        self._queue: deque[defer.Deferred] = deque()
        self._next_model: Optional[Model] = None
        self._applying = False
        self.retiring = False
        self._stop_requested = False

    # -- requests ------------------------------------------------------------------------

    def request_started(self) -> None:
        """A request for this model arrived; it counts as in flight until L{request_finished}."""
        self.in_flight += 1

    def request_finished(self, endpoint: Optional[str] = None,
                         status: Optional[int] = None) -> None:
        """A request ended (answered, failed or abandoned): the idle clock starts now.

        @param endpoint: which endpoint it was for, and C{status} its HTTP status (499 when
            the client left first), for the request counters.
        """
        self.in_flight = max(0, self.in_flight - 1)
        self.requests_served += 1
        if endpoint is not None:
            self.responses[(endpoint, status)] += 1
        self.last_used = self._clock.seconds()
        if self.in_flight == 0:
            # Only an idle model can make room (placement evicts none with requests in
            # flight): waiting placements may look again.
            self.node.changed()
            self._apply_when_idle()

    # -- reload ----------------------------------------------------------------------------

    def reconfigure(self, model: Model) -> None:
        """Take C{model} (a changed config of this id) once no request is in flight: the
        backend is stopped and, if it was running, started again with the new settings."""
        self._next_model = model
        self._apply_when_idle()

    def retire(self) -> None:
        """The model left the config: stop it once no request is in flight, then forget it."""
        self.retiring = True
        self._apply_when_idle()

    def _apply_when_idle(self) -> None:
        if (self._next_model is None and not self.retiring) or self._applying:
            return
        if self.in_flight or self._start is not None:
            return
        self._applying = True
        was_running = self.state == RUNNING
        d = self.stop()

        def applied(_):
            self._applying = False
            if self.retiring:
                self.node.forget(self)
                return
            if self._next_model is not None:
                self.model, self._next_model = self._next_model, None
                self.history.reset()
                if was_running or self.model.auto_start:
                    self.ensure_running().addErrback(
                        lambda f: self.log.warn("{model} did not restart after a reload: "
                                                "{error}", model=self.model.id,
                                                error=f.getErrorMessage()))

        d.addCallback(applied)
        d.addErrback(lambda f: self.log.failure("applying a reload to {model}", f,
                                                model=self.model.id))

    def admit(self) -> defer.Deferred:
        """Fire when the request may be forwarded under C{max_concurrency}; fail with
        L{Overloaded} when C{max_queue} requests already wait. Pair with L{leave}."""
        if self.try_admit():
            return defer.succeed(None)
        limit = self.model.max_concurrency
        if len(self._queue) >= self.model.max_queue:
            return defer.fail(Overloaded(
                f"model {self.model.id!r} is at its limit of {limit} concurrent requests and "
                f"{self.model.max_queue} waiting", retry_after=1))
        waiter = defer.Deferred(lambda d: self._queue.remove(d))
        self._queue.append(waiter)
        return waiter

    def try_admit(self) -> bool:
        """Take a concurrency slot if one is free now (no waiting); pair with L{leave}."""
        limit = self.model.max_concurrency
        if limit is None or self._active < limit:
            self._active += 1
            return True
        return False

    def leave(self) -> None:
        """A request admitted by L{admit} ended: hand its slot to the next waiter."""
        if self._queue:
            self._queue.popleft().callback(None)
        else:
            self._active = max(0, self._active - 1)

    @property
    def queued(self) -> int:
        """Requests waiting for a concurrency slot."""
        return len(self._queue)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.model.port)

    # -- start ---------------------------------------------------------------------------

    def ensure_running(self) -> defer.Deferred:
        """Fire with the backend's (host, port) once it is ready, starting it if needed.

        Every concurrent caller waits on the same start; each gets its own Deferred, so a caller
        that cancels its wait leaves the start alone. Fails with L{Unavailable}.
        """
        if self.state == RUNNING:
            return defer.succeed(self.address)
        if self._start is None:
            retry = self.history.retry_after()
            if retry is not None:
                return defer.fail(Unavailable(
                    f"model {self.model.id!r} is held back after repeated crashes "
                    f"(last error: {self.last_error}); retry in {retry:.0f} s",
                    retry_after=retry))
            return self._begin("_start", self._run_start()).wait()
        return self._start.wait()

    def _begin(self, slot: str, coroutine) -> "_Shared":
        """Run C{coroutine} as the operation held in C{slot} until it finishes."""
        operation = defer.Deferred.fromCoroutine(coroutine)
        shared = _Shared(operation)
        if not shared.done:
            setattr(self, slot, shared)
            operation.addBoth(lambda _: setattr(self, slot, None))
        return shared

    async def _run_start(self):
        if self._stop is not None:
            await self._stop.wait()
        self._stop_requested = False
        self.state = STARTING
        began = self._clock.seconds()
        self.starts += 1
        try:
            self.placement = await self.node.place(self)
            if self._stop_requested:
                raise Unavailable(f"model {self.model.id!r} was stopped while starting")
            self.backend = self.node.make_backend(self, self.placement)
            await self.backend.start()
            if self._stop_requested:
                raise Unavailable(f"model {self.model.id!r} was stopped while starting")
        except Exception as e:
            await self._start_failed(e)
            raise self._as_unavailable(e)
        self.state = RUNNING
        self.started_at = self.last_used = self._clock.seconds()
        self.last_start_duration = self.started_at - began
        self.start_durations.append(self.last_start_duration)
        self.log.info("{model} ready on port {port} in {duration:.2f} s (pid {pid})",
                      model=self.model.id, port=self.model.port,
                      duration=self.last_start_duration, pid=self.backend.pid)
        self.backend.exited().addCallback(self._backend_exited, self.backend)
        self._clock.callLater(0, self._apply_when_idle)
        return self.address

    async def _start_failed(self, error: Exception) -> None:
        message = getattr(error, "message", None) or str(error) or type(error).__name__
        self.log.warn("{model} failed to start: {error}", model=self.model.id,
                      error=message[:2000])
        backend, self.backend = self.backend, None
        if backend is not None:
            try:
                await backend.stop()
            except Exception:
                self.log.failure("stopping {model} after a failed start", model=self.model.id)
        self._release()
        if self._stop_requested:
            self.state = STOPPED
        else:
            self.state = FAILED
            self.last_error = message
            self.last_error_at = self._clock.seconds()
            if not isinstance(error, Unavailable):
                self.history.record()
        self.node.changed()

    def _as_unavailable(self, error: Exception) -> Exception:
        if isinstance(error, Unavailable):
            return error
        message = getattr(error, "message", None) or str(error)
        return Unavailable(f"model {self.model.id!r} failed to start: {message}",
                           retry_after=self.history.retry_after() or 1)

    def _backend_exited(self, status: str, backend) -> None:
        """The backend's main process is gone; unless we stopped it, that is a crash."""
        if backend is not self.backend or self.state != RUNNING:
            return
        self.crashes += 1
        self.history.record()
        self.backend = None
        self.state = FAILED
        self.last_error = f"backend crashed ({status})"
        self.last_error_at = self._clock.seconds()
        self.log.error("{model} crashed: {status}", model=self.model.id, status=status)
        # The rest of the process group is swept before the memory counts as free again, and a
        # new start waits for that.
        self._begin("_stop", self._clean_after_crash(backend))

    async def _clean_after_crash(self, backend) -> None:
        try:
            await backend.stop()
        except Exception:
            self.log.failure("cleaning up {model} after a crash", model=self.model.id)
        self._release()
        self.node.changed()

    # -- stop ----------------------------------------------------------------------------

    def stop(self) -> defer.Deferred:
        """Stop the backend (a start in progress is abandoned); fire when nothing of it is left."""
        if self._stop is None:
            return self._begin("_stop", self._run_stop()).wait()
        return self._stop.wait()

    async def _run_stop(self) -> None:
        self._stop_requested = True
        if self.state == STARTING and self._start is not None:
            backend = self.backend
            if backend is not None:
                await backend.stop()
            try:
                await self._start.wait()
            except Exception:
                pass
            return
        backend, self.backend = self.backend, None
        if backend is None:
            if self.state in (RUNNING, STOPPING):
                self.state = STOPPED
            return
        self.state = STOPPING
        self.log.info("stopping {model} (pid {pid})", model=self.model.id, pid=backend.pid)
        try:
            await backend.stop()
        finally:
            self._release()
            self.state = STOPPED
            self.node.changed()

    def _release(self) -> None:
        self.node.release(self)
        self.placement = None

    # -- reporting -----------------------------------------------------------------------

    def idle_seconds(self) -> Optional[float]:
        if self.in_flight or self.state != RUNNING or self.last_used is None:
            return None
        return self._clock.seconds() - self.last_used

    def info(self) -> dict:
        """What C{GET /api/models/{alias}/info} shows."""
        placement = self.placement
        backend = self.backend
        return {
            "id": self.model.id,
            "aliases": list(self.model.aliases),
            "mode": self.model.mode,
            "state": self.state,
            "port": self.model.port,
            "pid": getattr(backend, "server_pid", None),
            "supervisor_pid": getattr(backend, "pid", None),
            "plan": placement.plan.name if placement is not None else None,
            "devices": dict(placement.devices) if placement is not None else {},
            "memory_mb": dict(placement.memory) if placement is not None else {},
            "started_at": self.started_at if self.state == RUNNING else None,
            "last_used": self.last_used,
            "idle_seconds": self.idle_seconds(),
            "in_flight": self.in_flight,
            "queued": self.queued,
            "requests_served": self.requests_served,
            "starts": self.starts,
            "crashes": self.crashes,
            "last_start_duration": self.last_start_duration,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "held_back_for": self.history.retry_after(),
            "log_file": self.node.log_path(self.model),
        }


class _Shared:
    """One operation that many callers wait on; each waiter gets its own Deferred."""

    def __init__(self, operation: defer.Deferred):
        self.done = False
        self._result = None
        self._waiters: list[defer.Deferred] = []
        operation.addBoth(self._finish)

    def _finish(self, result) -> None:
        self.done, self._result = True, result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._relay(waiter)

    def _relay(self, waiter: defer.Deferred) -> None:
        if waiter.called:
            return
        if isinstance(self._result, Failure):
            waiter.errback(self._result)
        else:
            waiter.callback(self._result)

    def wait(self) -> defer.Deferred:
        """A new Deferred with the operation's outcome; cancelling it leaves the operation alone."""
        waiter = defer.Deferred()
        if self.done:
            self._relay(waiter)
        else:
            self._waiters.append(waiter)
        return waiter


def backend_environment(model: Model, placement, base: Optional[dict] = None) -> dict[str, str]:
    """The complete environment a backend starts with (DESIGN.md: inherited + llmnode's own)."""
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
    """All runtimes of one configuration, and the collaborators they share.

    @param place: C{async place(runtime) -> Placement}, reserving memory for the runtime.
    @param release: C{release(runtime)}, freeing what L{place} reserved.
    @param make_backend: C{make_backend(runtime, placement) -> Backend}.
    """

    def __init__(self, config: Config, clock, *, place, release, make_backend,
                 log_path: Callable[[Model], str], changed: Callable[[], None] = lambda: None,
                 crash_policy: CrashPolicy = CrashPolicy()):
        self.config = config
        self.clock = clock
        self.crash_policy = crash_policy
        self.place = place
        self.release = release
        self.make_backend = make_backend
        self.log_path = log_path
        self.changed = changed
        self._runtimes = {model.id: ModelRuntime(self, model) for model in config.models}
        self._retired: list[ModelRuntime] = []
        self._index()

    def _index(self) -> None:
        self._names = {name: runtime for runtime in self._runtimes.values()
                       for name in (runtime._next_model or runtime.model).names}

    def lookup(self, name: str) -> Optional[ModelRuntime]:
        """The runtime of the model whose id or alias is C{name}."""
        return self._names.get(name)

    def runtimes(self) -> list[ModelRuntime]:
        """Every runtime, in config order."""
        return list(self._runtimes.values())

    def stop_all(self) -> defer.Deferred:
        """Stop every backend (retired models' included), concurrently; fire when all are gone."""
        runtimes = self.runtimes() + self._retired
        return defer.DeferredList([runtime.stop() for runtime in runtimes], consumeErrors=True)

    def reload(self, config: Config) -> dict:
        """Switch to C{config}: unchanged models keep running untouched, changed ones restart
        once idle, removed ones stop once idle, new ones are added (and auto-started).

        @return: model ids by outcome, and what of the C{program} section needs a restart.
        """
        old = self._runtimes
        outcome = {"unchanged": [], "changed": [], "added": [], "removed": [],
                   "restart_required": _program_changes(self.config.program, config.program)}
        runtimes = {}
        for model in config.models:
            runtime = old.get(model.id)
            if runtime is None:
                runtime = ModelRuntime(self, model)
                outcome["added"].append(model.id)
            elif runtime.model == model and runtime._next_model is None:
                outcome["unchanged"].append(model.id)
            else:
                outcome["changed"].append(model.id)
            runtimes[model.id] = runtime
        for model_id, runtime in old.items():
            if model_id not in runtimes:
                outcome["removed"].append(model_id)
                self._retired.append(runtime)
        self.config = replace(config, program=self.config.program)
        self._runtimes = runtimes
        for model_id in outcome["changed"]:
            runtimes[model_id].reconfigure(config.resolve(model_id))
        self._index()
        for runtime in list(self._retired):
            runtime.retire()
        for model_id in outcome["added"]:
            if runtimes[model_id].model.auto_start:
                runtimes[model_id].ensure_running().addErrback(lambda f: None)
        return outcome

    def forget(self, runtime: ModelRuntime) -> None:
        """A retired runtime has stopped: drop it."""
        if runtime in self._retired:
            self._retired.remove(runtime)


def _program_changes(old, new) -> list[str]:
    """The C{program} keys whose new values only take effect when the node restarts."""
    return [f"program.{name}" for name in old.__dataclass_fields__
            if getattr(old, name) != getattr(new, name)]
