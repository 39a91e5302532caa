"""Fresh device snapshots, read off the reactor thread."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, cast

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmnode.devices.interfaces import Device, IDevicePlugin
from llmnode.observer import OneShotObserver


class _PluginState:
    """What the monitor knows about one plugin between refreshes."""

    def __init__(self, plugin: IDevicePlugin) -> None:
        self.plugin = plugin
        self.name = str(getattr(plugin, "name", type(plugin).__name__))[:80]
        self.devices: tuple[Device, ...] = ()
        self.good_at: Optional[float] = None
        self.error: Optional[str] = None
        self.running = False
        self.observers: list[Deferred[None]] = []


class DeviceMonitor:
    """Polls every device plugin and keeps the latest C{{id: Device}} snapshot.

    Plugins run in worker threads, one call per plugin at a time: a plugin that hangs keeps
    its last devices instead of piling up threads. A failing plugin is logged once per
    distinct error; its last good devices are kept for C{stale_after} seconds, then dropped,
    so placement never works from a stale picture for long. Where two plugins report the same
    device id the first plugin wins.
    """

    def __init__(self, reactor: IReactorTime, plugins: Iterable[IDevicePlugin],
                 interval: float = 1.0, log: Optional[Logger] = None, *,
                 run_in_thread: Optional[Callable[[Callable[[], Any]], Deferred[Any]]] = None,
                 plugin_timeout: float = 10.0, stale_after: float = 30.0) -> None:
        """
        @param reactor: provides C{callLater}/C{seconds}; and C{getThreadPool} unless
            C{run_in_thread} is given.
        @param run_in_thread: runs a callable off the reactor thread, returning a Deferred of
            its result (tests pass a synchronous one).
        """
        self._clock = reactor
        threads = cast(Any, reactor)  # also an IReactorThreads unless run_in_thread is given
        self._run = run_in_thread or (
            lambda f: deferToThreadPool(threads, threads.getThreadPool(), f))
        self._states = [_PluginState(p) for p in plugins]
        self.interval = interval
        self._log = log or Logger()
        self._plugin_timeout = plugin_timeout
        self._stale_after = stale_after
        self._devices: Mapping[str, Device] = MappingProxyType({})
        self._known: OneShotObserver[Mapping[str, Device]] = OneShotObserver()
        self._next_read: Optional[OneShotObserver[Mapping[str, Device]]] = None
        self._busy = False
        self._loop: Optional[LoopingCall] = None
        self._duplicates: set[tuple[str, str]] = set()
        self._subscribers: list[Callable[[Mapping[str, Device]], None]] = []

    @property
    def plugins(self) -> list[IDevicePlugin]:
        return [s.plugin for s in self._states]

    @property
    def devices(self) -> Mapping[str, Device]:
        """The latest snapshot (read-only), in plugin order."""
        return self._devices

    def subscribe(self, subscriber: Callable[[Mapping[str, Device]], None]) -> None:
        """Call C{subscriber(snapshot)} after every refresh (before the refresh's waiters)."""
        self._subscribers.append(subscriber)

    @property
    def known(self) -> bool:
        """Whether the first refresh has ended, so L{devices} is what the machine has (an empty
        snapshot before that means "not read yet", not "no devices")."""
        return self._known.fired

    def when_known(self) -> Deferred[Mapping[str, Device]]:
        """A new Deferred that fires with the snapshot once L{known} is true."""
        return self._known.when_fired()

    def start(self) -> None:
        """Refresh now and every C{interval} seconds until L{stop}."""
        if self._loop is not None and self._loop.running:
            return
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self._log.failure("device monitor loop failed", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def close(self) -> Deferred[None]:
        """Stop polling, wait (at most the plugin timeout) for queries still running, and call
        C{close()} on plugins that have one (off the reactor thread)."""
        self.stop()
        closing: list[Deferred[Any]] = []
        for state in self._states:
            if state.running:
                # Its answer also ends the timeout timer of the refresh that asked.
                answered: Deferred[None] = Deferred()
                state.observers.append(answered)
                answered.addTimeout(self._plugin_timeout, self._clock)
                closing.append(answered.addErrback(lambda f: None))
        for state in self._states:
            close = getattr(state.plugin, "close", None)
            if callable(close):
                d = maybeDeferred(self._run, close)
                d.addErrback(  # type: ignore[call-overload]
                    lambda f, n=state.name: self._log.failure(
                        "closing device plugin {name} failed", f, name=n))
                closing.append(d)
        return gatherResults(closing).addCallback(lambda _: None)

    def refresh(self) -> Deferred[Mapping[str, Device]]:
        """A Deferred of a snapshot read after this call; concurrent callers share one read.

        Never fails.
        """
        if self._next_read is None:
            self._next_read = OneShotObserver()
        waiter = self._next_read.when_fired()
        if not self._busy:
            self._read()
        return waiter

    def _read(self) -> None:
        self._busy = True
        this_read, self._next_read = self._next_read, None
        reads = [self._query(state) for state in self._states]
        gatherResults(reads).addBoth(self._finish, this_read)

    def _finish(self, result: object,
                this_read: Optional[OneShotObserver[Mapping[str, Device]]]) -> None:
        try:
            if isinstance(result, Failure):
                self._log.failure("device refresh failed", result)
            else:
                self._devices = MappingProxyType(self._snapshot())
        except Exception:
            self._log.failure("building the device snapshot failed")
        self._busy = False
        for subscriber in self._subscribers:
            try:
                subscriber(self._devices)
            except Exception:
                self._log.failure("a device snapshot subscriber failed")
        self._known.fire(self._devices)
        if this_read is not None:
            this_read.fire(self._devices)
        if self._next_read is not None and not self._busy:
            self._read()

    def _query(self, state: _PluginState) -> Deferred[None]:
        if state.running:
            # Still busy since an earlier refresh gave up on it: use what it said last.
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        state.observers.append(waiter)
        state.running = True
        maybeDeferred(self._run, state.plugin.devices).addBoth(self._record, state)
        if not waiter.called:
            waiter.addTimeout(self._plugin_timeout, self._clock,
                              onTimeoutCancel=lambda result, timeout: self._slow(state))
        return waiter

    def _slow(self, state: _PluginState) -> None:
        self._failed(state, f"no answer within {self._plugin_timeout:g} s")

    def _record(self, result: object, state: _PluginState) -> None:
        state.running = False
        try:
            if isinstance(result, Failure):
                self._failed(state, f"{result.type.__name__}: "  # type: ignore[union-attr]
                                    f"{result.getErrorMessage()}")
            elif not isinstance(result, (list, tuple)) or not all(
                    isinstance(d, Device) for d in result):
                self._failed(state, f"devices() returned {type(result).__name__}, "
                                    "expected a list of Device")
            else:
                state.devices = tuple(d if d.plugin else dataclasses.replace(d, plugin=state.name)
                                      for d in result)
                state.good_at = self._clock.seconds()
                if state.error is not None:
                    self._log.info("device plugin {name} answers again", name=state.name)
                state.error = None
        except Exception:
            self._log.failure("recording devices of plugin {name} failed", name=state.name)
        observers, state.observers = state.observers, []
        for observer in observers:
            if not observer.called:
                observer.callback(None)

    def _failed(self, state: _PluginState, error: str) -> None:
        error = error[:300]
        if error != state.error:
            self._log.warn(
                "device plugin {name} failed: {error}; its last devices are kept for "
                "{stale:g} s", name=state.name, error=error, stale=self._stale_after)
        state.error = error

    def _snapshot(self) -> dict[str, Device]:
        now = self._clock.seconds()
        snapshot: dict[str, Device] = {}
        for state in self._states:
            if state.error is not None and (
                    state.good_at is None or now - state.good_at > self._stale_after):
                continue
            for device in state.devices:
                if device.id in snapshot:
                    if (device.id, state.name) not in self._duplicates:
                        self._duplicates.add((device.id, state.name))
                        self._log.warn("device {id} from plugin {name} ignored: id already "
                                       "reported by {first}", id=device.id, name=state.name,
                                       first=snapshot[device.id].plugin)
                    continue
                snapshot[device.id] = device
        return snapshot
