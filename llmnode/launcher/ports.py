"""Who holds a port, and whether a process group still has members."""

from __future__ import annotations

import errno
import os
import socket
from typing import Optional

import psutil

from llmnode.launcher.supervisor import group_members


def describe_busy(host: str, port: int) -> Optional[str]:
    """None when C{port} is free on C{host}; else a sentence naming it and, if known, its owner."""
    if not _taken(host, port):
        return None
    owners = listeners(port)
    if not owners:
        return f"port {port} is already in use by another process"
    named = "; ".join(f"pid {pid} ({cmdline})" for pid, cmdline in owners)
    return f"port {port} is already in use by {named}"


def _taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect((host, port))
            return True
        except OSError:
            pass
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a closing connection of an earlier backend (TIME_WAIT) is no obstacle
        # to the next one, only a socket that listens is.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def listeners(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes listening on C{port}, as far as psutil can see."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return []
    pids = sorted({c.pid for c in connections
                   if c.pid and c.laddr and c.laddr.port == port
                   and c.status == psutil.CONN_LISTEN})
    found = []
    for pid in pids:
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            cmdline = "?"
        found.append((pid, cmdline[:200]))
    return found


def group_alive(pgid: int) -> bool:
    """Whether process group C{pgid} has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return bool(group_members(pgid))
    except OSError:
        return True
