"""The node's own log: twisted's plain text lines or one JSON object per line, filtered by level.

Under twistd the observer is installed as the application's C{ILogObserver} component, which
twistd's log setup uses instead of its own; L{twistd_log_stream} picks the same destination
twistd would have (C{--logfile}, or stdout with C{-n}).
"""

from __future__ import annotations

import json
import sys
from collections import deque
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping, Optional, cast

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, eventAsText,
                            formatEventAsClassicLogText, textFileLogObserver)
from twisted.python.logfile import LogFile
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.logger import LogEvent
    from twisted.python.components import Componentized

    from llmnode.config import Program

#: Config level names (C{program.log_level}) -> twisted log levels.
LEVELS = {
    "DEBUG": LogLevel.debug,
    "INFO": LogLevel.info,
    "WARNING": LogLevel.warn,
    "ERROR": LogLevel.error,
    "CRITICAL": LogLevel.critical,
}
_LEVEL_NAMES = {level: name for name, level in LEVELS.items()}

#: Longest C{text} of one JSON line, in characters (tracebacks included).
MAX_TEXT = 32768


def json_record(event: LogEvent) -> dict[str, Any]:
    """The JSON object for one log event: C{time}, C{level}, C{namespace}, C{text}."""
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    if len(text) > MAX_TEXT:
        text = f"{text[:MAX_TEXT]}…[truncated {len(text) - MAX_TEXT} characters]"
    when = event.get("log_time")
    stamp = (datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
             if isinstance(when, (int, float)) else None)
    return {"time": stamp, "level": _LEVEL_NAMES.get(event.get("log_level"), "INFO"),
            "namespace": event.get("log_namespace") or "", "text": text}


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each event to C{stream} as one JSON object and a newline."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        try:
            line = json.dumps(json_record(event), ensure_ascii=False, default=str)
        except Exception as e:
            line = json.dumps({"time": None, "level": "ERROR", "namespace": __name__,
                               "text": f"unformattable log event: {str(e)[:200]}"})
        self._stream.write(line + "\n")
        self._stream.flush()


def make_observer(program: Program, stream: IO[str]) -> ILogObserver:
    """The node's observer for C{program.log_format} and C{program.log_level}, on C{stream}."""
    observer: ILogObserver
    if program.log_format == "json":
        observer = JSONLineObserver(stream)
    else:
        observer = textFileLogObserver(stream)
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(LEVELS[program.log_level])])


def customised(program: Program) -> bool:
    """Whether C{program} asks for anything but twistd's own log (plain text, INFO)."""
    return program.log_format != "text" or program.log_level != "INFO"


def twistd_log_stream(server_options: Optional[Mapping[str, Any]]) -> Optional[IO[str]]:
    """Where twistd would log given its parsed C{ServerOptions}; None where twistd must choose.

    C{--logfile PATH} -> that file (rotated like twistd's), C{-n} without it -> stdout, a daemon
    without it -> C{twistd.log}. None for C{--syslog}, a custom C{--logger}, and C{--logfile -}
    without C{-n} (twistd refuses that itself).
    """
    if server_options is None:
        return None
    if server_options.get("syslog") or server_options.get("logger"):
        return None
    path = server_options.get("logfile") or ""
    nodaemon = bool(server_options.get("nodaemon"))
    if path == "-" or (not path and nodaemon):
        return sys.stdout if nodaemon else None
    return cast("IO[str]", LogFile.fromFullPath(path or "twistd.log"))


def install_observer(application: Componentized, program: Program, stream: IO[str]) -> None:
    """Make twistd log through the node's observer (set before twistd starts logging)."""
    application.setComponent(ILogObserver, make_observer(program, stream))


class Followers:
    """Whoever follows a log: each listener gets every batch of new lines."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[list[str]], None]] = []

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def add(self, listener: Callable[[list[str]], None]) -> Callable[[], None]:
        """Start calling C{listener(lines)}; returns the function that stops it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def tell(self, lines: list[str], failed: Callable[[], None] = lambda: None) -> None:
        """Hand C{lines} to every listener; C{failed()} is called inside the handler of a
        listener's exception (nothing the reactor calls may raise)."""
        for listener in list(self._listeners):
            try:
                listener(lines)
            except Exception:
                failed()


#: Lines of the node's own log kept in memory for C{GET /api/logs}.
KEPT_LINES = 2000


@implementer(ILogObserver)
class LogBuffer:
    """The node's own log lines, kept in memory (the last L{KEPT_LINES}) and handed to
    followers as they are logged, for C{GET /api/logs}: twistd's log may go to stdout, where
    the node cannot read it back.

    Add it to the log publisher with L{observer}, which filters by C{program.log_level}.
    """

    def __init__(self, keep: int = KEPT_LINES) -> None:
        self._kept: deque[str] = deque(maxlen=keep)
        self._followers = Followers()

    def observer(self, program: Program) -> ILogObserver:
        """This buffer behind the node's level filter."""
        return FilteringLogObserver(self, [LogLevelFilterPredicate(LEVELS[program.log_level])])

    def __call__(self, event: LogEvent) -> None:
        try:
            text = formatEventAsClassicLogText(event)
        except Exception:
            return
        if not text:
            return
        lines = [line[:MAX_TEXT] for line in text.rstrip("\n").split("\n")]
        self._kept.extend(lines)
        if self._followers:
            self._followers.tell(lines)  # a failure is not logged: it would come back here

    def lines(self, n: int) -> list[str]:
        """The last C{n} lines kept, oldest first."""
        if n <= 0:
            return []
        return list(self._kept)[-n:]

    def follow(self, listener: Callable[[list[str]], None]) -> Callable[[], None]:
        """Call C{listener(lines)} with every event's lines from now on; returns the function
        that stops it."""
        return self._followers.add(listener)
