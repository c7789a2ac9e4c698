"""Errors the service raises on purpose, each with its HTTP status.

Handlers in ``app`` turn them into ``{"detail": message}`` responses with that status
(and ``Retry-After`` where set). Messages are written for the user: what was wrong and
what to do; they never carry voxel values, paths of the service machine or tracebacks.
"""

from __future__ import annotations

__all__ = ["ServiceError", "BadRequest", "Unauthorized", "NotFound", "Conflict", "PayloadTooLarge",
           "Unprocessable", "TooManyRequests", "Unavailable"]


class ServiceError(Exception):
    status: int = 500
    default_retry_after: float | None = None     # seconds; sent as Retry-After when set

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = self.default_retry_after if retry_after is None else retry_after

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, int(round(self.retry_after))))}


class BadRequest(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class PayloadTooLarge(ServiceError):
    status = 413


class Unprocessable(ServiceError):
    status = 422


class TooManyRequests(ServiceError):
    status = 429
    default_retry_after = 1.0


class Unavailable(ServiceError):
    status = 503
    default_retry_after = 5.0
