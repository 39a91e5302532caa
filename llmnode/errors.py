"""Errors that reach a client, each knowing its HTTP status and OpenAI error type."""

from __future__ import annotations

import json
from typing import Optional


class NodeError(Exception):
    """A failure to tell the client about, rendered as OpenAI-shaped JSON.

    @ivar retry_after: seconds for a C{Retry-After} header, or None.
    """

    status = 500
    type = "server_error"
    code: Optional[str] = None

    def __init__(self, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> bytes:
        """The JSON error body: C{{"error": {"message", "type", "param", "code"}}}."""
        return error_body(self.message, self.type, self.param, self.code)


class BadRequest(NodeError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(NodeError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(NodeError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(NodeError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(NodeError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(NodeError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class BodyTooLarge(NodeError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestLineTooLong(NodeError):
    status = 414
    type = "invalid_request_error"
    code = "request_line_too_long"


class Overloaded(NodeError):
    status = 429
    type = "rate_limit_error"
    code = "model_overloaded"


class HeadTooLarge(NodeError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class BadGateway(NodeError):
    status = 502
    type = "server_error"
    code = "backend_error"


class Unavailable(NodeError):
    """The model cannot be placed or started (now): 503, usually with Retry-After."""

    status = 503
    type = "server_error"
    code = "model_unavailable"


class GatewayTimeout(NodeError):
    status = 504
    type = "server_error"
    code = "backend_timeout"


def error_body(message: str, type: str = "server_error", param: Optional[str] = None,
               code: Optional[str] = None) -> bytes:
    """Serialise an OpenAI-shaped error object."""
    return json.dumps({"error": {"message": message, "type": type, "param": param,
                                 "code": code}}).encode("utf-8")
