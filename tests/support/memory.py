"""HTTP in memory, for tests whose subject is not the socket.

L{MemoryNet} is a fake reactor (a L{MemoryReactorClock}) on which C{listenTCP} and
C{connectTCP} pair real protocols through C{twisted.test.iosim} pumps: the node's own server
(L{llmnode.web.server.NodeSite}) and its own backend client run unchanged over it, and time
is the reactor's clock. L{MemoryNode} is a whole L{NodeService} on it whose backends are the
demo backend's resource (L{DemoResource}) served in memory: no process, no socket, no sleep.
"""

from __future__ import annotations

import json
import os
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Optional

from treq.client import HTTPClient
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from twisted.web.server import Site
from zope.interface import implementer

from llmnode.config import Config, Model, Program, load_config
from llmnode.demo.backend import BackendOptions, BackendStats, DemoResource
from llmnode.devices import Device
from llmnode.devices.interfaces import IDevicePlugin
from llmnode.service import NodeService
from llmnode.web.body import max_body_bytes
from llmnode.web.backend_http import TreqBackends
from llmnode.web.proxy import mount
from llmnode.web.request import TwistedSite
from llmnode.web.server import NodeSite
from tests.support.fake_node import FakeNode
from tests.support.nodes import write_config


class _ThreadPool:
    """Runs "threaded" work at once, on the caller's stack (see L{MemoryNet.getThreadPool})."""

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs):
        try:
            result = function(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class _Listening:
    """What C{listenTCP} returns: the port, until C{stopListening}."""

    def __init__(self, net: "MemoryNet", port: int, factory) -> None:
        self._net, self.port, self.factory = net, port, factory

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self) -> Deferred:
        if self._net._servers.get(self.port) is self.factory:
            del self._net._servers[self.port]
            self.factory.doStop()
        return succeed(None)


class MemoryNet(MemoryReactorClock):
    """A reactor whose TCP is in memory: connections to a port something listens on are
    made on the next turn; to any other port they are refused. L{flush} moves the bytes;
    C{advance} moves the clock (and L{run} does both)."""

    def __init__(self) -> None:
        super().__init__()
        self._servers: dict[int, Any] = {}
        self._pumps: list[iosim.IOPump] = []
        self._next_port = 40000

    # -- IReactorTCP ------------------------------------------------------------------------

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port == 0:
            self._next_port += 1
            port = self._next_port
        if port in self._servers:
            raise CannotListenError(interface, port, OSError("address already in use"))
        self._servers[port] = factory
        factory.doStart()
        return _Listening(self, port, factory)

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        connector = super().connectTCP(host, port, factory, timeout, bindAddress)
        self.callLater(0, self._connect, connector, host, port, factory)
        return connector

    def _connect(self, connector, host, port, factory) -> None:
        if connector.stoppedConnecting:
            return
        server_factory = self._servers.get(port)
        if server_factory is None:
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            return
        server_address = IPv4Address("TCP", "127.0.0.1", port)
        client_address = IPv4Address("TCP", "127.0.0.1", 50000 + len(self._pumps))
        server = server_factory.buildProtocol(client_address)
        client = factory.buildProtocol(server_address)
        if server is None or client is None:
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            return
        self._pumps.append(iosim.connect(
            server, iosim.FakeTransport(server, True, server_address, client_address),
            client, iosim.FakeTransport(client, False, client_address, server_address),
            greet=False, clock=self, debug=bool(os.environ.get("IODEBUG"))))

    # -- threads (the node reads devices and large bodies "off the reactor thread") --------

    def getThreadPool(self) -> _ThreadPool:
        return _ThreadPool()

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.callLater(0, f, *args, **kwargs)

    # -- driving ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Run what is due now and move bytes both ways on every connection until nothing
        moves."""
        for _ in range(10000):
            self.advance(0)
            moved = False
            for pump in list(self._pumps):
                if pump.pump(advanceClock=False):
                    moved = True
                if pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self._pumps.remove(pump)
            if not moved and not any(call.getTime() <= self.seconds()
                                     for call in self.getDelayedCalls()):
                return
        raise AssertionError("the in-memory network never settled")

    def run(self, seconds: float, step: float = 0.05) -> None:
        """Let C{seconds} pass in C{step}s, flushing at each."""
        self.flush()
        end = self.seconds() + seconds
        while self.seconds() < end:
            self.advance(min(step, end - self.seconds()))
            self.flush()

    def wait(self, d: Deferred, limit: float = 60.0, step: float = 0.05) -> Any:
        """The result of C{d}, letting up to C{limit} seconds pass for it; raise its failure."""
        results: list = []
        d.addBoth(results.append)
        self.flush()
        end = self.seconds() + limit
        while not results and self.seconds() < end:
            self.advance(step)
            self.flush()
        if not results:
            raise AssertionError(f"nothing came within {limit} s (in-memory time)")
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def connect(self, port: int, protocol):
        """Connect C{protocol} to C{port} (a raw client); return it once connected."""
        return self.wait(connectProtocol(TCP4ClientEndpoint(self, "127.0.0.1", port), protocol))

    def client(self) -> HTTPClient:
        """A treq client whose connections go over this network."""
        return HTTPClient(Agent.usingEndpointFactory(self, _Endpoints(self)),
                          data_to_body_producer=_Body)


@implementer(IBodyProducer)
class _Body:
    """A request body written whole at once (treq's default producer runs on the global
    reactor's cooperator)."""

    def __init__(self, body) -> None:
        self.body = body.encode() if isinstance(body, str) else bytes(body)
        self.length = len(self.body)

    def startProducing(self, consumer) -> Deferred:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IAgentEndpointFactory)
class _Endpoints:
    def __init__(self, net: MemoryNet) -> None:
        self._net = net

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(self._net, uri.host.decode(), uri.port)


def serve_demo(net: MemoryNet, port: int = 0, **options) -> tuple[_Listening, DemoResource]:
    """Serve the demo backend's resource (with C{options} as its command line would give
    them) on C{port} of C{net}; where it listens, and the resource."""
    resource = DemoResource(BackendOptions(port=port, **options), net,
                            BackendStats(pid=os.getpid(), started=net.seconds()),
                            exit=lambda status: None, wallclock=net.seconds)
    return net.listenTCP(port, Site(resource, reactor=net)), resource


class _Calls:
    """Requests to a server on a L{MemoryNet} (C{net}, C{url}, C{http_client})."""

    net: MemoryNet
    url: str
    http_client: HTTPClient

    def call(self, method: str, path: str, body: Any = None, headers: Optional[dict] = None,
             **kwargs) -> tuple[Any, bytes]:
        """Send one request and read the whole answer: C{(response, body)}. A C{body} that is
        not bytes is sent as JSON."""
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        response = self.net.wait(self.http_client.request(
            method, self.url + path, data=body, headers=headers, **kwargs))
        return response, self.net.wait(response.content())

    def call_json(self, method: str, path: str, body: Any = None,
                  headers: Optional[dict] = None) -> tuple[int, Any, Any]:
        """L{call}, the answer decoded: C{(status, JSON, headers)}."""
        response, content = self.call(method, path, body, headers)
        return response.code, json.loads(content), response.headers


class MemoryBackend:
    """A backend run that serves the demo resource on the model's port of a L{MemoryNet}:
    it starts after C{start_delay} seconds (or fails with C{fail}), stops at once, and
    L{crash} ends it as an exit would.

    @ivar pid: a made-up process id (never a real process).
    """

    _pids = iter(range(900000, 10**9))

    def __init__(self, net: MemoryNet, model: Model, start_delay: float = 0.0,
                 fail: Optional[str] = None, **options) -> None:
        self.pid = next(self._pids)
        self.server_pid = self.pid + 1
        self._net, self._model = net, model
        self._delay, self._fail, self._options = start_delay, fail, options
        self._listening = None
        self._exits: list[Deferred] = []
        self.resource: Optional[DemoResource] = None

    async def start(self) -> None:
        if self._delay:
            pause: Deferred = Deferred()
            self._net.callLater(self._delay, pause.callback, None)
            await pause
        if self._fail is not None:
            raise RuntimeError(self._fail)
        self._listening, self.resource = serve_demo(self._net, self._model.port,
                                                    **self._options)

    @property
    def serving(self) -> bool:
        """Whether the run serves its port: it has started and not ended."""
        return self._listening is not None

    def stop(self) -> Deferred:
        self._end(None)
        return succeed(None)

    def exited(self) -> Deferred:
        d: Deferred = Deferred()
        self._exits.append(d)
        return d

    def crash(self, status: str = "exit status 3") -> None:
        """The backend exits on its own with C{status}."""
        self._end(status)

    def _end(self, status: Optional[str]) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            listening.stopListening()
        exits, self._exits = self._exits, []
        for d in exits:
            d.callback(status or "stopped")


@implementer(IDevicePlugin)
class CpuPlugin:
    """One cpu device of C{total_mb}, read at once."""

    name = "memory-cpu"

    def __init__(self, total_mb: int = 64000) -> None:
        self.total_mb = total_mb

    def devices(self) -> list[Device]:
        return [Device(id="cpu", kind="cpu", name="cpu", total_mb=self.total_mb,
                       free_mb=self.total_mb)]


class MemoryNode(NodeService, _Calls):
    """A whole node on a L{MemoryNet}; each model's backend is a L{MemoryBackend} built with
    C{backends[model id]} (keyword arguments) if given.

    @ivar runs: every backend run made, in order.
    """

    def __init__(self, config: Config, net: MemoryNet, *,
                 backends: Optional[dict[str, dict]] = None, **kwargs) -> None:
        kwargs.setdefault("plugins", [CpuPlugin()])
        super().__init__(config, net, host="127.0.0.1", port=0, **kwargs)
        self.net = net
        self._backend_options = backends or {}
        self.runs: list[MemoryBackend] = []
        self.http_client = net.client()

    def make_backend(self, model, placement):
        run = MemoryBackend(self.net, model, **self._backend_options.get(model.id, {}))
        self.runs.append(run)
        return run

    def measure(self, pgid, devices):
        return succeed({})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listening_port}"

def start_memory_node(testcase, models: dict, *, backends: Optional[dict[str, dict]] = None,
                      net: Optional[MemoryNet] = None, wait_ready: bool = True,
                      **program) -> MemoryNode:
    """A L{MemoryNode} of C{models} (mappings as in a config file) with C{program} settings,
    on C{net} (a new one by default), started; stopped when the test ends.

    @param wait_ready: return only once the node has read its devices."""
    net = MemoryNet() if net is None else net
    config = load_config(write_config(testcase, models, **program))
    node = MemoryNode(config, net, backends=backends)
    node.startService()
    testcase.addCleanup(lambda: net.wait(node.stopService()) if node.running else None)
    if wait_ready:
        net.wait(node.when_ready())
    return node


def memory_model(port: int, mode: str = "Chat", memory_mb: int = 64, **keys) -> dict:
    """A model mapping for L{memory_node} (its script is never run)."""
    model = {"mode": mode, "port": port,
             "Plan": {"required_devices": ["cpu"], "script_path": "true",
                      "memory_mb": {"cpu": memory_mb}}}
    model.update(keys)
    return model


class MemoryProxy(_Calls):
    """The C{/v1} proxy (and C{/rerank}) mounted on C{root} in front of a fake node of
    C{runtimes}, served by the node's server on a L{MemoryNet}; its client to backends is
    treq over the same network (through L{TreqBackends}) (a backend is whatever listens there: L{serve_demo}, a
    L{Site}). With C{twisted_web}, twisted.web serves it (L{TwistedSite})."""

    def __init__(self, testcase, runtimes, program: Program = Program(),
                 root: Optional[Resource] = None, net: Optional[MemoryNet] = None,
                 twisted_web: bool = False) -> None:
        self.net = net = MemoryNet() if net is None else net
        self.root = Resource() if root is None else root
        pool = HTTPConnectionPool(net, persistent=True)
        pool.retryAutomatically = False
        backends = HTTPClient(Agent.usingEndpointFactory(net, _Endpoints(net), pool=pool),
                              cookiejar=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
                              data_to_body_producer=_Body)
        self.v1 = mount(self.root, FakeNode(runtimes), TreqBackends(backends), net, program)
        testcase.addCleanup(self.v1.close)
        if twisted_web:  # twisted.web's own server instead of the node's
            self.site: NodeSite | TwistedSite = TwistedSite(self.root, reactor=net)
        else:
            self.site = NodeSite(self.root, max_body_bytes=max_body_bytes(program.max_body_mb),
                                 clock=net)
        self.port = net.listenTCP(0, self.site).getHost().port
        self.url = f"http://127.0.0.1:{self.port}"
        self.http_client = net.client()
