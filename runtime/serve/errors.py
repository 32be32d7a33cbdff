"""Errors as OpenAI's API returns them: {"error": {"message", "type", "param", "code"}} with the
HTTP status that says whose fault it was. Every failure a request can meet becomes one of these;
the server goes on serving."""

from __future__ import annotations

from starlette.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """A request that cannot be answered: `status` (4xx: the client's; 5xx: ours or upstream's),
    a one-line message, and optionally the request field at fault and a machine-readable code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.status, self.param, self.code = int(status), param, code

    @property
    def message(self) -> str:
        return str(self)

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error"),
                "param": self.param,
                "code": self.code if self.code is not None else self.status,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
