"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, raised anywhere in a route."""

from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse

from mixq.serve import protocol as P

MAX_ECHO = 80  # a client's value quoted back in a message is cut to this many characters


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param


def quoted(value) -> str:
    """repr() of a client's value, cut short: a 1 MiB model name is not echoed back whole."""
    s = repr(value)
    return s if len(s) <= MAX_ECHO else s[: MAX_ECHO - 5] + "...'" + f" ({len(str(value))} characters)"


def error_body(message: str, type_: str = "invalid_request_error", code: Optional[str] = None,
               param: Optional[str] = None) -> dict:
    return P.ErrorResponse(error=P.ErrorInfo(message=message, type=type_, code=code, param=param)).model_dump()


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: Optional[str] = None,
                   param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status)
