"""C{GET /v1/models} and C{GET /v1/models/{name}}: the node's models in OpenAI's list shape."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.web.resource import Resource

from llmnode.errors import ModelNotFound
from llmnode.web.responses import method_not_allowed, render_error, render_json

if TYPE_CHECKING:
    from llmnode.web.request import WebRequest

    from llmnode.node import ModelRuntime, Node

_ALLOWED = ("GET", "HEAD")


def model_entries(node: Node, created: int) -> list[dict[str, Any]]:
    """Every model id (config order), then every alias, flagged with C{llmnode.alias_of}."""
    runtimes = node.runtimes()
    entries = [_entry(runtime, runtime.model.id, created) for runtime in runtimes]
    for runtime in runtimes:
        entries.extend(_entry(runtime, alias, created) for alias in runtime.model.aliases)
    return entries


def _entry(runtime: ModelRuntime, name: str, created: int) -> dict[str, Any]:
    model = runtime.model
    extra = {"mode": model.mode, "endpoints": sorted(model.served), "state": runtime.state}
    if name != model.id:
        extra["alias_of"] = model.id
    return {"id": name, "object": "model", "created": created, "owned_by": "llmnode",
            "llmnode": extra}


class ModelsResource(Resource):
    """The model listing; a trailing name (which may contain slashes) picks one entry.

    @param created: the C{created} timestamp reported for every model (the node's start).
    """

    isLeaf = True

    def __init__(self, node: Node, created: int) -> None:
        super().__init__()
        self._node = node
        self._created = created

    def render(self, request: WebRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, _ALLOWED)
        name = _name(request.postpath)
        if name is None:
            return render_json(request, 200, {
                "object": "list", "data": model_entries(self._node, self._created)})
        runtime = self._node.lookup(name)
        if runtime is None:
            return render_error(request, ModelNotFound(
                f"the model {name[:200]!r} does not exist on this node", param="model"))
        return render_json(request, 200, _entry(runtime, name, self._created))


def _name(postpath: list[bytes]) -> Optional[str]:
    if postpath in ([], [b""]):
        return None
    return b"/".join(postpath).decode("utf-8", "replace")
