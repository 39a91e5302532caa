"""A fake node with the surface the web layer uses (lookup, runtimes, runtime accounting)."""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.python.failure import Failure

from llmnode.config import Model, Plan


def model(id: str, mode: str = "Chat", aliases: tuple = (), port: int = 0,
          upstream_model: Optional[str] = None) -> Model:
    """A L{Model} with one dummy plan."""
    plan = Plan(name="Standard-Config", required_devices=("cpu",), script_path="true")
    return Model(id=id, mode=mode, port=port, plans=(plan,), aliases=tuple(aliases),
                 upstream_model=upstream_model)


class FakeRuntime:
    """A runtime whose start is C{start()}: a Deferred (or value) of the backend's (host, port).

    Concurrent callers of L{ensure_running} share one start and each get their own Deferred.

    @ivar spawns: how many starts were made.
    @ivar started: request_started calls; C{finished}: request_finished calls.
    """

    def __init__(self, model: Model, start: Callable[[], object]):
        self.model = model
        self.state = "stopped"
        self.spawns = 0
        self.started = 0
        self.finished = 0
        self.admitted = 0
        self.left = 0
        self.last_used: Optional[float] = None
        self._start = start
        self._address = None
        self._waiters: Optional[list[Deferred]] = None
        self._idle_waiters: list[Deferred] = []

    @property
    def in_flight(self) -> int:
        return self.started - self.finished

    def ensure_running(self) -> Deferred:
        if self.state == "running":
            return succeed(self._address)
        waiter: Deferred = Deferred()
        if self._waiters is None:
            self._waiters = [waiter]
            self.state = "starting"
            self.spawns += 1
            maybeDeferred(self._start).addBoth(self._start_ended)
        else:
            self._waiters.append(waiter)
        return waiter

    def _start_ended(self, result) -> None:
        waiters, self._waiters = self._waiters or [], None
        if isinstance(result, Failure):
            self.state = "failed"
            for waiter in waiters:
                waiter.errback(result)
            return
        self.state = "running"
        self._address = tuple(result)
        for waiter in waiters:
            waiter.callback(self._address)

    def request_started(self) -> None:
        self.started += 1

    def admit(self) -> Deferred:
        """No concurrency limit here: every request is admitted at once."""
        self.admitted += 1
        return succeed(None)

    def try_admit(self) -> bool:
        self.admitted += 1
        return True

    @property
    def address(self):
        return self._address

    def leave(self) -> None:
        self.left += 1

    def request_finished(self, endpoint=None, status=None) -> None:
        self.finished += 1
        if self.finished > self.started:
            raise AssertionError("request_finished called more often than request_started")
        if self.in_flight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self) -> Deferred:
        """Fire once no request is in flight."""
        if self.in_flight == 0:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._idle_waiters.append(waiter)
        return waiter


class FakeNode:
    """Looks runtimes up by id or alias, in the given order."""

    def __init__(self, runtimes: list[FakeRuntime]):
        self._runtimes = list(runtimes)

    def lookup(self, name: str) -> Optional[FakeRuntime]:
        for runtime in self._runtimes:
            if name in runtime.model.names:
                return runtime
        return None

    def runtimes(self) -> list[FakeRuntime]:
        return list(self._runtimes)
