"""The request as the node's resources see it."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from twisted.web.server import Request

    from llmnode.web.server import NodeRequest

    #: A request as the resource tree gets it: twisted.web's, or this server's.
    WebRequest: TypeAlias = "Request | NodeRequest"
