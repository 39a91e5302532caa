"""The C{/v1} proxy served on a real socket in front of a fake node."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.web.resource import Resource

from llmnode.config import Program
from llmnode.web.backend_http import TreqBackends
from llmnode.web.body import max_body_bytes
from llmnode.web.proxy import mount
from tests.support.fake_node import FakeNode
from tests.support.net import http_client, listen_node


def serve_proxy(testcase, runtimes, program: Program = Program()) -> int:
    """Listen with the proxy (at C{/v1} and C{/rerank}) for C{runtimes}; return the port."""
    root = Resource()
    v1 = mount(root, FakeNode(runtimes), TreqBackends(http_client(testcase)), reactor, program)
    testcase.addCleanup(v1.close)
    _, port = listen_node(testcase, root, max_body_bytes=max_body_bytes(program.max_body_mb))
    return port
