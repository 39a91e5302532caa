"""The management API under C{/api}: start, stop and report models, devices and the node, and
read their logs.

JSON in and out; errors are OpenAI-shaped like the proxy's. Nothing here blocks the reactor: a
start answers when the model is ready (or failed), from a Deferred.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llmnode import __version__
from llmnode.errors import ModelNotFound, NodeError
from llmnode.lifecycle import STATES, STOPPED
from llmnode.web.responses import (
    ErrorResource,
    method_not_allowed,
    PendingResponse,
    render_error,
    render_json,
)
from llmnode.web.logs import LogResource

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.python.failure import Failure

    from llmnode.config import Model
    from llmnode.node import ModelRuntime, Node
    from llmnode.web.logs import LogSource
    from llmnode.web.request import WebRequest

#: A JSON answer: its status and body.
Answer = tuple[int, Any]

log = Logger()


class _JSONResource(Resource):
    """A leaf answering the methods it has C{json_<METHOD>} for (HEAD like GET, without the
    body); others get a JSON 405."""

    isLeaf = True

    def render(self, request: WebRequest) -> bytes | int:
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, "json_" + ("GET" if method == "HEAD" else method), None)
        if handler is None:
            return method_not_allowed(
                request, tuple(sorted(name[5:] for name in dir(self) if name.startswith("json_"))))
        try:
            result = handler(request)
        except NodeError as e:
            return render_error(request, e)
        if isinstance(result, defer.Deferred):
            _answer_later(PendingResponse(request), result)
            return NOT_DONE_YET
        status, body = result
        return render_json(request, status, body)


def _answer_later(response: PendingResponse, d: defer.Deferred[Answer]) -> None:
    """Answer with C{d}'s (status, body) or its NodeError, unless the client left."""

    def failed(failure: Failure) -> None:
        if failure.check(NodeError):
            response.send_error(cast(NodeError, failure.value))
        else:
            log.failure("management request failed", failure)
            response.send_error(NodeError(f"internal error: {failure.getErrorMessage()}"))

    d.addCallbacks(lambda result: response.send_json(*result), failed)
    d.addErrback(lambda f: log.failure("answering a management request", f))


class _Group(Resource):
    """An inner node of the tree: unknown children and the node itself get a JSON 404."""

    def getChild(self, path: bytes, request: WebRequest) -> Resource:
        return ErrorResource()

    def render(self, request: WebRequest) -> bytes | int:
        return ErrorResource().render(request)


class HealthResource(_JSONResource):
    """C{GET /api/health} (and C{GET /health}): status, version, uptime, models by state,
    devices.

    Until the node has read its devices once it answers 503 with status C{starting}: a
    readiness probe must not send requests to a node that cannot place a model yet.
    """

    def __init__(self, api: "ApiResource") -> None:
        super().__init__()
        self.api = api

    def json_GET(self, request: WebRequest) -> Answer:
        by_state = {state: 0 for state in STATES}
        for runtime in self.api.node.runtimes():
            by_state[runtime.state] += 1
        ready = self.api.ready()
        if not ready:
            request.setHeader(b"Retry-After", b"1")
        return 200 if ready else 503, {
            "status": "ok" if ready else "starting",
            "version": __version__,
            "uptime_s": round(self.api.clock.seconds() - self.api.started_at, 3),
            "models": by_state,
            "devices": self.api.devices(),
        }


class DevicesResource(_JSONResource):
    """C{GET /api/devices}: each device's total, free and reserved memory and who holds it."""

    def __init__(self, api: "ApiResource") -> None:
        super().__init__()
        self.api = api

    def json_GET(self, request: WebRequest) -> Answer:
        return 200, {"devices": self.api.devices()}


class ModelsResource(_Group):
    """C{/api/models}: the list, C{stop-all}, and one child per model name."""

    def __init__(self, api: "ApiResource") -> None:
        super().__init__()
        self.api = api

    def getChild(self, path: bytes, request: WebRequest) -> Resource:
        name = path.decode("utf-8", "replace")
        if name == "stop-all":
            return StopAllResource(self.api)
        if name == "":
            return self
        runtime = self.api.node.lookup(name)
        if runtime is None:
            return ErrorResource(ModelNotFound(f"no model named {name[:200]!r}", param="model"))
        return ModelResource(runtime, self.api.model_log)

    def render(self, request: WebRequest) -> bytes | int:
        return _ModelList(self.api).render(request)


class _ModelList(_JSONResource):
    def __init__(self, api: "ApiResource") -> None:
        super().__init__()
        self.api = api

    def json_GET(self, request: WebRequest) -> Answer:
        return 200, {"models": [runtime.info() for runtime in self.api.node.runtimes()]}


class StopAllResource(_JSONResource):
    """C{POST /api/models/stop-all}: stop every model; answers when all are stopped."""

    def __init__(self, api: "ApiResource") -> None:
        super().__init__()
        self.api = api

    def json_POST(self, request: WebRequest) -> Answer | defer.Deferred[Answer]:
        runtimes = [r for r in self.api.node.runtimes() if r.state is not STOPPED]
        d = self.api.node.stop_all()
        d.addCallback(lambda _: (200, {"stopped": [r.model.id for r in runtimes]}))
        return d


class ModelResource(Resource):
    """C{/api/models/{alias}/(info|start|stop|logs)}.

    @param model_log: the log of a model (L{llmnode.web.logs.LogSource}), or None where
        logs are not served.
    """

    def __init__(self, runtime: ModelRuntime,
                 model_log: Optional[Callable[[Model], LogSource]] = None) -> None:
        super().__init__()
        self.runtime = runtime
        self.model_log = model_log

    def getChild(self, path: bytes, request: WebRequest) -> Resource:
        if path == b"logs" and self.model_log is not None:
            return LogResource(self.model_log(self.runtime.model))
        child = {b"info": ModelInfo, b"start": ModelStart, b"stop": ModelStop}.get(path)
        if child is None:
            return ErrorResource()
        return child(self.runtime)

    def render(self, request: WebRequest) -> bytes | int:
        return ModelInfo(self.runtime).render(request)


class _ModelLeaf(_JSONResource):
    def __init__(self, runtime: ModelRuntime) -> None:
        super().__init__()
        self.runtime = runtime


class ModelInfo(_ModelLeaf):
    def json_GET(self, request: WebRequest) -> Answer:
        return 200, self.runtime.info()


class ModelStart(_ModelLeaf):
    """Start a model; answers when it is ready, or at once with 202 given C{?wait=false}."""

    def json_POST(self, request: WebRequest) -> Answer | defer.Deferred[Answer]:
        wait = request.args.get(b"wait", [b"true"])[-1].lower() not in (b"false", b"0", b"no")
        d = self.runtime.start()
        if not wait:
            d.addErrback(lambda f: None)
            return 202, self.runtime.info()
        return d.addCallback(lambda _: (200, self.runtime.info()))


class ModelStop(_ModelLeaf):
    """Stop a model: it admits nothing new, its requests in flight finish, then it stops;
    answers once it is stopped."""

    def json_POST(self, request: WebRequest) -> Answer | defer.Deferred[Answer]:
        d = self.runtime.stop()
        return d.addCallback(lambda _: (200, self.runtime.info()))


class ReloadResource(_JSONResource):
    """C{POST /api/config/reload}: re-read the config file; an invalid one changes nothing."""

    def __init__(self, api: "ApiResource") -> None:
        super().__init__()
        self.api = api

    def json_POST(self, request: WebRequest) -> Answer | defer.Deferred[Answer]:
        return 200, self.api.reload()


class ApiResource(_Group):
    """The C{/api} tree.

    @param devices: returns the devices report (a list of JSON-ready dicts).
    @param node_log: the node's own log, served at C{/api/logs} (a
        L{llmnode.web.logs.LogSource}); C{model_log} returns a model's, served at
        C{/api/models/{alias}/logs}. None: not served.
    @param ready: whether the node knows its devices yet (health says C{starting} until then).
    @param reload: re-reads the config file and answers the outcome, or raises the
        L{NodeError} to answer (see L{llmnode.service.NodeService.reload_config}).
    """

    def __init__(self, node: Node, clock: IReactorTime, *,
                 devices: Callable[[], list[dict[str, Any]]],
                 reload: Callable[[], dict[str, Any]],
                 started_at: Optional[float] = None, node_log: Optional[LogSource] = None,
                 model_log: Optional[Callable[[Model], LogSource]] = None,
                 ready: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.node = node
        self.clock = clock
        self.devices = devices
        self.reload = reload
        self.model_log = model_log
        if node_log is not None:
            self.putChild(b"logs", LogResource(node_log))
        self.ready = ready
        self.started_at = clock.seconds() if started_at is None else started_at
        self.putChild(b"health", HealthResource(self))
        self.putChild(b"devices", DevicesResource(self))
        self.putChild(b"models", ModelsResource(self))
        config = _Group()
        config.putChild(b"reload", ReloadResource(self))
        self.putChild(b"config", config)
