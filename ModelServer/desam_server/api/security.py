"""API token check for every request (when a token is configured).

A pure ASGI middleware (no per-request overhead beyond a header lookup): the token comes
as ``Authorization: Bearer <token>`` or ``X-DeSAM-Token: <token>`` and is compared in
constant time (``hmac.compare_digest``). A missing or wrong token gets 401 with a JSON
body; the token never appears in logs or responses.
"""

from __future__ import annotations

import hmac
import json

__all__ = ["TokenMiddleware"]


class TokenMiddleware:
    def __init__(self, app, token: str) -> None:
        self.app = app
        self._token = token.encode("utf-8")

    def _authorised(self, headers: list[tuple[bytes, bytes]]) -> bool:
        offered = b""
        for name, value in headers:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                offered = value[7:].strip()
            elif name == b"x-desam-token":
                offered = value.strip()
        return hmac.compare_digest(offered, self._token)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self._authorised(scope.get("headers", [])):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "missing or wrong API token: send 'Authorization: Bearer <token>'"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
