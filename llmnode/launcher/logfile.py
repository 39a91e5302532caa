"""One log file per model: its backend's output, a timestamp on every line, bounded and rotated."""

from __future__ import annotations

import os
import time
from collections import deque
from datetime import datetime
from typing import BinaryIO, Callable, Optional, cast

from twisted.logger import Logger

from llmnode.logs import Followers

_log = Logger()

_TAIL_KEPT = 200

#: Bytes L{last_lines} reads at most from the end of a file (and its rotated predecessor).
_MAX_TAIL_BYTES = 4 * 2**20
_BLOCK = 65536


class _Partial:
    """The unfinished line of one stream: at most C{max_line} bytes kept, the rest counted."""

    __slots__ = ("head", "dropped")

    def __init__(self) -> None:
        self.head = bytearray()
        self.dropped = 0


class ModelLog:
    """The log file of one model, shared by its successive backends.

    Lines are timestamped, cut to C{max_line} bytes (with a C{…[truncated N bytes]} marker), and
    the file is rotated by size, keeping C{backups} old files (C{path.1} is the newest). Writing
    never blocks on a line that does not end: only its first C{max_line} bytes are buffered.

    @param clock: returns the time as seconds since the epoch (default L{time.time}).
    """

    def __init__(self, path: str, max_bytes: int = 10 * 2**20, backups: int = 3,
                 clock: Optional[Callable[[], float]] = None, max_line: int = 8192) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.max_line = max_line
        self._clock = clock or time.time
        self._file: Optional[BinaryIO] = None
        self._size = 0
        self._partials: dict[str, _Partial] = {}
        self._tail: deque[str] = deque(maxlen=_TAIL_KEPT)
        self._followers = Followers()
        #: Lines written so far: a mark for L{tail}'s C{since}.
        self.lines_written = 0

    def write(self, data: bytes, stream: str = "out") -> None:
        """Add output of C{stream}: complete lines are written, an unfinished one is kept."""
        partial = self._partials.setdefault(stream, _Partial())
        lines = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._keep(partial, data[start:])
                break
            self._keep(partial, data[start:end])
            lines.append(self._take(partial))
            start = end + 1
        self._emit(lines)

    def note(self, text: str) -> None:
        """Write a line of the node's own (e.g. "started pid 123") into the model's log."""
        self._emit([self._bound(b"[llmnode] " + text.encode("utf-8", "replace"), 0)])

    def flush(self) -> None:
        """Write out every unfinished line (the process that wrote them is gone)."""
        lines = [self._take(p) for p in self._partials.values() if p.head or p.dropped]
        self._partials.clear()
        self._emit(lines)

    def tail(self, n: int = 20, since: int = 0) -> list[str]:
        """The last C{n} lines written (without timestamps), oldest first.

        @param since: a value of L{lines_written}: only lines written after it are returned
            (one run's output, not the runs' before it).
        """
        n = min(n, self.lines_written - since)
        if n <= 0:
            return []
        return list(self._tail)[-n:]

    def lines(self, n: int) -> list[str]:
        """The last C{n} lines of the file as written (timestamps included), oldest first,
        reaching into the newest rotated file when the current one has fewer."""
        if n <= 0:
            return []
        found = last_lines(self.path, n)
        if len(found) < n and self.backups > 0:
            found = last_lines(f"{self.path}.1", n - len(found)) + found
        return found

    def follow(self, listener: Callable[[list[str]], None]) -> Callable[[], None]:
        """Call C{listener(lines)} with every batch of lines written from now on (as in the
        file, without line ends); returns the function that stops it."""
        return self._followers.add(listener)

    def close(self) -> None:
        """Flush and close the file; a later write opens it again."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _keep(self, partial: _Partial, piece: bytes) -> None:
        room = self.max_line - len(partial.head)
        if len(piece) > room:
            partial.head += piece[:max(room, 0)]
            partial.dropped += len(piece) - max(room, 0)
        else:
            partial.head += piece

    def _take(self, partial: _Partial) -> str:
        line = self._bound(bytes(partial.head).rstrip(b"\r"), partial.dropped)
        partial.head = bytearray()
        partial.dropped = 0
        return line

    def _bound(self, raw: bytes, dropped: int) -> str:
        if len(raw) > self.max_line:
            dropped += len(raw) - self.max_line
            raw = raw[:self.max_line]
        text = raw.decode("utf-8", "replace")
        if dropped:
            text += f"…[truncated {dropped} bytes]"
        return text

    def _emit(self, lines: list[str]) -> None:
        if not lines:
            return
        self._tail.extend(lines)
        self.lines_written += len(lines)
        stamp = datetime.fromtimestamp(self._clock()).astimezone().isoformat(
            timespec="milliseconds")
        for line in lines:
            record = f"{stamp} {line}\n".encode("utf-8", "replace")
            self._open()
            if self._size and self._size + len(record) > self.max_bytes:
                self._rotate()
            cast(BinaryIO, self._file).write(record)  # opened above
            self._size += len(record)
        cast(BinaryIO, self._file).flush()
        if self._followers:
            self._followers.tell([f"{stamp} {line}" for line in lines], lambda: _log.failure(
                "a follower of {path} failed", path=self.path))

    def _open(self) -> None:
        if self._file is None:
            folder = os.path.dirname(self.path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            self._file = open(self.path, "ab")
            self._size = self._file.tell()

    def _rotate(self) -> None:
        cast(BinaryIO, self._file).close()
        self._file = None
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.truncate(self.path, 0)
        self._open()


def last_lines(path: str, n: int) -> list[str]:
    """The last C{n} lines of the file at C{path} (decoded, without line ends), reading at
    most L{_MAX_TAIL_BYTES} from its end; [] when it does not exist."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return []
    with f:
        end = f.seek(0, os.SEEK_END)
        position, data = end, b""
        while position > 0 and data.count(b"\n") <= n and end - position < _MAX_TAIL_BYTES:
            step = min(_BLOCK, position)
            position -= step
            f.seek(position)
            data = f.read(step) + data
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if position > 0:
        lines = lines[1:]  # its start lies before what was read
    return [line.decode("utf-8", "replace") for line in lines[-n:]]
