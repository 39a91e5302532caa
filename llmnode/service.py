"""The node service: builds the node's parts, starts them in order and stops them in order.

Start: reclaim backends a previous node left behind -> devices -> listen -> sweeper -> auto_start.
Stop: stop listening -> drain in-flight requests (bounded) -> stop every backend -> close the
HTTP pool, device plugins and model logs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Optional, TypeVar, cast

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, globalLogPublisher

from llmnode.config import Config, ConfigError, Model, load_config
from llmnode.costs import CostBook, costs_path, group_usage
from llmnode.errors import BadRequest, NodeError
from llmnode.devices.loader import default_plugins
from llmnode.devices.monitor import DeviceMonitor
from llmnode.launcher import Backend, ModelLog, ports, reclaim
from llmnode.launcher.supervisor import group_members
from llmnode.logs import LogBuffer
from llmnode.node import Node, backend_environment
from llmnode.placement import Placement, free_mb
from llmnode.sweeper import Sweeper
from llmnode.web.client import BackendAgent, BackendClient, make_client
from llmnode.web.auth import warn_if_open
from llmnode.web.body import max_body_bytes
from llmnode.web.server import NodeSite
from llmnode.web.root import Root, build_root

if TYPE_CHECKING:
    from twisted.internet import _IReactorCommon as Reactor  # the global reactor's type
    from twisted.internet.address import IPv4Address
    from twisted.internet.interfaces import IListeningPort, IReactorThreads
    from twisted.logger import LogPublisher

    from llmnode.devices.interfaces import Device, IDevicePlugin

T = TypeVar("T")


def make_http_client(reactor: Reactor, connect_burst: Optional[int] = None
                     ) -> tuple[BackendClient, BackendAgent]:
    """The node's one HTTP client: treq over a lean keep-alive agent for local backends (see
    L{llmnode.web.client}), no redirects, a cookie jar that keeps nothing (a backend's cookies
    must never reach another user's request). Close it with the agent's
    C{closeCachedConnections}.

    @param connect_burst: most connections being opened to one backend at once."""
    return make_client(reactor, connect_burst=connect_burst)


class NodeService(MultiService):
    """One llmnode: its models, devices, placement, sweeper and HTTP endpoint.

    @param host: listen address overriding C{program.host}.
    @param port: listen port overriding C{program.port} (0 = any free port).
    @param log_publisher: where the node's log events are published (default twisted's
        global publisher); L{node_log} keeps the recent ones while the node runs.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Reactor, *, host: Optional[str] = None,
                 port: Optional[int] = None, plugins: Optional[list[IDevicePlugin]] = None,
                 log_publisher: Optional[LogPublisher] = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        program = config.program
        self.config = config
        self.reactor = reactor
        self.host = program.host if host is None else host
        self.port = program.port if port is None else port
        self.runtime_dir = program.runtime_folder
        self.http, self._pool = make_http_client(reactor, connect_burst=program.connect_burst)
        self._plugins = plugins
        self.monitor: Optional[DeviceMonitor] = None
        self._logs: dict[str, ModelLog] = {}
        self.costs = CostBook(costs_path(self.runtime_dir))
        self.node = Node(config, reactor, self, costs=self.costs)
        self.sweeper = Sweeper(reactor, self.node.runtimes, program.alive_time, self.log)
        self.node_log = LogBuffer()
        self._log_publisher = globalLogPublisher if log_publisher is None else log_publisher
        self._node_log_observer = self.node_log.observer(program)
        self.site = NodeSite(build_root(self.node, self.http, reactor, program,
                                        devices=self.devices_report,
                                        reload=self.reload_config, node_log=self.node_log,
                                        model_log=self._model_log, ready=lambda: self.ready),
                             max_body_bytes=max_body_bytes(program.max_body_mb),
                             body_timeout=program.body_timeout, clock=reactor)
        self._listening: Optional[IListeningPort] = None

    # -- lifecycle -----------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for key, folder in (("log_dir", self.config.program.log_dir),
                            ("runtime_dir", self.runtime_dir)):
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise RuntimeError(f"program.{key}: cannot create {folder}: "
                                   f"{e.strerror or e}") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise RuntimeError(f"program.{key}: {folder} is not writable by this user")
        self._log_publisher.addObserver(self._node_log_observer)
        try:
            self.costs.load()
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log.warn("ignoring the learned costs in {path}: {error}",
                          path=self.costs.path, error=e)
        for pid in reclaim(self.runtime_dir, self.log):
            self.log.warn("stopped backend group {pid} left behind by a previous node", pid=pid)
        plugins = self._plugins
        if plugins is None:
            plugins = default_plugins(self.config.program.device_plugin_dir, self.log)
        self.monitor = DeviceMonitor(self.reactor, plugins, log=self.log)
        self.monitor.subscribe(self.node.devices_changed)
        self.monitor.start()
        self._listen()
        self.sweeper.start()
        warn_if_open(self.host, self.config.program, self.log)
        log_warnings(self.config, self.log)
        self.log.info("llmnode serving {n} models on http://{host}:{port}",
                      n=len(self.config.models), host=self.host, port=self.listening_port)
        for runtime in self.node.runtimes():
            if runtime.model.auto_start:
                runtime.start().addErrback(  # type: ignore[call-overload]
                    lambda f, m=runtime.model.id: self.log.warn(
                        "auto_start of {model} failed: {error}", model=m,
                        error=f.getErrorMessage()))

    def reload(self) -> Optional[dict[str, Any]]:
        """Re-read the config file (SIGHUP); an invalid file is logged and changes nothing."""
        try:
            return self.reload_config()
        except NodeError as e:
            self.log.error("config reload rejected: {error}", error=e.message)
            return None

    def reload_config(self) -> dict[str, Any]:
        """Re-read the node's config file and switch to it (see L{Node.reload}); SIGHUP and
        C{POST /api/config/reload} both come here.

        The outcome carries the file's C{warnings} (unknown keys, ...), which are logged too.

        @raise BadRequest: the file is unreadable or invalid; the old config stays in force.
        """
        path = self.node.config.path
        try:
            config = load_config(cast(str, path))  # a config loaded from a file
        except ConfigError as e:
            raise BadRequest(f"the new config is invalid; the old one stays in force:\n{e}")
        except OSError as e:
            raise BadRequest(f"cannot read {path}: {e.strerror or e}; the old config stays "
                             f"in force")
        log_warnings(config, self.log)
        outcome = dict(self.node.reload(config), warnings=list(config.warnings))
        self.log.info("config reloaded from {path}: {outcome}", path=path, outcome=outcome)
        return outcome

    def _listen(self) -> None:
        if self._listening is None:
            self._listening = self.reactor.listenTCP(self.port, self.site, backlog=1024,
                                                     interface=self.host)

    @property
    def ready(self) -> bool:
        """Whether the node has read its devices once (health says C{starting} until then)."""
        return self.monitor is not None and self.monitor.known

    def when_ready(self) -> defer.Deferred[None]:
        """A Deferred that fires once L{ready}; call it after L{startService}."""
        return cast(DeviceMonitor, self.monitor).when_known().addCallback(lambda _: None)

    @property
    def listening_port(self) -> Optional[int]:
        """The TCP port actually listened on (useful with port 0)."""
        if self._listening is None:
            return None
        return cast("IPv4Address", self._listening.getHost()).port

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        stopping = defer.Deferred.fromCoroutine(self._stop())
        return stopping.addBoth(self._forget_log_observer)

    def _forget_log_observer(self, result: T) -> T:
        self._log_publisher.removeObserver(self._node_log_observer)
        return result

    async def _stop(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            await cast("defer.Deferred[None]", listening.stopListening())
        await self._drain(self.config.program.shutdown_timeout)
        self.sweeper.stop()
        await self.node.shutdown()
        cast(Root, self.site.resource).close()
        if self.monitor is not None:
            await self.monitor.close()
        await self._pool.closeCachedConnections()
        for log in self._logs.values():
            log.close()
        self._report_left_running()

    def _report_left_running(self) -> None:
        """Say that no backend is left, unless a model's port is still listened on."""
        left = [(model, owners) for model in self.config.models
                for owners in [ports.listeners(model.port)] if owners]
        for model, owners in left:
            self.log.error("llmnode stopped, but port {port} of {model} is still listened on "
                           "by {owners}", port=model.port, model=model.id,
                           owners="; ".join(f"pid {pid} ({command})" for pid, command in owners))
        if not left:
            self.log.info("llmnode stopped; no backend left running")

    async def _drain(self, timeout: float) -> None:
        """Wait until no request is in flight, at most C{timeout} seconds."""
        idle = self.node.idle()
        idle.addTimeout(timeout, self.reactor)
        try:
            await idle
        except defer.TimeoutError:
            self.log.warn("requests still in flight after {timeout:g} s; stopping anyway",
                          timeout=timeout)

    # -- NodeEffects -------------------------------------------------------------------------

    def measure(self, pgid: int, devices: Mapping[str, Device]) -> defer.Deferred[dict[str, float]]:
        threads = cast("IReactorThreads", self.reactor)
        return deferToThreadPool(threads, threads.getThreadPool(), group_usage,
                                 pgid, devices, group_members)

    def refresh_devices(self) -> defer.Deferred[Optional[Mapping[str, Device]]]:
        if self.monitor is None:
            return defer.succeed(None)
        return cast("defer.Deferred[Optional[Mapping[str, Device]]]", self.monitor.refresh())

    def log_path(self, model: Model) -> str:
        return os.path.join(self.config.program.log_dir, f"{model.id}.log")

    def _model_log(self, model: Model) -> ModelLog:
        if model.id not in self._logs:
            self._logs[model.id] = ModelLog(self.log_path(model))
        return self._logs[model.id]

    def make_backend(self, model: Model, placement: Placement) -> Backend:
        plan, program = placement.plan, self.config.program
        return Backend(self.reactor, model_id=model.id, command=plan.script_path,
                       env=backend_environment(model, placement), cwd=self.config.base_dir,
                       port=model.port, health_path=model.health_path,
                       health_interval=program.health_interval,
                       start_timeout=model.start_timeout, stop_timeout=model.stop_timeout,
                       stop_command=plan.stop_command, log=self._model_log(model),
                       runtime_dir=self.runtime_dir, http=self.http)

    def devices_report(self) -> list[dict[str, Any]]:
        """Each device: total, free (reported), reserved, available and which models hold it."""
        if self.monitor is None:
            return []
        report: list[dict[str, Any]] = []
        ledger = self.node.scheduler.ledger
        for device in self.monitor.devices.values():
            reserved = ledger.reserved_mb(device.id)
            report.append({
                "id": device.id, "kind": device.kind, "name": device.name,
                "total_mb": device.total_mb, "free_mb": device.free_mb,
                "reserved_mb": reserved,
                "available_mb": free_mb(device, ledger),
                "utilization": device.utilization, "temperature": device.temperature,
                "models": dict(ledger.holders(device.id)),
            })
        return report


def log_warnings(config: Config, logger: Logger) -> None:
    """Log each warning of a loaded C{config} (an unknown key is likely a misspelled one)."""
    for warning in config.warnings:
        logger.warn("config {path}: {finding}", path=config.path, finding=warning)
