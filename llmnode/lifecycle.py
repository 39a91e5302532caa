"""A model's lifecycle: named states and the transitions allowed between them.

Transition table (every move emits a L{Transition} to the subscribers)::

    STOPPED  -> STARTING                  a start was decided (memory reserved)
    STARTING -> RUNNING                   the backend answered its health path
    STARTING -> FAILED                    the start failed (nothing of it is left)
    STARTING -> STOPPING                  stopped while starting: the start is abandoned
    RUNNING  -> DRAINING                  turn over, admin stop or reload: admits nothing new
    RUNNING  -> STOPPING                  idle (nothing in flight), or the backend crashed
    DRAINING -> RUNNING                   nobody waits for the drain any more
    DRAINING -> STOPPING                  the last request in flight ended, or a crash
    STOPPING -> STOPPED                   nothing of the backend is left
    STOPPING -> FAILED                    ... after a crash
    FAILED   -> STARTING                  a new start
    FAILED   -> STOPPED                   an operator stopped a failed model

Only STOPPED and FAILED hold no memory and no port.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, NamedTuple

from twisted.internet.defer import Deferred

from llmnode.observer import OneShotObserver


class State(str, Enum):
    """A lifecycle state; compares equal to its lower-case name (as the API shows it)."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


STOPPED, STARTING, RUNNING, DRAINING, STOPPING, FAILED = (
    State.STOPPED, State.STARTING, State.RUNNING, State.DRAINING, State.STOPPING, State.FAILED)

#: Every state, in the order the API and the metrics list them.
STATES: tuple[State, ...] = tuple(State)

#: States in which a backend process may exist (it holds memory and its port).
LIVE = frozenset({STARTING, RUNNING, DRAINING, STOPPING})

TRANSITIONS: dict[State, frozenset[State]] = {
    STOPPED: frozenset({STARTING}),
    STARTING: frozenset({RUNNING, FAILED, STOPPING}),
    RUNNING: frozenset({DRAINING, STOPPING}),
    DRAINING: frozenset({RUNNING, STOPPING}),
    STOPPING: frozenset({STOPPED, FAILED}),
    FAILED: frozenset({STARTING, STOPPED}),
}


class InvalidTransition(Exception):
    """A move the table does not allow: a bug in whoever asked for it."""


class Transition(NamedTuple):
    model_id: str
    old: State
    new: State
    reason: str
    at: float


class Lifecycle:
    """The state of one model, moved only along L{TRANSITIONS}."""

    __slots__ = ("model_id", "state", "since", "reason", "_subscribers", "_next")

    def __init__(self, model_id: str, state: State = STOPPED, now: float = 0.0) -> None:
        self.model_id = model_id
        self.state = state
        self.since = now
        self.reason = ""
        self._subscribers: list[Callable[[Transition], None]] = []
        self._next: OneShotObserver[Transition] = OneShotObserver()

    def move(self, new: State, reason: str, now: float) -> Transition:
        """Go to C{new}; tell every subscriber and every L{changed} waiter.

        @raise InvalidTransition: the table has no such move.
        """
        old = self.state
        if new not in TRANSITIONS[old]:
            raise InvalidTransition(f"{self.model_id}: {old} -> {new} ({reason})")
        self.state, self.since, self.reason = new, now, reason
        transition = Transition(self.model_id, old, new, reason, now)
        waiting, self._next = self._next, OneShotObserver()
        for subscriber in list(self._subscribers):
            subscriber(transition)
        waiting.fire(transition)
        return transition

    def subscribe(self, subscriber: Callable[[Transition], None]) -> None:
        """Call C{subscriber(transition)} on every move from now on."""
        self._subscribers.append(subscriber)

    def changed(self) -> "Deferred[Transition]":
        """A Deferred of the next move (cancellable)."""
        return self._next.when_fired()

    def when(self, *states: State) -> "Deferred[Transition | None]":
        """Fire (with the transition, or None if already there) once in one of C{states}."""
        if self.state in states:
            d: Deferred[Transition | None] = Deferred()
            d.callback(None)
            return d
        result: Deferred[Transition | None] = Deferred()

        def check(transition: Transition) -> None:
            if result.called:
                return
            if transition.new in states:
                result.callback(transition)
            else:
                self.changed().addCallback(check)

        self.changed().addCallback(check)
        return result
