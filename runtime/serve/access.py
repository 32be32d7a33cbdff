"""Who may talk to the server, and how long a connection may take to say what it wants.

- `ApiKeyMiddleware`: with `--api-key KEY` (or APET_API_KEY), every HTTP route but the open ones
  (/health, for load balancers) wants `Authorization: Bearer KEY` (what the `openai` client sends);
  anything else gets 401 before the app reads a byte of the body. Keys compare in constant time.
- `header_deadline_protocol(seconds)`: uvicorn's h11 protocol whose connections must deliver a
  request's headers within `seconds` of opening (or of the previous answer); a client that dribbles
  them gets 408 and the connection closes. uvicorn's own keep-alive timeout stops at the first byte
  of a request, so without this one byte every few seconds held a connection for ever.
"""

from __future__ import annotations

import hmac

from .errors import APIError


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str, open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.key, self.open_paths = app, api_key.encode(), open_paths

    def _allowed(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        err = APIError(401, "a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key")
        await err.response({"WWW-Authenticate": "Bearer", "Connection": "close"})(scope, receive, send)


def header_deadline_protocol(seconds: float):
    """A uvicorn HTTP protocol class (uvicorn.Config(http=...)) with a deadline for request headers."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        header_timeout_s = float(seconds)
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(self.header_timeout_s, self._expired)

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return  # closed, or its headers came: the app's own deadlines apply from here
            if self.conn.our_state is h11.IDLE:
                try:
                    head = h11.Response(status_code=408, headers=[(b"connection", b"close"), (b"content-length", b"0")])
                    self.transport.write(self.conn.send(head) + self.conn.send(h11.EndOfMessage()))
                except h11.LocalProtocolError:
                    pass
            self.transport.close()

    return HeaderDeadlineH11
