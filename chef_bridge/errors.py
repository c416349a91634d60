"""The one base of chef_bridge's errors: a message, a machine-readable code and details."""

from __future__ import annotations

from typing import Any


class ChefBridgeError(Exception):
    """Base of every chef_bridge error; subclasses set a default ``code``."""

    code: str = "chef_bridge_error"

    def __init__(
        self, message: str, code: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = details or {}

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self)
