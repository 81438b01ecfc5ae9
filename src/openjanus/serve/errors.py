"""Errors in the OpenAI error schema: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any


class ServeError(Exception):
    """A request failure with its HTTP status and an OpenAI-style error body (message safe to show)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ServeError:
    """400 invalid_request_error."""
    return ServeError(400, message, param=param, code=code)


def timeout_error(seconds: float) -> ServeError:
    """The request ran past the server's time limit and was cancelled."""
    return ServeError(408, f"request took longer than the server's limit of {seconds:g} s and was cancelled",
                      type="timeout_error", code="request_timeout")


def internal_error() -> ServeError:
    """A failure we do not describe to clients (details go to the server log only)."""
    return ServeError(500, "internal server error", type="server_error", code="internal_error")


def shutting_down() -> ServeError:
    """The server stopped before the request could finish."""
    return ServeError(503, "the server is shutting down", type="server_error", code="shutting_down")
