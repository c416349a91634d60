"""One exception hierarchy for the server, rendered as JSON errors in one place."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class ScalariumError(Exception):
    """Base error: an HTTP status, a machine-readable code, a message and details."""

    status = 500
    code = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        """The error body the API returns."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class Invalid(ScalariumError):
    """The request is malformed or fails validation."""

    status = 400
    code = "invalid"


class Unauthorized(ScalariumError):
    """No credentials, or bad ones."""

    status = 401
    code = "unauthorized"


class Forbidden(ScalariumError):
    """Valid credentials, too little permission."""

    status = 403
    code = "forbidden"


class NotFound(ScalariumError):
    """The thing asked for does not exist (or is not visible to the caller)."""

    status = 404
    code = "not_found"


class Conflict(ScalariumError):
    """The request conflicts with the current state (duplicates, dependants)."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ScalariumError):
    """The request body is over the limit."""

    status = 413
    code = "payload_too_large"


class Unavailable(ScalariumError):
    """A backing service is down."""

    status = 503
    code = "unavailable"


class UnsupportedMediaType(ScalariumError):
    """The request body is not JSON."""

    status = 415
    code = "unsupported_media_type"


class Refused(Exception):
    """A node's request was refused: the error it gets, and whom it concerns (for the event)."""

    def __init__(
        self, error: ScalariumError, instance_id: str | None = None, stack_id: str | None = None
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.instance_id = instance_id
        self.stack_id = stack_id


def unexpected_error(error: BaseException) -> ScalariumError:
    """Log an unexpected exception (with its traceback) and give the 500 the client sees."""
    log.exception("unhandled error: %s", type(error).__name__, exc_info=error)
    return ScalariumError("internal error; see the server log")
