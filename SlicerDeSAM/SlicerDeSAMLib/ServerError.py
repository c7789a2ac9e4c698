"""The error every ``ServerClient`` call raises for a non-2xx answer or an unreachable service."""

from __future__ import annotations

__all__ = ["ServerError"]


class ServerError(Exception):
    """The service answered with an error status, or could not be reached (status 0)."""

    def __init__(self, status: int, message: str, *, retry_after: float | None = None, method: str = "",
                 path: str = "") -> None:
        super().__init__(f"{method} {path}: {status} {message}".strip() if status else f"{method} {path}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after
