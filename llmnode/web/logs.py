"""Logs over HTTP: C{GET /api/logs} (the node's own) and C{GET /api/models/{id}/logs}.

C{?lines=N} answers the last N lines as plain text; C{?follow=1} answers them as server-sent
events (C{data: LINE}), then every new line as it is written, until the client leaves. A slow
follower holds back at most L{LogStream.max_held} lines and is told how many it missed: a
follower never makes the node grow.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable, Protocol

from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from llmnode.errors import BadRequest
from llmnode.web.responses import ErrorResource, method_not_allowed, PendingResponse, render_error

if TYPE_CHECKING:
    from llmnode.web.request import WebRequest

#: Lines answered when C{?lines} is not given, and the most C{?lines} may ask for.
DEFAULT_LINES = 100
MAX_LINES = 10000

_YES = (b"1", b"true", b"yes", b"on")


class LogSource(Protocol):
    """A log that can be read back and followed (L{llmnode.launcher.logfile.ModelLog},
    L{llmnode.logs.LogBuffer})."""

    def lines(self, n: int) -> list[str]:
        """The last C{n} lines, oldest first."""

    def follow(self, listener: Callable[[list[str]], None]) -> Callable[[], None]:
        """Call C{listener(lines)} with new lines from now on; returns how to stop it."""


class LogResource(Resource):
    """A log's tail, or its lines as they are written."""

    isLeaf = True

    def __init__(self, source: LogSource) -> None:
        super().__init__()
        self._source = source

    def render(self, request: WebRequest) -> bytes | int:
        if request.postpath not in ([], [b""]):
            return ErrorResource().render(request)
        if request.method != b"GET":
            return method_not_allowed(request, ("GET",))
        try:
            count = _lines_wanted(request.args)
        except BadRequest as e:
            return render_error(request, e)
        if request.args.get(b"follow", [b"0"])[-1].lower() in _YES:
            LogStream(request, self._source).start(count)
            return NOT_DONE_YET
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        return "".join(line + "\n" for line in self._source.lines(count)).encode("utf-8")


def _lines_wanted(args: dict[bytes, list[bytes]]) -> int:
    given = args.get(b"lines", [b"%d" % DEFAULT_LINES])[-1]
    if not given.isdigit() or int(given) > MAX_LINES:
        raise BadRequest(f"lines must be a whole number from 0 to {MAX_LINES}",
                         param="lines")
    return int(given)


def _events(lines: list[str]) -> bytes:
    return "".join("data: " + line.replace("\r", " ") + "\n\n" for line in lines).encode(
        "utf-8", "replace")


@implementer(IPushProducer)
class LogStream:
    """One follower: SSE events for the lines of a log, with the client's backpressure.

    While the client's connection is full the stream is paused; lines written meanwhile are
    held, at most L{max_held} of them (the oldest dropped), and a comment says how many were
    dropped once it resumes.
    """

    max_held = 1000

    def __init__(self, request: WebRequest, source: LogSource) -> None:
        self._source = source
        self._pending = PendingResponse(request, on_gone=self.stopProducing)
        self._held: deque[str] = deque(maxlen=self.max_held)
        self._dropped = 0
        self._paused = False
        self._unfollow: Callable[[], None] = lambda: None

    def start(self, backlog: int) -> None:
        request = self._pending.request
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        self._unfollow = self._source.follow(self._written)
        request.registerProducer(self, True)
        request.write(b": following\n\n" + _events(self._source.lines(backlog)))

    def _written(self, lines: list[str]) -> None:
        if not self._pending.open:
            return
        if self._paused:
            overflow = len(self._held) + len(lines) - self.max_held
            if overflow > 0:
                self._dropped += overflow
            self._held.extend(lines)
            return
        self._pending.request.write(_events(lines))

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._pending.open:
            return
        data = _events(list(self._held))
        if self._dropped:
            data = b": %d lines dropped while the client was slow\n\n" % self._dropped + data
        self._held.clear()
        self._dropped = 0
        if data:
            self._pending.request.write(data)

    def stopProducing(self) -> None:
        """The client left: stop following."""
        self._held.clear()
        unfollow, self._unfollow = self._unfollow, lambda: None
        unfollow()
