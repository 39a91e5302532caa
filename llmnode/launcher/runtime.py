"""Records of running backend groups, so a node can reclaim what a previous node left behind.

One JSON file per model, C{<runtime_dir>/<quoted model id>.json}, written at spawn and removed
once the group is gone.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Optional, cast
from urllib.parse import quote

import psutil

from llmnode.launcher.supervisor import (MODULE, escaped_members, group_members, run_members,
                                         signal_all)

if TYPE_CHECKING:
    from twisted.logger import Logger

MARKER = "llmnode-supervisor"
_TERM_WAIT = 3.0
_KILL_WAIT = 2.0


def record_path(runtime_dir: str, model_id: str) -> str:
    return os.path.join(runtime_dir, quote(model_id, safe="") + ".json")


def _create_time(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def write_record(runtime_dir: str, model_id: str, pid: int, command: str, log: Logger,
                 run_id: Optional[str] = None) -> None:
    """Record the group led by C{pid} (the supervisor) and the run id its processes carry;
    failures are logged, not raised."""
    record = {"model": model_id, "pid": pid, "pgid": pid, "create_time": _create_time(pid),
              "node_pid": os.getpid(), "node_create_time": _create_time(os.getpid()),
              "command": command, "marker": MARKER, "run": run_id}
    path = record_path(runtime_dir, model_id)
    try:
        os.makedirs(runtime_dir, exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            json.dump(record, f)
        os.replace(temporary, path)
    except OSError:
        log.failure("writing the runtime record {path}", path=path)


def remove_record(runtime_dir: str, model_id: str, pid: int, log: Logger) -> None:
    """Remove the record of C{model_id} if it is still the one of C{pid}."""
    path = record_path(runtime_dir, model_id)
    try:
        with open(path) as f:
            if json.load(f).get("pid") != pid:
                return
        os.remove(path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        log.failure("removing the runtime record {path}", path=path)


def _same_process(pid: int, create_time: Any) -> Optional[psutil.Process]:
    """The process C{pid} if it is still the one created at C{create_time}."""
    try:
        process = psutil.Process(pid)
        if create_time is None or abs(process.create_time() - float(create_time)) > 0.05:
            return None
        return process
    except (psutil.Error, TypeError, ValueError):
        return None


def _is_our_supervisor(record: dict[str, Any]) -> bool:
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 1 or record.get("pgid") != pid:
        return False
    process = _same_process(pid, record.get("create_time"))
    if process is None:
        return False
    try:
        return (any(MODULE in part for part in process.cmdline())
                and os.getpgid(pid) == pid)
    except (psutil.Error, OSError):
        return False


def _wait_group(pgid: int, seconds: float) -> bool:
    """Wait until group C{pgid} is gone (blocking; only used at node start)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        if not group_members(pgid):
            return True
        time.sleep(0.05)
    return False


def reclaim(runtime_dir: str, log: Logger) -> list[int]:
    """Stop the backends a previous node recorded in C{runtime_dir} and left running.

    Only a group whose leader still matches its record (pid, creation time, the supervisor on its
    command line) is stopped: SIGTERM, a short wait, SIGKILL. Records of a node that still runs
    are left alone; stale records are removed.

    @param log: a L{twisted.logger.Logger}.
    @return: the group ids that were stopped.
    """
    stopped: list[int] = []
    try:
        names = sorted(os.listdir(runtime_dir))
    except FileNotFoundError:
        return stopped
    except OSError:
        log.failure("reading the runtime folder {path}", path=runtime_dir)
        return stopped
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(runtime_dir, name)
        try:
            with open(path) as f:
                record = json.load(f)
            if not isinstance(record, dict):
                raise ValueError("not a mapping")
        except (OSError, ValueError):
            log.warn("removing the unreadable runtime record {path}", path=path)
            _remove(path, log)
            continue
        node_pid = record.get("node_pid")
        if (isinstance(node_pid, int) and node_pid != os.getpid()
                and _same_process(node_pid, record.get("node_create_time")) is not None):
            log.warn("{path} belongs to node pid {pid}, which still runs; left alone",
                     path=path, pid=node_pid)
            continue
        run_id = record.get("run") if isinstance(record.get("run"), str) else None
        model, command = record.get("model"), str(record.get("command"))[:200]
        if _is_our_supervisor(record):
            pgid = record["pgid"]
            log.warn("stopping the backend of {model} left by a previous node "
                     "(process group {pgid}: {command})", model=model, pgid=pgid,
                     command=command)
            try:
                _stop_run(run_id, pgid)
                os.killpg(pgid, signal.SIGTERM)
                if not _wait_group(pgid, _TERM_WAIT):
                    os.killpg(pgid, signal.SIGKILL)
                    _wait_group(pgid, _KILL_WAIT)
            except ProcessLookupError:
                pass
            except OSError:
                log.failure("stopping process group {pgid}", pgid=pgid)
                continue
            stopped.append(pgid)
        elif run_id is not None and run_members(run_id):
            # The supervisor is gone (killed on its own) but processes of its run still hold
            # the model's port and memory: they carry the run's id, so they are ours.
            pids = run_members(run_id)
            log.warn("the supervisor of {model} (pid {pid}) left by a previous node is gone, "
                     "but {count} of its processes still run (pids {pids}: {command}); "
                     "stopping them", model=model, pid=record.get("pid"), count=len(pids),
                     pids=", ".join(map(str, pids)), command=command)
            _stop_run(run_id, None)
            stopped.append(cast(int, record.get("pgid")))
        else:
            log.info("removing the runtime record of {model} (pid {pid}): nothing of it runs",
                     model=model, pid=record.get("pid"))
        _remove(path, log)
    return stopped


def _stop_run(run_id: Optional[str], pgid: Optional[int]) -> None:
    """Stop the processes of run C{run_id} outside group C{pgid} (all of them when None):
    SIGTERM, a short wait, SIGKILL (blocking; only used at node start)."""
    if run_id is None:
        return

    def left() -> list[int]:
        return run_members(run_id) if pgid is None else escaped_members(run_id, pgid)

    for signum, wait in ((signal.SIGTERM, _TERM_WAIT), (signal.SIGKILL, _KILL_WAIT)):
        pids = left()
        if not pids:
            return
        signal_all(pids, signum)
        # A killed process is gone only once the kernel has torn it down: wait for that too,
        # so that its port and memory are free when reclaim returns.
        deadline = time.monotonic() + wait
        while left() and time.monotonic() < deadline:
            time.sleep(0.05)


def _remove(path: str, log: Logger) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        log.failure("removing the runtime record {path}", path=path)
