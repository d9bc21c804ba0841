"""Errors the core raises; the HTTP layer turns them into PocketBase's error shape."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error with an HTTP status and a message safe to show to a client."""

    status = 400
    default_message = "Something went wrong while processing your request."

    def __init__(self, message: str | None = None, data: dict[str, Any] | None = None) -> None:
        self.message = message or self.default_message
        self.data = data or {}
        super().__init__(self.message)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "data": self.data}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401
    default_message = "The request requires valid record authorization token."


class Forbidden(ApiError):
    status = 403
    default_message = "The authorized record is not allowed to perform this action."


class NotFound(ApiError):
    status = 404
    default_message = "The requested resource wasn't found."


class TooLarge(ApiError):
    status = 413
    default_message = "The request body is too large."


def field_error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


class ValidationError(BadRequest):
    """A 400 whose ``data`` maps field names to ``{"code", "message"}``."""

    def __init__(self, errors: dict[str, Any], message: str = "An error occurred while validating the submitted data.") -> None:
        super().__init__(message, errors)
