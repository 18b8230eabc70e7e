"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, never a stack trace.

Every request problem raises `APIError` with the HTTP status that names it; the app turns it
(and FastAPI's own validation and routing errors) into that JSON body.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
         415: "invalid_request_error", 500: "server_error", 503: "overloaded_error", 504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": _printable(message), "type": TYPES.get(status, "invalid_request_error"),
                      "param": None if param is None else _printable(param), "code": code}}


def _printable(text: str) -> str:
    """Text that encodes as UTF-8 (a lone surrogate echoed from a request is written as \\udXXX)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)
