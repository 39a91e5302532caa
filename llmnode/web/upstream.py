"""C{ANY /upstream/{model}/{path...}}: a model's backend reached through the node as it is.

The method, the rest of the path, the query, the headers (less hop-by-hop ones and the node's
own key) and the body go to the model's backend unchanged, and its answer comes back as it
streams, so llama.cpp's web UI, C{/props}, C{/slots} and C{/metrics} work through the node's
port. The model is started on demand, counted in flight and kept alive like a C{/v1}
request; the C{/v1} keys apply (see L{llmnode.web.auth}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llmnode.errors import BadRequest, ModelNotFound, NodeError
from llmnode.web.body import read_body
from llmnode.web.responses import ErrorResource, render_error

if TYPE_CHECKING:
    from llmnode.web.request import WebRequest

    from llmnode.node import ModelRuntime, Node
    from llmnode.web.proxy import Forwarder

log = Logger()


class UpstreamResource(Resource):
    """C{/upstream}: one child per model name.

    @param forwarder: the proxy's L{llmnode.web.proxy.Forwarder}.
    """

    def __init__(self, node: Node, forwarder: Forwarder) -> None:
        super().__init__()
        self._node = node
        self._forwarder = forwarder

    def getChild(self, path: bytes, request: WebRequest) -> Resource:
        name = path.decode("utf-8", "replace")
        runtime = self._node.lookup(name) if name else None
        if runtime is None:
            return ErrorResource(ModelNotFound(
                f"the model {name[:200]!r} does not exist on this node", param="model"))
        return UpstreamModel(self._forwarder, runtime)

    def render(self, request: WebRequest) -> bytes:
        return ErrorResource().render(request)


class UpstreamModel(Resource):
    """C{/upstream/{model}...}: everything below it goes to that model's backend."""

    isLeaf = True

    def __init__(self, forwarder: Forwarder, runtime: ModelRuntime) -> None:
        super().__init__()
        self._forwarder = forwarder
        self._runtime = runtime

    def render(self, request: WebRequest) -> bytes | int:
        uri: bytes = request.uri
        path, mark, query = uri.partition(b"?")
        parts = path.split(b"/", 3)  # b"", b"upstream", the model, the rest
        if len(parts) < 4:
            # The backend's pages link relative to their folder: /upstream/m must be
            # /upstream/m/ for them to resolve.
            request.setResponseCode(301)
            request.setHeader(b"Location", path + b"/" + mark + query)
            request.setHeader(b"Content-Type", b"text/plain")
            return b"moved to " + path + b"/\n"
        try:
            if not request.uri.isascii():
                raise BadRequest("the request target must be ASCII (percent-encode it)")
            body = read_body(request, self._forwarder.limit)
        except NodeError as e:
            return render_error(request, e)
        self._forwarder.forward(request, self._runtime, body, endpoint="upstream",
                                target=b"/" + parts[3] + mark + query)
        return NOT_DONE_YET
