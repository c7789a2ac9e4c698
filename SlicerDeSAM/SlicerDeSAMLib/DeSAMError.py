"""The error the module's logic shows the user: one sentence saying what failed, with the
service's own message when the service answered one.

``DeSAMError.from_server_error`` turns a ``ServerError`` of the client into it. The first
words of each message are fixed, so the README's Troubleshooting headings can quote them:

- ``Cannot reach the DeSAM service at <url>: <why>`` (nothing answered: refused, timed
  out, connection lost, TLS);
- ``The DeSAM service at <url> refused the token (401): <service message>``;
- ``The DeSAM service at <url> is busy (<status>): <service message>`` (429, 503);
- ``<action>: <service message> (<status>)`` for every other answer (e.g.
  ``Could not start training: another training job ... (409)``).
"""

from __future__ import annotations

__all__ = ["DeSAMError"]


class DeSAMError(Exception):
    """A message for the user. ``status``: the service's HTTP status (0 when it could not
    be reached, None when the service was not involved)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @classmethod
    def from_server_error(cls, error, url: str, action: str) -> DeSAMError:
        """``error``: a ``ServerClient.ServerError``; ``action``: what failed, e.g. "Could
        not start training" (used for answers other than the fixed cases above)."""
        status, message = error.status, str(error.message).strip()
        if status == 0:
            prefix = f"cannot reach the service at {url}: "
            why = message[len(prefix):] if message.startswith(prefix) else message
            return cls(f"Cannot reach the DeSAM service at {url}: {why}. Check that it is running (Server panel: "
                       "Start, or Test connection) and that the URL is right.", status=0)
        if status == 401:
            return cls(f"The DeSAM service at {url} refused the token (401): {message}. Enter the service's token "
                       "in the Server panel.", status=401)
        if status in (429, 503):
            wait = f" Try again in {error.retry_after:g} s." if error.retry_after else " Try again in a moment."
            return cls(f"The DeSAM service at {url} is busy ({status}): {message}.{wait}", status=status)
        return cls(f"{action}: {message} ({status})", status=status)
