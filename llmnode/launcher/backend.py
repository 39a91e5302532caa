"""One backend process of a model: spawn through the supervisor, wait until healthy, stop.

The backend runs as C{/bin/sh -c COMMAND} under L{llmnode.launcher.supervisor}, which leads a
process group of its own; the supervisor's pid is the group id. The supervisor reports the
server's own pid on a pipe of its own (C{_PID_FD}). Stopping signals the whole group (SIGTERM,
grace, SIGKILL) and only returns when no process of it is left.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from typing import TYPE_CHECKING, Any, Mapping, Optional, TypeVar, cast

import treq
from twisted.internet import defer, error, protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

import llmnode
from llmnode.launcher import ports, runtime, supervisor
from llmnode.launcher.logfile import ModelLog
from llmnode.observer import OneShotObserver

if TYPE_CHECKING:
    from treq.client import HTTPClient
    from twisted.internet import _IReactorCommon as Reactor  # the global reactor's type
    from twisted.internet.interfaces import IProcessTransport
    from twisted.python.failure import Failure

T = TypeVar("T")

#: How long stop() waits after SIGKILL before it gives up on an unkillable process.
_KILL_WAIT = 5.0
#: How long a start failure waits for the last output of an exited process.
_OUTPUT_WAIT = 1.0
_TAIL_LINES = 20
#: The supervisor's descriptor for reporting the server's pid.
_PID_FD = 3


class StartError(Exception):
    """A backend did not become ready.

    @ivar reason: C{"exited"}, C{"timeout"}, C{"port_busy"}, C{"spawn"} or C{"probe"}.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


def describe_exit(reason: Failure) -> str:
    """A short text for a process's end: C{"exit status 3"} or C{"killed by signal 9"}."""
    value = reason.value
    signum = getattr(value, "signal", None)
    if signum:
        return f"killed by signal {signum}"
    return f"exit status {getattr(value, 'exitCode', None) or 0}"


class _Output(protocol.ProcessProtocol):
    """Carries the backend's output to its log and its end to the L{Backend}."""

    def __init__(self, backend: "Backend") -> None:
        self._backend = backend

    def outReceived(self, data: bytes) -> None:
        self._backend._output(data, "out")

    def errReceived(self, data: bytes) -> None:
        self._backend._output(data, "err")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == _PID_FD:
            self._backend._pid_reported(data)
        else:
            super().childDataReceived(childFD, data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == _PID_FD:
            self._backend._pid_pipe_closed()

    def processExited(self, reason: Failure) -> None:
        self._backend._main_exited(reason)

    def processEnded(self, reason: Failure) -> None:
        self._backend._pipes_closed()


class Backend:
    """One run of a model's backend command; make a new one for every start.

    @param env: the command's environment; only C{LLMNODE_RUN} (the run's id) is added.
    @param cwd: the command's working directory (the config file's folder).
    @param health_path: polled until it answers 200; None means C{/health}, falling back to
        C{/v1/models} if C{/health} answers 404.
    @param runtime_dir: where the record of the running group is kept for L{reclaim}; None keeps
        none.
    @param http: a C{treq.HTTPClient}-like object, owned by the caller, for the health polls.
    """

    log = Logger()

    def __init__(self, reactor: Reactor, *, model_id: str, command: str,
                 env: Mapping[str, str], cwd: str,
                 port: int, health_path: Optional[str], health_interval: float = 0.05,
                 start_timeout: float = 300, stop_timeout: float = 10,
                 stop_command: Optional[str] = None, log: ModelLog,
                 runtime_dir: Optional[str], http: HTTPClient,
                 host: str = "127.0.0.1") -> None:
        self._reactor = reactor
        self.model_id = model_id
        self.command = command
        self.env = dict(env)
        self.cwd = cwd
        self.port = port
        self.health_path = health_path
        self.health_interval = health_interval
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.stop_command = stop_command
        self.model_log = log
        self.runtime_dir = runtime_dir
        self.host = host
        self._http = http
        #: The supervisor's pid, which is also the process group's id.
        self.pid: Optional[int] = None
        #: The model server's pid (the supervisor's child), once the supervisor reported it.
        self.server_pid: Optional[int] = None
        self._pid_report = b""
        self._pid_done: OneShotObserver[None] = OneShotObserver()
        self.started_at: Optional[float] = None
        self.ready_at: Optional[float] = None
        self.status: Optional[str] = None
        self.returncode: Optional[int] = None
        self._transport: Optional[IProcessTransport] = None
        self._exit: OneShotObserver[str] = OneShotObserver()
        self._pipes_done: OneShotObserver[None] = OneShotObserver()
        self._pipes_open = False
        self._stopping = False
        self._stopped: Optional[OneShotObserver[None]] = None
        self._stop_requested = False
        self._probing = False
        self._log_mark = 0
        #: Marks the environment of every process of this run (L{supervisor.RUN_VARIABLE}).
        self.run_id = uuid.uuid4().hex

    @property
    def running(self) -> bool:
        """Whether the main process has been spawned and has not exited."""
        return self.pid is not None and self.status is None

    # -- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the command and wait until it answers its health path.

        @raise StartError: it could not start; nothing of it is left running then.
        """
        if self.pid is not None:
            raise RuntimeError("a Backend starts once; make a new one")
        if not os.path.isdir(self.cwd):
            raise StartError(f"model {self.model_id!r}: working directory {self.cwd!r} does not "
                             "exist", "spawn")
        busy = ports.describe_busy(self.host, self.port)
        if busy:
            raise StartError(f"model {self.model_id!r}: {busy}", "port_busy")
        self._spawn()
        exited = self.exited()
        timer = deferLater(self._reactor, self.start_timeout, lambda: None)
        # A cancelled probe may end in any error (the agent's), so the loop is told directly.
        exited.addBoth(self._end_probing)
        timer.addBoth(self._end_probing)
        self._probing = True
        healthy = defer.Deferred.fromCoroutine(self._wait_healthy())
        try:
            index, value = await _first([healthy, exited, timer])
        except defer.CancelledError:
            self.stop()
            raise
        except Exception as e:
            # Not expected (a probe's failure counts as "not ready yet"), but a start failure
            # always says why.
            self.model_log.note(f"readiness probing failed: {e!r}")
            await self.stop()
            raise StartError(f"model {self.model_id!r}: probing its readiness failed: "
                             f"{type(e).__name__}: {e}", "probe") from e
        if index == 0:
            self.ready_at = self._reactor.seconds()
            self.model_log.note(f"ready on port {self.port} "
                                f"after {self.ready_at - cast(float, self.started_at):.2f} s")
            return
        if index == 1:
            await self.stop()
            await self._output_done()
            if self._stop_requested:
                message = f"model {self.model_id!r} was stopped before it was ready"
            else:
                how = (f"exited with status {self.returncode}" if cast(int, self.returncode) >= 0
                       else f"was killed by signal {-cast(int, self.returncode)}")
                message = (f"model {self.model_id!r} {how} before it was "
                           f"ready{self._last_lines()}")
            raise StartError(message, "exited")
        self.model_log.note(f"not ready after {self.start_timeout:g} s; stopping it")
        await self.stop()
        await self._output_done()
        raise StartError(
            f"model {self.model_id!r} did not answer {self._url(self.health_path or '/health')}"
            f" with 200 within {self.start_timeout:g} s{self._last_lines()}", "timeout")

    def _spawn(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(llmnode.__file__)))
        args = supervisor.argv(sys.executable, package_root, os.getpid(), self.stop_timeout,
                               self.command, pid_fd=_PID_FD)
        self.model_log.note(f"starting: {self.command}")
        self._log_mark = self.model_log.lines_written
        # Every process of this run carries the run's id in its environment, so that one that
        # leaves the process group (setsid) is still found, stopped and reclaimed.
        env = dict(self.env, **{supervisor.RUN_VARIABLE: self.run_id})
        try:
            self._transport = self._reactor.spawnProcess(
                _Output(self), sys.executable, args, env=env, path=self.cwd,
                childFDs={0: "w", 1: "r", 2: "r", _PID_FD: "r"})
        except Exception as e:
            self.model_log.note(f"could not start: {e}")
            raise StartError(f"model {self.model_id!r} could not be started: {e}", "spawn")
        self._pipes_open = True
        self.pid = self._transport.pid
        self.started_at = self._reactor.seconds()
        try:
            self._transport.closeStdin()
        except Exception:
            self.log.failure("closing the stdin of {model}", model=self.model_id)
        if self.runtime_dir:
            runtime.write_record(self.runtime_dir, self.model_id, self.pid, self.command,
                                 self.log, run_id=self.run_id)

    def _end_probing(self, result: T) -> T:
        self._probing = False
        return result

    async def _wait_healthy(self) -> None:
        """Probe until the health path answers 200. A probe has no limit of its own: a backend
        that takes its time to answer is still starting, and the start timeout (or the
        process's exit) ends the wait, cancelling the probe in flight."""
        path = self.health_path or "/health"
        while self._probing:
            code = await self._probe(path)
            if not self._probing:
                break
            if code == 200:
                await self._pid_known()
                return
            if code == 404 and self.health_path is None and path == "/health":
                path = "/v1/models"
                continue
            await deferLater(self._reactor, self.health_interval, lambda: None)
        raise defer.CancelledError()

    async def _probe(self, path: str) -> Optional[int]:
        """The status code of one GET, or None when there was no answer."""
        try:
            response = await self._http.get(self._url(path))
        except defer.CancelledError:
            raise
        except Exception:
            return None
        try:
            await treq.content(response)
        except defer.CancelledError:
            raise
        except Exception:
            pass
        return cast(int, response.code)

    def _url(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def _last_lines(self) -> str:
        lines = [line for line in self.model_log.tail(_TAIL_LINES + 5, since=self._log_mark)
                 if not line.startswith("[llmnode] ")][-_TAIL_LINES:]
        if not lines:
            return " (it wrote nothing)"
        return "; last output:\n" + "\n".join(lines)

    async def _output_done(self) -> None:
        """Wait (bounded) until the pipes are closed, so the log holds all the output."""
        if self._pipes_open:
            d = self._pipes_done.when_fired()
            timer = deferLater(self._reactor, _OUTPUT_WAIT, lambda: None)
            await _first([d, timer])
        self.model_log.flush()

    # -- the process's events -------------------------------------------------------------

    def exited(self) -> defer.Deferred[str]:
        """A new Deferred that fires with a short status text once the main process exits."""
        return self._exit.when_fired()

    def _output(self, data: bytes, stream: str) -> None:
        try:
            self.model_log.write(data, stream)
        except Exception:
            self.log.failure("writing the output of {model} to {path}",
                             model=self.model_id, path=self.model_log.path)

    def _pid_known(self) -> defer.Deferred[None]:
        """Fires once L{server_pid} is read, or can no longer come. The supervisor reports it
        long before the server can answer; only reading the report may still be pending."""
        return self._pid_done.when_fired()

    def _pid_reported(self, data: bytes) -> None:
        self._pid_report = (self._pid_report + data)[:32]
        line, newline, _ = self._pid_report.partition(b"\n")
        if not newline or self.server_pid is not None:
            return
        try:
            self.server_pid = int(line)
            self.model_log.note(f"server pid {self.server_pid}")
        except Exception:
            self.log.failure("reading the server pid of {model} from {line!r}",
                             model=self.model_id, line=line)
        self._pid_pipe_closed()

    def _pid_pipe_closed(self) -> None:
        """No (more) pid report can come: release whoever waits for one."""
        self._pid_done.fire(None)

    def _main_exited(self, reason: Failure) -> None:
        try:
            self.status = describe_exit(reason)
            value: Any = reason.value
            self.returncode = (-value.signal if getattr(value, "signal", None)
                               else getattr(value, "exitCode", None) or 0)
            self.model_log.note(f"pid {self.pid} ended: {self.status}")
            if not self._stopping and self.ready_at is not None:
                self.log.warn("{model} (pid {pid}) exited on its own: {status}",
                              model=self.model_id, pid=self.pid, status=self.status)
            if not self._stopping:
                # What is left of the group would hold memory and ports: sweep it now.
                self._signal_group(signal.SIGKILL)
                self._ensure_stopping()
        except Exception:
            self.log.failure("handling the exit of {model}", model=self.model_id)
        self._exit.fire(cast(str, self.status))

    def _pipes_closed(self) -> None:
        self._pipes_open = False
        self._pid_pipe_closed()
        try:
            self.model_log.flush()
        except Exception:
            self.log.failure("flushing the log of {model}", model=self.model_id)
        self._pipes_done.fire(None)

    # -- stop -----------------------------------------------------------------------------

    def stop(self) -> defer.Deferred[None]:
        """Stop the whole process group; fire when none of it is left. Safe to call again."""
        if self.pid is not None and self.status is None:
            self._stop_requested = True
        return self._ensure_stopping()

    def _ensure_stopping(self) -> defer.Deferred[None]:
        if self._stopped is None:
            self._stopping = True
            self._stopped = OneShotObserver()
            stopping = defer.Deferred.fromCoroutine(self._run_stop())
            stopping.addErrback(self._stop_failed)
            stopping.addBoth(self._stopped.fire)
        return self._stopped.when_fired()

    def _stop_failed(self, failure: Failure) -> None:
        self.log.failure("stopping {model} (pid {pid})", failure, model=self.model_id,
                         pid=self.pid)

    async def _run_stop(self) -> None:
        if self.pid is None:
            return
        if self.stop_command and self.running:
            await self._run_stop_command()
        if not self._group_gone():
            self._signal_group(signal.SIGTERM)
            await self._wait_gone(self.stop_timeout)
        if not self._group_gone():
            self.model_log.note(f"still running after {self.stop_timeout:g} s; SIGKILL")
            self._signal_group(signal.SIGKILL)
            if not await self._wait_gone(_KILL_WAIT):
                self.log.error("{model}: process group {pgid} survived SIGKILL for {wait} s",
                               model=self.model_id, pgid=self.pid, wait=_KILL_WAIT)
        if self.runtime_dir:
            runtime.remove_record(self.runtime_dir, self.model_id, self.pid, self.log)

    async def _run_stop_command(self) -> None:
        self.model_log.note(f"stop command: {self.stop_command}")
        done: defer.Deferred[None] = defer.Deferred()
        proto = _StopCommand(self, done)
        try:
            transport = self._reactor.spawnProcess(
                proto, "/bin/sh", ["/bin/sh", "-c", cast(str, self.stop_command)], env=self.env,
                path=self.cwd)
        except Exception:
            self.log.failure("running the stop command of {model}", model=self.model_id)
            return
        timer = deferLater(self._reactor, self.stop_timeout, lambda: None)
        index, _ = await _first([done, timer])
        if index == 1:
            self.model_log.note(f"stop command still running after {self.stop_timeout:g} s; "
                                "killed")
            try:
                transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

    async def _wait_gone(self, seconds: float) -> bool:
        deadline = self._reactor.seconds() + seconds
        while not self._group_gone():
            if self._reactor.seconds() >= deadline:
                return False
            await deferLater(self._reactor, min(0.05, max(seconds, 0.01)), lambda: None)
        return True

    def _group_gone(self) -> bool:
        """Whether the main process has exited and no process of its group, nor of its run
        outside the group, is left."""
        if self.pid is None:
            return True
        if self.status is None:
            return False
        return not ports.group_alive(self.pid) and not self._escaped()

    def _escaped(self) -> list[int]:
        """The processes of this run that left its group (a command that called setsid)."""
        try:
            return supervisor.escaped_members(self.run_id, cast(int, self.pid))
        except OSError:
            self.log.failure("looking for the processes of {model}", model=self.model_id)
            return []

    def _signal_group(self, signum: int) -> None:
        """Signal the group and the processes of this run outside it; before the supervisor
        has its own group, signal it alone."""
        escaped = self._escaped()
        if escaped:
            self.model_log.note(f"signal {signum} also to pids {escaped}, which left the "
                                f"process group")
            supervisor.signal_all(escaped, signum)
        try:
            os.killpg(cast(int, self.pid), signum)
            return
        except ProcessLookupError:
            pass
        except OSError:
            self.log.failure("signalling the group of {model}", model=self.model_id)
            return
        if self.status is None and self._transport is not None:
            # Not yet reaped, so the pid is still ours.
            try:
                self._transport.signalProcess(signum)
            except (error.ProcessExitedAlready, OSError):
                pass


class _StopCommand(protocol.ProcessProtocol):
    def __init__(self, backend: Backend, done: defer.Deferred[None]) -> None:
        self._backend = backend
        self._done = done

    def outReceived(self, data: bytes) -> None:
        self._backend._output(data, "stop-out")

    def errReceived(self, data: bytes) -> None:
        self._backend._output(data, "stop-err")

    def processEnded(self, reason: Failure) -> None:
        try:
            self._backend.model_log.flush()
            self._backend.model_log.note(f"stop command ended: {describe_exit(reason)}")
        except Exception:
            self._backend.log.failure("logging the stop command's end")
        if not self._done.called:
            self._done.callback(None)


async def _first(ds: list[defer.Deferred[Any]]) -> tuple[int, Any]:
    """(index, result) of the first of C{ds} to fire; the others are cancelled.

    Unlike C{defer.race}, cancelling the wait is safe: the losers' late failures are ignored
    instead of firing an already-cancelled Deferred again.
    """
    result: defer.Deferred[tuple[int, Any]] = defer.Deferred()

    def won(value: object, index: int) -> None:
        if not result.called:
            result.callback((index, value))

    def lost(failure: Failure, index: int) -> None:
        if not result.called:
            result.errback(failure)

    for index, d in enumerate(ds):
        d.addCallbacks(won, lost, callbackArgs=(index,), errbackArgs=(index,))
    try:
        return await result
    finally:
        for d in ds:
            if not d.called:
                d.cancel()
