"""One result, many waiters: the node's single way to let several callers wait on one outcome.

Each waiter gets a Deferred of its own, so a waiter that cancels (a client that left) takes
itself off the list and leaves the outcome, and every other waiter, alone.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")

_PENDING: Any = object()


class OneShotObserver(Generic[T]):
    """Holds the outcome of one operation (a value or a L{Failure}) for any number of waiters."""

    __slots__ = ("_result", "_waiters")

    def __init__(self) -> None:
        self._result: Any = _PENDING
        self._waiters: list[Deferred[T]] = []

    @property
    def fired(self) -> bool:
        return self._result is not _PENDING

    def when_fired(self) -> "Deferred[T]":
        """A new Deferred with the outcome; cancelling it affects no one else."""
        if self._result is not _PENDING:
            waiter: Deferred[T] = Deferred()
            self._relay(waiter)
            return waiter
        waiter = Deferred(self._cancelled)
        self._waiters.append(waiter)
        return waiter

    def fire(self, result: "T | Failure") -> None:
        """Give every waiter, present and future, C{result}. Only the first call counts."""
        if self._result is not _PENDING:
            return
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._relay(waiter)

    def _relay(self, waiter: Deferred[T]) -> None:
        if waiter.called:
            return
        if isinstance(self._result, Failure):
            waiter.errback(self._result)
        else:
            waiter.callback(self._result)

    def _cancelled(self, waiter: Deferred[T]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

