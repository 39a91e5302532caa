"""The small process that stands between the node and one backend command.

Run as C{python -I -c BOOT --node-pid N --grace S [--pid-fd FD] -- COMMAND} (see L{argv}). It
makes itself the leader of a new session and process group, runs C{/bin/sh -c COMMAND} in that
group with the inherited stdout/stderr, writes the pid of that child (the model server) to FD,
and exits with the command's status (a signal is re-raised, so the node sees "killed by signal
N"). When the node dies, the kernel tells it (C{PR_SET_PDEATHSIG}) and it stops the whole group:
SIGTERM, grace, SIGKILL. So no backend outlives its node.

Where it is safe (L{exec_last}), the command's last simple command is run with C{exec}, so no
shell stays between the supervisor and the server: the reported pid is the server's, and a
signal that kills the server is seen as such. Where a shell must stay, its exit status 128+N
(how a shell reports a command killed by signal N) is reported as that signal, so the same kill
reads the same either way.

Standard library only: it starts in well under a second and needs nothing from the venv.
"""

import ctypes
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from typing import Iterator, Optional

#: The name that marks a supervisor's command line (checked by L{llmnode.launcher.reclaim}).
MODULE = "llmnode.launcher.supervisor"

_PR_SET_PDEATHSIG = 1
_NODE_DIED = signal.SIGUSR1
_POLL = 0.05


def argv(python: str, package_root: str, node_pid: int, grace: float, command: str,
         pid_fd: Optional[int] = None) -> list[str]:
    """The argument vector that runs a supervisor for C{command}.

    C{-I} keeps the backend's environment (PYTHONPATH, PYTHONHOME...) away from the supervisor's
    own interpreter; the package root is put on its path explicitly.

    @param pid_fd: a file descriptor the supervisor inherits, where it writes the server's pid
        (a decimal line) and which it then closes; None reports nothing.
    """
    boot = (f"import sys; sys.path.insert(0, {package_root!r}); "
            f"from {MODULE} import main; main(sys.argv[1:])")
    report = [] if pid_fd is None else ["--pid-fd", str(pid_fd)]
    return [python, "-I", "-c", boot, "--node-pid", str(node_pid), "--grace", repr(grace),
            *report, "--", command]


#: First words that make a command something other than a program to exec: shell keywords and
#: builtins (exec'ing them would fail or change what the line does).
_SHELL_WORDS = frozenset("""
    ! { } [ [[ ]] case do done elif else esac fi for function if in select then time until
    while . : alias bg break cd command continue eval exec exit export false fc fg getopts hash
    jobs kill local printf pwd read readonly return set shift source test times trap true type
    ulimit umask unalias unset wait echo
""".split())
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_TRAP = re.compile(r"(^|[;&|]|\s)trap\s")


def exec_last(command: str) -> Optional[str]:
    """C{command} with C{exec} before its last simple command, or None where that is not safe.

    Safe means: one line, no pipeline, background job, subshell, group, command substitution,
    comment or trap (C{exec} would skip it), and a last command that is a program (not a keyword
    or builtin). Commands joined by C{;}, C{&&} and C{||} are fine (C{cd models && llama-server
    ...}); leading C{NAME=value} assignments stay in front of C{exec}, which passes them on to
    the program. A last command that already starts with C{exec} is returned as it is.
    """
    last = last_command(command)
    if last is None:
        return None
    _, at, program = last
    if program == "exec":
        return command
    return command[:at] + "exec " + command[at:]


def last_command(command: str) -> Optional[tuple[int, int, str]]:
    """Where the program of C{command}'s last simple command is, if the line is simple enough
    to tell (see L{exec_last}); else None.

    @return: C{(start, at, program)}: the index where the last command (its assignments
        included) starts, the index of its program word, and that word with quotes removed
        (C{exec} where the line already execs).
    """
    if _TRAP.search(command):
        return None
    start, i, n = 0, 0, len(command)
    while i < n:
        c = command[i]
        if c == "\\":
            i += 2
            continue
        if c == "'":
            end = command.find("'", i + 1)
            if end < 0:
                return None
            i = end + 1
            continue
        if c == '"':
            i += 1
            while i < n and command[i] != '"':
                i += 2 if command[i] == "\\" else 1
            if i >= n:
                return None
            i += 1
            continue
        before = command[i - 1] if i else " "
        if c in "\n\r()`" or (c == "$" and command[i + 1:i + 2] == "(") or (
                c == "#" and (before.isspace() or before in ";&|")):
            return None
        if c == ";":
            if command[i + 1:i + 2] == ";":
                return None
            start = i = i + 1
            continue
        if c in "&|":
            if command[i + 1:i + 2] == c:
                start = i = i + 2
                continue
            if before not in "<>":
                return None  # a pipeline or a background job (>& and >| are redirections)
        i += 1
    last = command[start:]
    lexer = shlex.shlex(last, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        word = lexer.get_token()
        at = 0
        while word is not None and _ASSIGNMENT.match(word):
            at = lexer.instream.tell()  # type: ignore[attr-defined]  # a StringIO
            word = lexer.get_token()
    except ValueError:
        return None
    if word == "exec":
        return start, start + at, word
    if word is None or word in _SHELL_WORDS or word[:1] in "<>" or re.match(r"\d+[<>]", word):
        return None
    if at == 0:
        at = len(last) - len(last.lstrip())
    return start, start + at, word


#: The environment variable whose value marks every process of one backend run: whatever the
#: command starts inherits it, even a process that leaves the group (C{setsid}) or is orphaned.
RUN_VARIABLE = "LLMNODE_RUN"


def run_members(run_id: str) -> list[int]:
    """Pids of the live processes whose environment carries C{LLMNODE_RUN=run_id} (Linux
    /proc; a zombie's environment reads empty, another user's not at all)."""
    marker = f"{RUN_VARIABLE}={run_id}".encode()
    return [pid for pid, environ in _each_process("environ") if marker in environ.split(b"\0")]


def _each_process(entry: str) -> Iterator[tuple[int, bytes]]:
    """C{(pid, content)} of C{/proc/PID/entry} for every process whose file can be read."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/{entry}", "rb") as f:
                yield int(name), f.read()
        except OSError:
            continue


def escaped_members(run_id: str, pgid: int) -> list[int]:
    """The processes of run C{run_id} outside process group C{pgid}: a command that called
    C{setsid}, and what it started."""
    escaped = []
    for pid in run_members(run_id):
        try:
            if os.getpgid(pid) != pgid:
                escaped.append(pid)
        except OSError:
            pass
    return escaped


def signal_all(pids: list[int], signum: int) -> None:
    """Send C{signum} to each of C{pids}, ignoring those already gone."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def group_members(pgid: int) -> list[int]:
    """Pids of the processes in group C{pgid}, zombies excluded (Linux /proc)."""
    members = []
    for pid, stat in _each_process("stat"):
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(pid)
    return members


class _NodeDied(Exception):
    pass


def _node_died(signum: int, frame: object) -> None:
    raise _NodeDied()


def _stay(signum: int, frame: object) -> None:
    """The node signals the whole group: the command gets the signal itself, and this process
    stays to report the command's status. (A handler, unlike SIG_IGN, is not inherited.)"""


class Supervisor:
    def __init__(self, node_pid: int, grace: float, command: str,
                 pid_fd: Optional[int] = None) -> None:
        self.node_pid = node_pid
        self.grace = grace
        self.command = command
        self.pid_fd = pid_fd
        #: Whether a shell stays between this process and the server (L{exec_last} declined).
        self.shell_between = True

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
            script = exec_last(self.command)
            self.shell_between = script is None
            child = subprocess.Popen(["/bin/sh", "-c", script or self.command], close_fds=True)
            self.report_pid(child.pid)
            _, status = os.waitpid(child.pid, 0)
        except _NodeDied:
            self.stop_group()
            return 1
        signal.signal(_NODE_DIED, signal.SIG_IGN)
        return self.finish(status)

    def stop_group(self) -> None:
        """The node is gone: SIGTERM the group and the processes of this run that left it,
        wait C{grace}, SIGKILL them (this process too)."""
        signal.signal(_NODE_DIED, signal.SIG_IGN)
        pgid = os.getpgid(0)
        me = os.getpid()
        self._signal_escaped(signal.SIGTERM)
        try:
            os.killpg(pgid, signal.SIGTERM)
        except OSError:
            pass
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            try:
                others: list[Optional[int]] = [
                    p for p in group_members(pgid) + self._escaped() if p != me]
            except OSError:
                others = [None]
            if not others:
                break
            time.sleep(_POLL)
        self._signal_escaped(signal.SIGKILL)
        os.killpg(pgid, signal.SIGKILL)

    def report_pid(self, pid: int) -> None:
        """Tell the node the server's pid, on the descriptor it gave, and close that."""
        if self.pid_fd is None:
            return
        try:
            os.write(self.pid_fd, b"%d\n" % pid)
            os.close(self.pid_fd)
        except OSError:
            pass

    @staticmethod
    def _escaped() -> list[int]:
        run_id = os.environ.get(RUN_VARIABLE)
        return escaped_members(run_id, os.getpgid(0)) if run_id else []

    def _signal_escaped(self, signum: int) -> None:
        signal_all(self._escaped(), signum)

    def finish(self, status: int) -> int:
        """Exit the way the command did; a shell's 128+N counts as signal N."""
        signum = None
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
        elif (self.shell_between and os.WIFEXITED(status)
              and 128 < os.WEXITSTATUS(status) < 128 + signal.NSIG):
            signum = os.WEXITSTATUS(status) - 128
        if signum is not None:
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


def main(args: list[str]) -> None:
    node_pid, grace, command, pid_fd = None, 10.0, None, None
    i = 0
    while i < len(args):
        if args[i] == "--node-pid":
            node_pid = int(args[i + 1])
            i += 2
        elif args[i] == "--grace":
            grace = float(args[i + 1])
            i += 2
        elif args[i] == "--pid-fd":
            pid_fd = int(args[i + 1])
            i += 2
        elif args[i] == "--":
            command = " ".join(args[i + 1:])
            break
        else:
            sys.exit(f"llmnode supervisor: unknown argument {args[i]!r}")
    if node_pid is None or command is None:
        sys.exit("usage: supervisor --node-pid N [--grace S] [--pid-fd FD] -- COMMAND")
    sys.exit(Supervisor(node_pid, grace, command, pid_fd).run())


if __name__ == "__main__":
    main(sys.argv[1:])
