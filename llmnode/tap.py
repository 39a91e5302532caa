"""twistd integration: command-line options and the service they build.

This is the only module that imports the global reactor.
"""

from __future__ import annotations

import gc
import os
import signal
from dataclasses import replace
from typing import IO, TYPE_CHECKING, Optional, cast

from twisted.application.service import MultiService
from twisted.python import usage
from twisted.python.logfile import LogFile

from llmnode.config import ConfigError, load_config
from llmnode.logs import customised, install_observer, twistd_log_stream

if TYPE_CHECKING:
    from twisted.internet import _IReactorCommon as Reactor  # the global reactor's type
    from twisted.internet.interfaces import IReactorFromThreads
    from twisted.python.components import Componentized

    from llmnode.config import Program
    from llmnode.service import NodeService


class Options(usage.Options):
    """C{twistd llmnode --config PATH [--host H] [--port P]}."""

    synopsis = "--config PATH [--host HOST] [--port PORT] [--log-dir DIR]"
    longdesc = ("Serve the models of a YAML config behind one OpenAI-compatible endpoint, "
                "starting each on demand and stopping it when idle.")
    optParameters = [
        ["config", "c", None, "the YAML config file"],
        ["host", None, None, "listen on this address instead of program.host"],
        ["port", "p", None, "listen on this port instead of program.port", int],
        ["log-dir", None, None, "write model logs here instead of program.log_dir"],
    ]

    def postOptions(self) -> None:
        path = self["config"]
        if not path:
            raise usage.UsageError("--config is required: the path of the YAML config file")
        if not os.path.isfile(path):
            raise usage.UsageError(f"config file not found: {path}")
        port = self["port"]
        if port is not None and not 0 <= port <= 65535:
            raise usage.UsageError(f"--port must be 0-65535, got {port}")
        try:
            self.loaded = load_config(path)
        except ConfigError as e:
            raise usage.UsageError(f"invalid config {path}:\n{e}")
        except OSError as e:
            raise usage.UsageError(f"cannot read config {path}: {e.strerror or e}")
        if self["log-dir"]:
            program = self.loaded.program.with_log_dir(os.path.abspath(self["log-dir"]))
            self.loaded = replace(self.loaded, program=program)


class TwistdNode(MultiService):
    """What twistd runs: the node, and (when the config asks for JSON lines or another level)
    the node's log observer, installed on twistd's application before twistd starts logging.

    @param log_stream: where that observer writes; None leaves twistd's own log in place.
    """

    def __init__(self, node: NodeService, program: Program,
                 log_stream: Optional[IO[str]] = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.node = node
        self._program = program
        self._log_stream = log_stream
        node.setServiceParent(self)  # type: ignore[no-untyped-call]

    def setServiceParent(self, parent: Componentized) -> None:
        if self._log_stream is not None:
            install_observer(parent, self._program, self._log_stream)
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]


def makeService(options: Options) -> TwistdNode:
    """Build (but do not start) the node service for parsed C{options}."""
    from twisted.internet import reactor

    from llmnode.service import NodeService

    program = options.loaded.program
    node = NodeService(options.loaded, reactor, host=options["host"], port=options["port"])
    reactor.addSystemEventTrigger("after", "startup", _stop_cleanly_on_signals, reactor)
    reactor.addSystemEventTrigger("after", "startup", _reload_on_sighup, reactor, node)
    reactor.addSystemEventTrigger("after", "startup", _settle_garbage_collector)
    stream = None
    if customised(program):
        stream = twistd_log_stream(getattr(options, "parent", None))
        if isinstance(stream, LogFile):
            _rotate_on_sigusr1(cast("IReactorFromThreads", reactor), stream)
    return TwistdNode(node, program, stream)


def _settle_garbage_collector() -> None:
    """Once started: what was loaded so far (modules, config, the resource tree) is never
    scanned by the cycle collector again."""
    gc.collect()
    gc.freeze()


def _reload_on_sighup(reactor: IReactorFromThreads, service: NodeService) -> None:
    """SIGHUP re-reads the config file, as daemons do."""
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(service.reload))


def _rotate_on_sigusr1(reactor: IReactorFromThreads, log_file: LogFile) -> None:
    """Rotate C{log_file} on SIGUSR1, as twistd does for the log file it opens itself."""
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1,
                      lambda signum, frame: reactor.callFromThread(log_file.rotate))


def _stop_cleanly_on_signals(reactor: Reactor) -> None:
    """SIGTERM is the normal way a container or init stops the node, and Ctrl-C (SIGINT) the
    way an operator stops a foreground one: both shut down in order and exit 0 (twistd's own
    handlers would re-raise the signal and exit 143 or 130). A SIGINT the node was started
    with ignored (a background job of a script) stays ignored."""
    from twisted.internet.error import ReactorNotRunning
    from twisted.logger import Logger

    def stop() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # a second signal while already stopping

    def handler(signum: int, frame: object) -> None:
        Logger().info("received {name}: stopping every model, then exiting",
                      name=signal.Signals(signum).name)
        cast("IReactorFromThreads", reactor).callFromThread(stop)

    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, handler)
