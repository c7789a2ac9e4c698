"""The Server panel's network part: test the connection, summarise the service, read a
volume's encoding progress. Worker-thread safe (``ServerClient`` calls only, no Qt, no
MRML); errors come as ``DeSAMError`` with the service's own message."""

from __future__ import annotations

from .DeSAMError import DeSAMError
from .ServerClient import ServerClient, ServerError
from .ServerSummary import ServerSummary

__all__ = ["ServerLogic"]


class ServerLogic:
    """``client``: the session's client; ``timeout``: seconds each of these short requests
    may take (a service that hangs is reported after it, not waited for the client's
    longer timeout)."""

    def __init__(self, client: ServerClient, timeout: float = 10.0) -> None:
        self.client = client
        self._quick = ServerClient(client.url, token=client.token, timeout=timeout, ca_file=client.ca_file)

    @property
    def url(self) -> str:
        return self.client.url

    def test_connection(self) -> ServerSummary:
        """GET /info (and /registry when the service has a decoder registry) as a summary."""
        try:
            info = self._quick.info()
            registry = self._quick.registry() if info.get("decoder_registry") else []
        except ServerError as exc:
            raise DeSAMError.from_server_error(exc, self.url, "The DeSAM service answered an error") from None
        return ServerSummary.from_answers(self.url, info, registry)

    def encoding_progress(self, volume_id: str, axis: str = "k", window=None) -> tuple[int, int]:
        """(slices cached, slices of the axis) for ``window`` (center, width; None: the
        volume's default window), for the progress bar."""
        try:
            progress = self._quick.progress(volume_id, axis, window)
        except ServerError as exc:
            raise DeSAMError.from_server_error(exc, self.url, "Could not read the encoding progress") from None
        return int(progress["cached"]), int(progress["total"])
