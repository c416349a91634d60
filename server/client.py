"""A small client for the REST API, used by the CLI."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class ApiError(Exception):
    """The server answered with an error (or could not be reached)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class Client:
    """Calls /api/v1 with a bearer token."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.base = url.rstrip("/") + "/api/v1"
        self.token = token
        self.timeout = timeout

    def request(
        self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None
    ) -> Any:
        """Send one request; returns the decoded JSON body or raises ApiError."""
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                error = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                raise ApiError(exc.code, f"http_{exc.code}", raw.decode(errors="replace")) from exc
            raise ApiError(
                exc.code, error.get("code", "error"), error.get("message", ""), error.get("details")
            ) from exc
        except urllib.error.URLError as exc:
            raise ApiError(0, "unreachable", f"cannot reach {self.base}: {exc.reason}") from exc
        return json.loads(raw) if raw else None

    def get(self, path: str, **query: Any) -> Any:
        """GET a path."""
        return self.request("GET", path, query=query)

    def all(self, path: str) -> list[Any]:
        """Every item of a paginated listing."""
        items: list[Any] = []
        offset = 0
        while True:
            page = self.get(path, limit=500, offset=offset)
            items.extend(page["items"])
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return items
