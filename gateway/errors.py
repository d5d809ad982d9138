"""The gateway's errors, each knowing the HTTP status it becomes at the edge.

    GatewayError
    ├── ConfigError            bad settings; raised at start, never over HTTP
    ├── ConfigRejected         422: a configuration file reloaded over HTTP does not validate
    ├── BadRequest             400: malformed JSON, wrong types, empty content
    │   └── InvalidId          400: a path or body id that is not a UUID
    ├── Unauthorized           401: missing, bad, expired or revoked credential
    │   └── CredentialRevoked  401: revoked (an open WebSocket closes with 4003, not 4001)
    ├── Forbidden              403: authenticated, but not allowed
    ├── NotFound               404: unknown, or somebody else's
    ├── Conflict               409
    ├── TooManyRequests        429: a rate limit or daily cap (Retry-After, reset time)
    ├── PayloadTooLarge        413: body over the configured limit
    └── ServiceUnavailable     503: the database is not reachable

Provider failures live in `providers.base` (ProviderError and its subclasses): they are
not HTTP errors, they end a generation.
"""

from __future__ import annotations

from datetime import datetime


class GatewayError(Exception):
    """Base class; `status` and `type` shape the JSON error body."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(GatewayError):
    """A setting is missing or malformed; the message names the variable."""

    type = "config_error"


class ConfigRejected(GatewayError):
    """POST /api/admin/reload: the file does not validate (the message names file, line, key); nothing changed."""

    status = 422
    type = "config_error"


class BadRequest(GatewayError):
    """The request body or parameters are malformed."""

    status = 400
    type = "invalid_request"


class InvalidId(BadRequest):
    """An id that should be a UUID is not one."""


class Unauthorized(GatewayError):
    """No usable credential."""

    status = 401
    type = "unauthorized"


class CredentialRevoked(Unauthorized):
    """The credential was revoked: unlike an expired one, renewing it will not bring it back."""


class Forbidden(GatewayError):
    """The credential is fine but does not allow this."""

    status = 403
    type = "forbidden"


class NotFound(GatewayError):
    """No such resource for this user (another user's resource is not found either)."""

    status = 404
    type = "not_found"


class Conflict(GatewayError):
    """The resource is in a state that does not allow this."""

    status = 409
    type = "conflict"


class TooManyRequests(GatewayError):
    """A limit refused the request. At the edge (requests per minute) nothing was persisted; a
    chat turn's later refusals are saved as a `refused` reply instead (turns.py)."""

    status = 429
    type = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, reset_at: datetime | None = None,
                 reason: str = "rate_limited") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reset_at = reset_at
        self.reason = reason  # which limit: a refused reply's row and `error` event name it

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after)}
        if self.reset_at is not None:
            headers["X-RateLimit-Reset"] = self.reset_at.isoformat()
        return headers


class PayloadTooLarge(GatewayError):
    """The body is larger than the configured limit."""

    status = 413
    type = "payload_too_large"


class ServiceUnavailable(GatewayError):
    """A dependency (the database) is unreachable, or nothing can serve the request now: answered
    with Retry-After (seconds), as the outage is expected to pass."""

    status = 503
    type = "unavailable"
    RETRY_AFTER_S = 5

    def __init__(self, message: str, *, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}
