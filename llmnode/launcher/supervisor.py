"""The small process that stands between the node and one backend command.

Run as C{python -I -c BOOT --node-pid N --grace S -- COMMAND} (see L{argv}). It makes itself the
leader of a new session and process group, runs C{/bin/sh -c COMMAND} in that group with the
inherited stdout/stderr, and exits with the command's status (a signal is re-raised, so the node
sees "killed by signal N"). When the node dies, the kernel tells it (C{PR_SET_PDEATHSIG}) and it
stops the whole group: SIGTERM, grace, SIGKILL. So no backend outlives its node.

Standard library only: it starts in well under a second and needs nothing from the venv.
"""

import ctypes
import os
import resource
import signal
import subprocess
import sys
import time

#: The name that marks a supervisor's command line (checked by L{llmnode.launcher.reclaim}).
MODULE = "llmnode.launcher.supervisor"

_PR_SET_PDEATHSIG = 1
_NODE_DIED = signal.SIGUSR1
_POLL = 0.05


def argv(python: str, package_root: str, node_pid: int, grace: float, command: str) -> list:
    """The argument vector that runs a supervisor for C{command}.

    C{-I} keeps the backend's environment (PYTHONPATH, PYTHONHOME...) away from the supervisor's
    own interpreter; the package root is put on its path explicitly.
    """
    boot = (f"import sys; sys.path.insert(0, {package_root!r}); "
            f"from {MODULE} import main; main(sys.argv[1:])")
    return [python, "-I", "-c", boot, "--node-pid", str(node_pid), "--grace", repr(grace),
            "--", command]


def group_members(pgid: int) -> list:
    """Pids of the processes in group C{pgid}, zombies excluded (Linux /proc)."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


class _NodeDied(Exception):
    pass


def _node_died(signum, frame):
    raise _NodeDied()


def _stay(signum, frame):
    """The node signals the whole group: the command gets the signal itself, and this process
    stays to report the command's status. (A handler, unlike SIG_IGN, is not inherited.)"""


class Supervisor:
    def __init__(self, node_pid: int, grace: float, command: str):
        self.node_pid = node_pid
        self.grace = grace
        self.command = command

    def run(self) -> int:
        os.setsid()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, _stay)
        signal.signal(_NODE_DIED, _node_died)
        try:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, int(_NODE_DIED), 0, 0, 0)
            except (OSError, AttributeError):
                pass
            if os.getppid() != self.node_pid:
                return 1
            child = subprocess.Popen(["/bin/sh", "-c", self.command], close_fds=True)
            _, status = os.waitpid(child.pid, 0)
        except _NodeDied:
            self.stop_group()
            return 1
        signal.signal(_NODE_DIED, signal.SIG_IGN)
        return self.finish(status)

    def stop_group(self) -> None:
        """The node is gone: SIGTERM the group, wait C{grace}, SIGKILL it (this process too)."""
        signal.signal(_NODE_DIED, signal.SIG_IGN)
        pgid = os.getpgid(0)
        me = os.getpid()
        try:
            os.killpg(pgid, signal.SIGTERM)
        except OSError:
            pass
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            try:
                others = [p for p in group_members(pgid) if p != me]
            except OSError:
                others = [None]
            if not others:
                break
            time.sleep(_POLL)
        os.killpg(pgid, signal.SIGKILL)

    def finish(self, status: int) -> int:
        """Exit the way the command did."""
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            try:
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            except (OSError, ValueError):
                pass
            try:
                signal.signal(signum, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
            os.kill(os.getpid(), signum)
            return 128 + signum
        return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1


def main(args: list) -> None:
    node_pid, grace, command = None, 10.0, None
    i = 0
    while i < len(args):
        if args[i] == "--node-pid":
            node_pid = int(args[i + 1])
            i += 2
        elif args[i] == "--grace":
            grace = float(args[i + 1])
            i += 2
        elif args[i] == "--":
            command = " ".join(args[i + 1:])
            break
        else:
            sys.exit(f"llmnode supervisor: unknown argument {args[i]!r}")
    if node_pid is None or command is None:
        sys.exit("usage: supervisor --node-pid N [--grace S] -- COMMAND")
    sys.exit(Supervisor(node_pid, grace, command).run())


if __name__ == "__main__":
    main(sys.argv[1:])
