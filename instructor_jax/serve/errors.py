"""The server's errors and their two wire formats (no web framework imported here).

Routes under /v1/ answer OpenAI's `{"error": {"message", "type", "param", "code"}}`; the others (/embed,
/info, ...) text-embeddings-inference's `{"error", "error_type"}`. Every message says what was wrong and
what to send instead.
"""

from __future__ import annotations

import json
from typing import Optional

# HTTP status -> (OpenAI error type, text-embeddings-inference error_type)
KINDS = {
    401: ("authentication_error", "Unauthorized"),
    404: ("invalid_request_error", "NotFound"),
    405: ("invalid_request_error", "Validation"),
    413: ("invalid_request_error", "Validation"),
    422: ("invalid_request_error", "Validation"),
    429: ("rate_limit_error", "Overloaded"),
    499: ("invalid_request_error", "Validation"),
    500: ("server_error", "Backend"),
    503: ("service_unavailable", "Unhealthy"),
}


class ApiError(Exception):
    """An answer other than 200: status, a message a person can act on, the field it is about."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its inputs were dropped from the queue."""


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(path: str, error: ApiError) -> dict:
    """The JSON body of `error` in the format of the route at `path`."""
    openai_type, tei_type = KINDS.get(error.status, ("invalid_request_error", "Validation"))
    if is_openai_path(path):
        return {"error": {"message": error.message, "type": openai_type, "param": error.param,
                          "code": error.code}}
    return {"error": error.message, "error_type": tei_type}


def error_bytes(path: str, error: ApiError) -> bytes:
    return json.dumps(error_body(path, error)).encode()


def validation_message(errors) -> tuple[str, Optional[str]]:
    """(message, field) for pydantic's validation errors (FastAPI's RequestValidationError.errors())."""
    if not errors:
        return "the request is not valid", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return (f"the body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))}); send a "
                "JSON object such as {\"input\": [\"text\"]}"), None
    if kind == "model_attributes_type" or (not loc and kind in ("dict_type", "model_type")):
        return "the body must be a JSON object", None
    field = loc[0] if loc else None
    where = ".".join(loc) if loc else "the body"
    message = first.get("msg", "is not valid")
    if kind == "extra_forbidden":
        message = "is not a field this route knows (a misspelt field would otherwise be ignored silently)"
    elif kind == "missing":
        message = "is required"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}", field
