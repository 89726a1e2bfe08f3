"""The HTTP server's one error shape and its one exception -> HTTP error mapping.

Every error answer is `{"error": {"type", "message"[, "param"]}}`. Messages say what to change and
never echo internals (no tracebacks, paths or huge inputs). `api_error(e)` is the only place an
exception becomes an HTTP error: the app's exception handlers (every route) and the error event of a
streaming chat both call it, so a refusal reads the same on every route:

    ApiError                     itself (raised by request parsing, limits, the image intake)
    engine QueueFull             503 overloaded + Retry-After (the scheduler's estimate: the one bound)
    engine Closed                503 unavailable + Retry-After: 1 (shutting down)
    TimeoutError                 504 timeout (the per-request timeout of the engine front)
    404 / 405 from the router    not_found / method_not_allowed
    request validation           400 invalid_request
    engine UnknownAdapter        404 adapter_not_found (names the loaded adapters)
    ValueError                   400 invalid_request / invalid_image (the library's user-facing errors)
    anything else                500 internal_error with the request id (the traceback goes to the log)
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pydantic import ValidationError

log = logging.getLogger("palikit.serve")


class ApiError(Exception):
    """A client-facing error: HTTP status, machine-readable type, human message."""

    def __init__(self, status: int, type: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.param = status, type, message, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.param is not None:
            err["param"] = self.param
        return {"error": err}


def bad_request(message: str, param: str | None = None, type: str = "invalid_request") -> ApiError:
    return ApiError(400, type, message, param=param)


def clean_message(msg: str) -> str:
    """Library messages are user-facing, but never let a path or a huge value through."""
    msg = re.sub(r"(/[\w.@+-]+){2,}", "<path>", msg)
    return msg[:500]


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """One readable line per problem ("temperature: Input should be a valid number"), never the input."""
    parts, first = [], None
    for err in e.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        first = first or loc or None
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (check the spelling; see /docs for the accepted fields)"
        elif err.get("type") == "missing":
            msg = "field required"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts), first


def api_error(e: BaseException, *, timeout_s: float | None = None, request_id: str = "?",
              method: str = "", path: str = "") -> ApiError:
    """The HTTP error for exception `e` (the table in the module docstring). `timeout_s` is named in
    the 504's message; `request_id` in the 500's; `method` and `path` in the 404 / 405."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from ..engine import Closed, QueueFull

    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        return ApiError(503, "overloaded", "the server is busy (request queue full); retry shortly.",
                        headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, Closed):
        return ApiError(503, "unavailable", "the server is shutting down; retry shortly.",
                        headers={"Retry-After": "1"})
    from ..engine.adapters import UnknownAdapter

    if isinstance(e, UnknownAdapter):
        return ApiError(404, "adapter_not_found", clean_message(str(e)), param="adapter")
    if isinstance(e, TimeoutError):
        within = f" within {timeout_s:g} s" if timeout_s is not None else ""
        return ApiError(504, "timeout", f"the request did not finish{within}; retry later or ask for fewer tokens.")
    if isinstance(e, HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        msg = {404: f"no such endpoint: {path[:100]} (see /docs).",
               405: f"method {method} is not allowed here (see /docs)."}.get(e.status_code, str(e.detail))
        return ApiError(e.status_code, kind, msg, headers=dict(e.headers or {}))
    if isinstance(e, RequestValidationError):
        return bad_request("invalid request (see /docs).")
    if isinstance(e, ValueError):  # the library's user-facing errors (bad option, prompt too long, bad image)
        kind = "invalid_image" if type(e).__name__ == "ImageError" else "invalid_request"
        return ApiError(400, kind, clean_message(str(e)))
    log.error("request %s failed", request_id, exc_info=(type(e), e, e.__traceback__))
    return ApiError(500, "internal_error", f"internal server error (request id {request_id}).")


# the exception classes the app routes to `api_error` (Exception last: the 500s)
def handled_exceptions() -> tuple[type[BaseException], ...]:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from ..engine import Closed, QueueFull

    from ..engine.adapters import UnknownAdapter

    return (ApiError, QueueFull, Closed, UnknownAdapter, TimeoutError, HTTPException, RequestValidationError, ValueError,
            Exception)
