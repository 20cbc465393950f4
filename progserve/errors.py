"""Typed errors and their one mapping to HTTP.

Every exception that can leave a route is turned into an `ErrorInfo` (status, type,
message) by `classify`, in one place. Two renderers write it out:

- `openai_body`: OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, used by
  the OpenAI-compatible and the SGLang-compatible routes (SGLang answers
  `{"error": {"message": ...}}`, a subset of it);
- `problem_body`: RFC 9457 problem JSON (`application/problem+json`), used by the native
  program API and the health routes.

Bad input is always a 4xx. Only a bug or a broken engine gives a 5xx.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine_backend.errors import (
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    UnknownRequestError,
    UpstreamProtocolError,
)
from scheduler.errors import SchedulerError, SchedulerOverloadedError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the server raises on purpose. Subclasses fix the status and type."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class BadRequestError(ApiError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(ApiError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(ApiError):
    """A valid key without the role the route needs."""

    status_code = 403
    error_type = "permission_error"


class NotFoundError(ApiError):
    status_code = 404
    error_type = "not_found_error"


class RequestTimeoutError(ApiError):
    """A wait the client bounded (`?timeout=`) ran out."""

    status_code = 408
    error_type = "timeout_error"


class PayloadTooLargeError(ApiError):
    status_code = 413
    error_type = "invalid_request_error"


class OverloadedError(ApiError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(message, code="overloaded")
        self.retry_after = retry_after


# Rules of a request body that no JSON Schema can state: they relate two fields of the
# body. Each is a 400 whose `code` names the rule; docs/reliability.md lists them (they are
# the by-design findings of a schema-driven fuzzer such as schemathesis).
BODY_RULES = {
    "min_tokens_over_max": "min_new_tokens (min_tokens) must not exceed max_new_tokens "
                           "(max_tokens)",
    "batch_length_mismatch": "a per-prompt list of a batched /generate has one entry per "
                             "prompt",
    "tool_choice_unknown_tool": "a named tool_choice names one of `tools`",
}
# What the configured engine cannot do is a 400 with one of these codes: the API and its
# schema are the same whichever engine serves them (the sim engine has no json_schema and
# only literal-choice regexes; an HTTP upstream may lack logprobs or token ids).
ENGINE_LIMIT_CODES = {
    "unsupported": "the engine cannot do what the request asks (json_schema, regex, ...)",
    "logprobs_unsupported": "the engine returns no logprobs",
    "token_ids_unsupported": "the engine takes text only",
}


@dataclass(slots=True, frozen=True)
class ErrorInfo:
    status: int
    type: str
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: float | None = None
    extra_headers: tuple[tuple[str, str], ...] = ()  # e.g. a 405's `Allow`

    @property
    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return headers


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def _type_for(status: int) -> str:
    if status >= 500:
        return "server_error" if status != 503 else "service_unavailable_error"
    return _TYPE_BY_STATUS.get(status, "invalid_request_error")


def describe_validation_error(errors: list[Any]) -> tuple[str, str | None]:
    """A one-line message and the first offending field from pydantic's error list."""
    if not errors:
        return "invalid request", None
    parts = []
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc)
        msg = err.get("msg", "invalid value")
        parts.append(f"{where}: {msg}" if where else msg)
    first_loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, (".".join(first_loc) or None)


def classify(exc: BaseException) -> ErrorInfo:
    """The single mapping from an exception to an HTTP error."""
    if isinstance(exc, OverloadedError):
        return ErrorInfo(429, exc.error_type, exc.message, code=exc.code,
                         retry_after=exc.retry_after)
    if isinstance(exc, ApiError):
        return ErrorInfo(exc.status_code, exc.error_type, exc.message, exc.param, exc.code)
    if isinstance(exc, RequestValidationError | ValidationError):
        errors = list(exc.errors())
        message, param = describe_validation_error(errors)
        rule = errors[0].get("type") if errors else None
        return ErrorInfo(400, "invalid_request_error", message, param,
                         rule if rule in BODY_RULES else "invalid_value")
    if isinstance(exc, SchedulerOverloadedError):
        return ErrorInfo(429, "rate_limit_error", str(exc) or "server overloaded",
                         code="overloaded", retry_after=getattr(exc, "retry_after", 1.0))
    if isinstance(exc, SchedulerError):
        status = int(getattr(exc, "status_code", 500))
        return ErrorInfo(status, _type_for(status), str(exc) or type(exc).__name__,
                         code=_snake(type(exc).__name__))
    if isinstance(exc, InvalidRequestError):
        return ErrorInfo(400, "invalid_request_error", str(exc), code=_snake(type(exc).__name__))
    if isinstance(exc, UnknownRequestError):
        return ErrorInfo(404, "not_found_error", str(exc), code="unknown_request")
    if isinstance(exc, EngineOverloadedError):
        return ErrorInfo(503, "service_unavailable_error", str(exc) or "engine overloaded",
                         code="engine_overloaded", retry_after=1.0)
    if isinstance(exc, EngineUnavailableError):
        return ErrorInfo(502, "server_error", str(exc) or "engine unavailable",
                         code="engine_unavailable")
    if isinstance(exc, UpstreamProtocolError):
        return ErrorInfo(502, "server_error", str(exc), code="upstream_protocol")
    if isinstance(exc, EngineError):
        return ErrorInfo(500, "server_error", str(exc) or "engine error", code="engine_error")
    if isinstance(exc, StarletteHTTPException):
        status = exc.status_code
        # The router's own headers stay: a 405 lists the methods the route allows.
        return ErrorInfo(status, _type_for(status), str(exc.detail),
                         extra_headers=tuple((exc.headers or {}).items()))
    log.exception("unhandled error", exc_info=exc)
    return ErrorInfo(500, "server_error", "internal server error", code="internal_error")


def _snake(name: str) -> str:
    name = name.removesuffix("Error")
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def openai_body(info: ErrorInfo) -> dict[str, Any]:
    return {
        "error": {
            "message": info.message,
            "type": info.type,
            "param": info.param,
            "code": info.code,
        }
    }


def problem_body(info: ErrorInfo, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        **(extras or {}),
        "type": f"https://progserve.dev/errors/{info.type}",
        "title": info.type.replace("_", " "),
        "status": info.status,
        "detail": info.message,
        "code": info.code,
        "param": info.param,
    }
