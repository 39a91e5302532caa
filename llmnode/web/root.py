"""The node's resource tree: C{/v1} (the proxy), C{/rerank}, and C{/api} (management)."""

from __future__ import annotations

from typing import Callable

from twisted.web.resource import Resource

from llmnode.web.api import ApiResource
from llmnode.web.common import ErrorResource
from llmnode.web.proxy import mount


class Root(Resource):
    """Unknown paths, and C{/} itself, answer an OpenAI-shaped 404."""

    def getChild(self, path, request):
        return ErrorResource()

    def render(self, request):
        return ErrorResource().render(request)


def build_root(node, http, clock, program, *, devices: Callable[[], list]) -> Root:
    """The whole tree for one node."""
    root = Root()
    mount(root, node, http, clock, program)
    root.putChild(b"api", ApiResource(node, clock, devices=devices))
    return root
