"""The node's resource tree: C{/v1} (the proxy), C{/rerank} and llama.cpp's native routes,
C{/upstream} (passthrough), C{/api} (management), C{/metrics}, and C{/health} (the same answer
as C{/api/health}, where load balancers look first)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.web.resource import Resource, getChildForRequest

from llmnode.web.api import ApiResource, HealthResource
from llmnode.web.auth import Guard
from llmnode.web.responses import ErrorResource
from llmnode.web.cors import Cors
from llmnode.web.metrics import MetricsResource
from llmnode.web.proxy import V1Resource, mount
from llmnode.web.upload import STREAM_ABOVE
from llmnode.web.upstream import UpstreamResource

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from llmnode.config import Model, Program
    from llmnode.errors import NodeError
    from llmnode.node import Node
    from llmnode.web.backend_http import BackendHTTP
    from llmnode.web.logs import LogSource
    from llmnode.web.request import WebRequest
    from llmnode.web.server import NodeRequest


class Root(Resource):
    """Unknown paths, and C{/} itself, answer an OpenAI-shaped 404.

    With a L{Guard}, every child is reached only past its key check (a 401 otherwise), so a
    child added later (C{/metrics}) is protected like the rest.
    """

    def __init__(self, guard: Optional[Guard] = None) -> None:
        super().__init__()
        self.guard = guard
        self.proxy: Optional[V1Resource] = None

    def close(self) -> None:
        """Stop what the tree runs on its own (the proxy's timer)."""
        if self.proxy is not None:
            self.proxy.close()

    def getChildWithDefault(self, path: bytes, request: WebRequest) -> Resource:
        if self.guard is not None and self.guard.closed:
            denied = self.guard.check(path, request)
            if denied is not None:
                return denied
        child: Resource = super().getChildWithDefault(path, request)
        return child

    def refuse_early(self, request: NodeRequest) -> Optional[tuple[NodeError, bytes]]:
        """C{(error, header lines)} when C{request} lacks the key its path needs, judged from
        its head alone: the server answers it before reading its body (see
        L{llmnode.web.server}); None lets the request on."""
        if self.guard is None or not self.guard.closed or not request.postpath:
            return None
        segment = request.postpath[0]
        request.postpath = request.postpath[1:]
        denied = self.guard.check(segment, request)
        if denied is None:
            return None
        error, challenge = denied.refusal()
        return error, b"WWW-Authenticate: " + challenge + b"\r\n"

    def streams_body(self, request: NodeRequest, length: int) -> bool:
        """Whether the body of C{request} (its head; C{length} bytes) is to reach its resource
        as it arrives (see L{llmnode.web.server}): a large upload to an endpoint that streams
        uploads to its backend."""
        if length <= STREAM_ABOVE:
            return False
        return getattr(getChildForRequest(self, request), "streams_uploads", False)

    def getChild(self, path: bytes, request: WebRequest) -> Resource:
        return ErrorResource()

    def render(self, request: WebRequest) -> bytes:
        return ErrorResource().render(request)


class CorsRoot(Root):
    """A L{Root} whose answers carry the headers of a L{Cors} policy, and which answers
    preflights before the key check. (A node without CORS uses L{Root}: no test per
    request.)"""

    def __init__(self, guard: Optional[Guard] = None, *, cors: Cors) -> None:
        super().__init__(guard)
        self.cors = cors

    def getChildWithDefault(self, path: bytes, request: WebRequest) -> Resource:
        preflight = self.cors.check(request)
        if preflight is not None:
            return preflight
        return super().getChildWithDefault(path, request)

    def refuse_early(self, request: NodeRequest) -> Optional[tuple[NodeError, bytes]]:
        """L{Root.refuse_early}, its 401 carrying the CORS headers like any other answer."""
        refusal = super().refuse_early(request)
        origin = request.getHeader(b"Origin")
        if refusal is None or origin is None or not self.cors.allows(origin):
            return refusal
        error, headers = refusal
        return error, (headers + b"Access-Control-Allow-Origin: " + origin
                       + b"\r\nVary: Origin\r\n")


def build_root(node: Node, backends: BackendHTTP, clock: IReactorTime, program: Program, *,
               devices: Callable[[], list[dict[str, Any]]],
               reload: Callable[[], dict[str, Any]], node_log: Optional[LogSource] = None,
               model_log: Optional[Callable[[Model], LogSource]] = None,
               ready: Callable[[], bool] = lambda: True) -> Root:
    """The whole tree for one node, behind the keys of C{program}; C{reload}, C{node_log}
    and C{model_log} as L{ApiResource} takes them.

    @param ready: whether the node knows its devices yet (see L{HealthResource}).
    """
    if program.cors_origins:
        root: Root = CorsRoot(Guard(program), cors=Cors(program.cors_origins))
    else:
        root = Root(Guard(program))
    root.proxy = proxy = mount(root, node, backends, clock, program)
    root.putChild(b"upstream", UpstreamResource(node, proxy.forwarder))
    api = ApiResource(node, clock, devices=devices, reload=reload, node_log=node_log,
                      model_log=model_log, ready=ready)
    root.putChild(b"api", api)
    root.putChild(b"health", HealthResource(api))
    root.putChild(b"metrics", MetricsResource(node, devices))
    return root
