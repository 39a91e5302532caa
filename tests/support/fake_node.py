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


class FakeTicket:
    """A queued request of a L{FakeRuntime}: C{ready} fires with the address once started."""

    def __init__(self, runtime: "FakeRuntime"):
        self.runtime = runtime
        self.forwarded = False
        self.ready: Deferred = Deferred(lambda d: runtime._drop(self))


class FakeLifecycle:
    """The part of a lifecycle the proxy watches: the state and its next change."""

    def __init__(self, state: str = "stopped"):
        self._state = state
        self._next: list[Deferred] = []

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        waiters, self._next = self._next, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(value)

    def changed(self) -> Deferred:
        waiter: Deferred = Deferred()
        self._next.append(waiter)
        return waiter


class FakeRuntime:
    """A runtime whose start is C{start()}: a Deferred (or value) of the backend's (host, port).

    It has the surface the proxy uses (L{llmnode.node.ModelRuntime}'s C{try_admit},
    C{enqueue}, C{request_finished}, C{request_abandoned}, C{requeue}): requests queue while it starts, and
    concurrent requests share one start.

    @ivar spawns: how many starts were made.
    @ivar started: requests that arrived; C{finished}: requests that ended (either way).
    """

    def __init__(self, model: Model, start: Callable[[], object]):
        self.model = model
        self.lifecycle = FakeLifecycle()
        self.spawns = 0
        self.started = 0
        self.finished = 0
        self.last_used: Optional[float] = None
        self._start = start
        self._address = None
        self._tickets: list[FakeTicket] = []
        self._idle_waiters: list[Deferred] = []

    @property
    def state(self) -> str:
        return self.lifecycle.state

    @state.setter
    def state(self, value: str) -> None:
        self.lifecycle.state = value

    @property
    def in_flight(self) -> int:
        return self.started - self.finished

    @property
    def address(self):
        return self._address

    def try_admit(self) -> bool:
        if self.state != "running":
            return False
        self.started += 1
        return True

    def enqueue(self) -> FakeTicket:
        self.started += 1
        return self._queue()

    def _queue(self) -> FakeTicket:
        ticket = FakeTicket(self)
        if self.state == "running":
            ticket.forwarded = True
            ticket.ready.callback(self._address)
            return ticket
        self._tickets.append(ticket)
        if self.state != "starting":
            self.state = "starting"
            self.spawns += 1
            maybeDeferred(self._start).addBoth(self._start_ended)
        return ticket

    def requeue(self) -> FakeTicket:
        return self._queue()

    def _drop(self, ticket: FakeTicket) -> None:
        if ticket in self._tickets:
            self._tickets.remove(ticket)

    def _start_ended(self, result) -> None:
        tickets, self._tickets = self._tickets, []
        if isinstance(result, Failure):
            self.state = "failed"
            for ticket in tickets:
                ticket.ready.errback(result)
            return
        self._address = tuple(result)
        self.state = "running"
        for ticket in tickets:
            ticket.forwarded = True
            ticket.ready.callback(self._address)

    def request_finished(self, endpoint=None, status=None) -> None:
        self.finished += 1
        if self.finished > self.started:
            raise AssertionError("a request ended more often than it arrived")
        if self.in_flight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def wait_reason(self) -> str:
        return f"loading {self.model.id}"

    def request_abandoned(self, ticket, endpoint=None, status=None) -> None:
        if ticket is not None:
            self._drop(ticket)
        self.request_finished()

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
