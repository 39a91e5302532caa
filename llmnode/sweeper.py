"""Stops models that have been idle longer than their alive_time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Optional, cast

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llmnode.lifecycle import RUNNING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.python.failure import Failure

    from llmnode.node import ModelRuntime

#: Seconds before a model whose idle stop failed is tried again.
RETRY_DELAY = 10.0
#: Seconds between sweeps: well inside the promise that a model stops within
#: max(5 s, 5 % of its alive_time) after its deadline.
DEFAULT_INTERVAL = 1.0


def alive_time_s(model_alive_time_min: Optional[float], default_min: float) -> float:
    """A model's alive_time in seconds: its own if set, else the program's; 0 = never stop."""
    minutes = default_min if model_alive_time_min is None else model_alive_time_min
    return max(0.0, float(minutes)) * 60.0


def due(now: float, alive_time_s: float, last_used: Optional[float], in_flight: int,
        state: str) -> bool:
    """Whether a model should be stopped for idleness now.

    Only a running model with no request in flight, whose idle clock has started, and whose
    alive_time is not 0 (never) can be due.
    """
    return (state == RUNNING and in_flight == 0 and last_used is not None
            and alive_time_s > 0 and now - last_used >= alive_time_s)


class Sweeper:
    """Every C{interval} seconds, stops each runtime that is L{due}.

    @param runtimes: returns the node's runtime objects, each with C{.model},
        C{.state}, C{.in_flight}, C{.last_used} and C{.stop(reason)} (a Deferred).
    """

    def __init__(self, clock: IReactorTime, runtimes: Callable[[], Iterable[ModelRuntime]],
                 default_alive_time_min: float,
                 log: Optional[Logger] = None, interval: Optional[float] = None) -> None:
        self._clock = clock
        self._runtimes = runtimes
        self._default = default_alive_time_min
        self._log = log or Logger()
        self.interval = DEFAULT_INTERVAL if interval is None else interval
        self._loop: Optional[LoopingCall] = None
        self._stopping: set[int] = set()
        self._retry_at: dict[int, float] = {}

    def start(self) -> None:
        if self._loop is not None and self._loop.running:
            return
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: self._log.failure("idle sweeper stopped", f))

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def sweep(self) -> None:
        """Stop every runtime that is due now. Never raises."""
        try:
            runtimes = list(self._runtimes())
        except Exception:
            self._log.failure("idle sweeper could not list models")
            return
        now = self._clock.seconds()
        for runtime in runtimes:
            try:
                self._check(runtime, now)
            except Exception:
                self._log.failure("idle sweeper failed on a model")

    def _check(self, runtime: ModelRuntime, now: float) -> None:
        key = id(runtime)
        if key in self._stopping or now < self._retry_at.get(key, now):
            return
        model = runtime.model
        limit = alive_time_s(model.alive_time, self._default)
        if not due(now, limit, runtime.last_used, runtime.in_flight, runtime.state):
            return
        self._log.info("stopping {model}: idle for {idle:.0f} s (alive_time {limit:g} s)",
                       model=model.id, idle=now - cast(float, runtime.last_used), limit=limit)
        self._stopping.add(key)
        self._retry_at.pop(key, None)

        def failed(failure: Failure) -> None:
            self._log.failure("idle stop of {model} failed; trying again in {delay:g} s",
                              failure, model=model.id, delay=RETRY_DELAY)
            self._retry_at[key] = self._clock.seconds() + RETRY_DELAY

        d = maybeDeferred(runtime.stop, "idle")
        d.addErrback(failed)
        d.addBoth(lambda _: self._stopping.discard(key))
