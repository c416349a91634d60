"""A client for the Chef Server API: nodes, roles, environments, data bags and cookbooks.

Requests are signed with :mod:`chef_bridge.auth` (protocol 1.0, 1.1 or 1.3) and sent with the
standard library only. Connection failures and 5xx answers are retried with a capped, jittered
exponential backoff; 4xx answers are not (asking again would get the same answer). Every failure
is a :class:`ChefServerError` whose ``code`` says what happened (``unauthorized``, ``forbidden``,
``not_found``, ``conflict``, ``bad_request``, ``server_error``, ``unreachable``,
``bad_response``) and whose message carries the server's own words (Chef answers
``{"error": ["..."]}``).

With an ``organization`` every path is prefixed with ``/organizations/ORG`` (Chef Server 12+);
a server URL that already ends in ``/organizations/ORG``, as knife's ``chef_server_url`` does,
works as well. goiardi, the Chef 11-compatible server the tests run, has no organizations.

Cookbook files are addressed by the MD5 of their content (Chef's "checksum") and served at URLs
the server hands out: goiardi's own ``/file_store/CHECKSUM``, or a bookshelf/S3 URL with Chef
Server 12. Relative URLs are resolved against the server; absolute URLs on another host are
refused unless that host is listed in ``file_hosts``, so a compromised or misconfigured server
cannot make the client fetch from, or upload to, anywhere it likes. Requests to the server's own
host are signed; requests to a listed foreign host (a presigned S3 URL) are not.

The private key is never logged nor shown in ``repr``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import http.client
import json
import logging
import random
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

from chef_bridge import auth
from chef_bridge.metadata import METADATA_JSON, read_metadata
from chef_bridge.versions import Version, VersionError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_SIGNING_VERSION = "1.3"
# API v1 is what Chef Server 12.4+ and chef-client 13+ speak; cookbook manifests keep their
# segment layout (attributes, recipes, templates, ...) up to v1 and switch to all_files in v2.
DEFAULT_SERVER_API_VERSION = "1"
# Sent as X-Chef-Version: Chef servers refuse clients that claim too old a version.
DEFAULT_CHEF_VERSION = "14.15.6"
DEFAULT_USER_AGENT = "scalarium-chef-client/0.1"
DEFAULT_TIMEOUT = 30.0  # seconds, per attempt (connect, and each read)
DEFAULT_RETRIES = 3  # attempts after the first
DEFAULT_BACKOFF = 0.5  # seconds before the first retry; doubles each time
DEFAULT_MAX_BACKOFF = 8.0
CHUNK = 64 * 1024

# Chef's cookbook segments (chef/lib/chef/cookbook_version.rb COOKBOOK_SEGMENTS). Files outside
# them (spec/, test/, ...) are not uploaded by knife with API v0/v1 either.
COOKBOOK_SEGMENTS = (
    "attributes",
    "definitions",
    "files",
    "libraries",
    "providers",
    "recipes",
    "resources",
    "root_files",
    "templates",
)
# Never uploaded, whatever chefignore says: VCS metadata and editor/OS droppings.
ALWAYS_IGNORED = (".git", ".svn", ".hg", ".bzr", ".DS_Store", "*~", "*.swp", "#*#")
_CHECKSUM = re.compile(r"[0-9a-f]{32}")


class ErrorCode(StrEnum):
    """Why a Chef Server request failed."""

    UNAUTHORIZED = "unauthorized"  # 401: unknown client, wrong key, clock skew
    FORBIDDEN = "forbidden"  # 403: the client may not do this
    NOT_FOUND = "not_found"  # 404
    CONFLICT = "conflict"  # 409: already exists
    BAD_REQUEST = "bad_request"  # any other 4xx: the server refused what was sent
    SERVER_ERROR = "server_error"  # 5xx, after the retries
    UNREACHABLE = "unreachable"  # no answer: refused, reset, timed out, TLS failure
    BAD_RESPONSE = "bad_response"  # an answer that cannot be used (not JSON, bad checksum, ...)


class ChefServerError(Exception):
    """A failed Chef Server request: ``code``, HTTP ``status`` (if any), ``path``, server words."""

    def __init__(
        self,
        message: str,
        code: ErrorCode,
        *,
        status: int | None = None,
        path: str = "",
        server_message: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.path = path
        self.server_message = server_message

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self)

    @property
    def details(self) -> dict[str, Any]:
        """What an API error rendering needs besides code and message."""
        return {"status": self.status, "path": self.path, "server_message": self.server_message}


@dataclass(frozen=True)
class ManifestFile:
    """One file of a cookbook version: where it goes, its MD5 checksum and where to fetch it."""

    path: str
    checksum: str
    url: str
    segment: str


# --- pure pieces ----------------------------------------------------------------------------


def error_code_for_status(status: int) -> ErrorCode:
    """Return the error code for a non-2xx HTTP status."""
    named = {
        401: ErrorCode.UNAUTHORIZED,
        403: ErrorCode.FORBIDDEN,
        404: ErrorCode.NOT_FOUND,
        409: ErrorCode.CONFLICT,
    }
    if status in named:
        return named[status]
    if status >= 500:
        return ErrorCode.SERVER_ERROR
    if status >= 400:
        return ErrorCode.BAD_REQUEST
    # 1xx/3xx: redirects are not followed (a signature is bound to its path).
    return ErrorCode.BAD_RESPONSE


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth asking again for (5xx only)."""
    return status >= 500


def server_message(body: bytes, limit: int = 500) -> str:
    """Extract the server's explanation from an error body (``{"error": [..]}`` or text)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:limit]
    if isinstance(data, dict):
        for key in ("error", "error_messages", "message"):
            value = data.get(key)
            if isinstance(value, list):
                return "; ".join(str(item) for item in value)[:limit]
            if isinstance(value, str):
                return value[:limit]
    return text[:limit]


def backoff_delay(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Return the pause before retry ``attempt`` (from 0): capped doubling, ``jitter`` in [0, 1]."""
    # Half fixed, half random: spread retries of many clients without ever waiting zero.
    delay = min(cap, base * (2**attempt))
    return delay * (0.5 + 0.5 * jitter)


def md5_hex(data: bytes) -> str:
    """Return Chef's checksum of a file's content (MD5, lower-case hex)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def origin(url: str) -> tuple[str, str, int]:
    """Return (scheme, host, port) of an absolute URL, with the scheme's default port."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    default = 443 if scheme == "https" else 80
    try:
        port = parts.port or default
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port


def host_allowed(url: str, allowed: Iterable[str]) -> bool:
    """Whether ``url``'s host matches one of ``allowed`` (``host`` or ``host:port``)."""
    _, host, port = origin(url)
    for entry in allowed:
        name, sep, entry_port = entry.lower().rpartition(":")
        if sep and entry_port.isdigit():
            if name.strip("[]") == host and int(entry_port) == port:
                return True
        elif entry.lower().strip("[]") == host:
            return True
    return False


def safe_relative_path(path: str) -> str:
    """Return ``path`` if it is a plain relative POSIX path inside its root, else raise."""
    parts = PurePosixPath(path).parts
    if (
        not path
        or "\\" in path
        or "\x00" in path
        or path.startswith("/")
        or any(part in ("..", ".") for part in path.split("/"))
        or not parts
    ):
        raise ChefServerError(
            f"refusing unsafe cookbook file path {path!r} from the server",
            ErrorCode.BAD_RESPONSE,
        )
    return "/".join(parts)


def safe_name(name: str, what: str) -> str:
    """Return an object name usable as one file name (role, environment, bag, item), else raise."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or re.search(r"[/\\\x00]", name)
    ):
        raise ChefServerError(
            f"refusing {what} name {name!r} from the server: not a plain file name",
            ErrorCode.BAD_RESPONSE,
        )
    return name


def manifest_files(manifest: Mapping[str, Any]) -> list[ManifestFile]:
    """List a cookbook version's files from its manifest (segments, or API v2 ``all_files``)."""
    entries: list[tuple[str, Any]] = []
    if isinstance(manifest.get("all_files"), list):
        entries = [("all_files", entry) for entry in manifest["all_files"]]
    else:
        for segment in COOKBOOK_SEGMENTS:
            listed = manifest.get(segment) or []
            if not isinstance(listed, list):
                raise ChefServerError(
                    f"cookbook manifest segment {segment!r} is not a list", ErrorCode.BAD_RESPONSE
                )
            entries.extend((segment, entry) for entry in listed)
    files: dict[str, ManifestFile] = {}
    for segment, entry in entries:
        if not isinstance(entry, dict):
            raise ChefServerError(
                f"cookbook manifest entry in {segment!r} is not an object", ErrorCode.BAD_RESPONSE
            )
        path = safe_relative_path(str(entry.get("path") or ""))
        checksum = str(entry.get("checksum") or "").lower()
        if not _CHECKSUM.fullmatch(checksum):
            raise ChefServerError(
                f"cookbook file {path}: checksum {checksum!r} is not an MD5 hex digest",
                ErrorCode.BAD_RESPONSE,
            )
        url = entry.get("url")
        if not isinstance(url, str) or not url:
            raise ChefServerError(f"cookbook file {path}: no URL", ErrorCode.BAD_RESPONSE)
        files[path] = ManifestFile(path=path, checksum=checksum, url=url, segment=segment)
    return [files[path] for path in sorted(files)]


def sort_versions(versions: Iterable[str]) -> list[str]:
    """Return cookbook versions newest first (Chef's numeric order; unparsable ones last)."""

    def key(text: str) -> tuple[int, Version | None, str]:
        try:
            return (0, Version.parse(text), text)
        except VersionError:
            return (1, None, text)

    parsed = sorted(versions, key=key)
    good = [v for v in parsed if key(v)[0] == 0]
    bad = [v for v in parsed if key(v)[0] == 1]
    return list(reversed(good)) + bad


def read_chefignore(cookbook_dir: Path) -> list[str]:
    """Return the glob patterns of a cookbook's (or its repo's) ``chefignore``, comments dropped."""
    for candidate in (cookbook_dir / "chefignore", cookbook_dir.parent / "chefignore"):
        if candidate.is_file():
            lines = candidate.read_text(encoding="utf-8", errors="replace").splitlines()
            return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return []


def is_ignored(relative: str, patterns: Iterable[str]) -> bool:
    """Whether a cookbook-relative path matches an ignore pattern (whole path or any component)."""
    parts = relative.split("/")
    for pattern in (*ALWAYS_IGNORED, *patterns):
        if fnmatch.fnmatch(relative, pattern):
            return True
        if any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


def segment_of(relative: str) -> str | None:
    """Return the manifest segment a cookbook file belongs to, or None if knife would skip it."""
    parts = relative.split("/")
    if len(parts) == 1:
        return "root_files"
    return parts[0] if parts[0] in COOKBOOK_SEGMENTS and parts[0] != "root_files" else None


def _specificity(segment: str, relative: str) -> str:
    # templates/ubuntu-22.04/x.erb is specific to a platform; templates/x.erb is "root_default".
    parts = relative.split("/")
    if segment in ("files", "templates"):
        return parts[1] if len(parts) > 2 else "root_default"
    return "default"


def _metadata_document(cookbook_dir: Path) -> dict[str, Any]:
    # metadata.json is uploaded as-is, as knife does; metadata.rb is read statically.
    json_path = cookbook_dir / METADATA_JSON
    meta = read_metadata(cookbook_dir)
    if json_path.is_file():
        document = json.loads(json_path.read_text(encoding="utf-8-sig"))
        document.setdefault("name", meta.name)
        document["version"] = str(meta.version)
        return document
    return {
        "name": meta.name,
        "version": str(meta.version),
        "description": meta.description,
        "long_description": "",
        "maintainer": meta.maintainer,
        "license": meta.license,
        "dependencies": {name: str(c) for name, c in meta.dependencies.items()},
        "platforms": {name: str(c) for name, c in meta.supports.items()},
        "recipes": dict(meta.recipes),
        "chef_versions": [[part.strip() for part in c.split(",")] for c in meta.chef_version],
        "source_url": meta.source_url,
        "issues_url": meta.issues_url,
    }


def build_manifest(cookbook_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Return a cookbook directory's upload manifest and its files by checksum."""
    cookbook_dir = Path(cookbook_dir)
    metadata = _metadata_document(cookbook_dir)
    name, version = str(metadata["name"]), str(metadata["version"])
    patterns = read_chefignore(cookbook_dir)
    segments: dict[str, list[dict[str, str]]] = {segment: [] for segment in COOKBOOK_SEGMENTS}
    by_checksum: dict[str, Path] = {}
    for path in sorted(p for p in cookbook_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(cookbook_dir).as_posix()
        segment = segment_of(relative)
        if segment is None or is_ignored(relative, patterns):
            continue
        checksum = _file_md5(path)
        by_checksum[checksum] = path
        segments[segment].append(
            {
                "name": path.name,
                "path": relative,
                "checksum": checksum,
                "specificity": _specificity(segment, relative),
            }
        )
    manifest: dict[str, Any] = {
        "name": f"{name}-{version}",
        "cookbook_name": name,
        "version": version,
        "json_class": "Chef::CookbookVersion",
        "chef_type": "cookbook_version",
        "frozen?": False,
        "metadata": metadata,
        **segments,
    }
    return manifest, by_checksum


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the client -----------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A signature covers one path: following a redirect would replay it elsewhere.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Transient(Exception):
    """One attempt failed in a way that another attempt may not."""

    def __init__(self, error: ChefServerError) -> None:
        super().__init__(str(error))
        self.error = error


def _quote(name: str) -> str:
    return urllib.parse.quote(str(name), safe="")


class ChefServerClient:
    """A signed, retrying client of one Chef Server (and one organization, if any)."""

    def __init__(
        self,
        url: str,
        client_name: str,
        key_pem: bytes | str,
        *,
        organization: str | None = None,
        signing_version: str = DEFAULT_SIGNING_VERSION,
        server_api_version: str = DEFAULT_SERVER_API_VERSION,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        verify: bool | str = True,
        user_agent: str = DEFAULT_USER_AGENT,
        chef_version: str = DEFAULT_CHEF_VERSION,
        file_hosts: Iterable[str] = (),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Chef server URL must be http(s)://host[:port][/path], not {url!r}")
        auth.parse_version(signing_version)
        auth.load_private_key(key_pem)  # fail now, not on the first request
        self.url = url.rstrip("/")
        self.root = f"{parts.scheme}://{parts.netloc}"
        prefix = parts.path.rstrip("/")
        if organization:
            prefix += f"/organizations/{_quote(organization)}"
        self.prefix = prefix
        self.client_name = client_name
        self._key = key_pem
        self.organization = organization
        self.signing_version = signing_version
        self.server_api_version = server_api_version
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.user_agent = user_agent
        self.chef_version = chef_version
        self.file_hosts = tuple(file_hosts)
        self._sleep = sleep
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if parts.scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=_ssl_context(verify)))
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        org = self.organization
        return f"ChefServerClient({self.url!r}, client={self.client_name!r}, organization={org!r})"

    # --- generic requests -------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, query: str = "") -> Any:
        """Send a signed JSON request to ``path`` (below the organization) and return its JSON."""
        url = self.root + self.prefix + path + (f"?{query}" if query else "")
        data = b"" if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        raw = self._exchange(method, url, data, headers, _read_all)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            # Show the start of what came back (a proxy's HTML page, say), but never a key.
            shown = "<redacted>" if b"PRIVATE KEY" in raw else repr(raw[:120])
            raise ChefServerError(
                f"{method} {path}: the answer ({len(raw)} bytes) is not JSON: {shown}",
                ErrorCode.BAD_RESPONSE,
                path=path,
            ) from None

    def _object(self, method: str, path: str, body: Any = None, *, query: str = "") -> Any:
        answer = self.request(method, path, body, query=query)
        if not isinstance(answer, dict):
            raise ChefServerError(
                f"{method} {path}: expected a JSON object, got {type(answer).__name__}"
                + (" (is the organization right?)" if answer is None else ""),
                ErrorCode.BAD_RESPONSE,
                path=path,
            )
        return answer

    def _names(self, path: str) -> list[str]:
        return sorted(self._object("GET", path))

    def _save(self, collection: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        # Update first: on a server that already holds the object that is one request, not two.
        try:
            return self._object("PUT", f"{collection}/{_quote(name)}", body)
        except ChefServerError as error:
            if error.code is not ErrorCode.NOT_FOUND:
                raise
        return self._object("POST", collection, body)

    # --- nodes --------------------------------------------------------------------------------

    def list_nodes(self) -> list[str]:
        """Return the names of every node."""
        return self._names("/nodes")

    def get_node(self, name: str) -> dict[str, Any]:
        """Return one node."""
        return self._object("GET", f"/nodes/{_quote(name)}")

    def create_node(self, node: Mapping[str, Any]) -> dict[str, Any]:
        """Create a node (409 ``conflict`` if it exists)."""
        return self._object("POST", "/nodes", node)

    def update_node(self, node: Mapping[str, Any]) -> dict[str, Any]:
        """Replace a node, named by ``node["name"]``."""
        return self._object("PUT", f"/nodes/{_quote(node['name'])}", node)

    def delete_node(self, name: str) -> dict[str, Any]:
        """Delete a node and return what it was."""
        return self._object("DELETE", f"/nodes/{_quote(name)}")

    # --- roles --------------------------------------------------------------------------------

    def list_roles(self) -> list[str]:
        """Return the names of every role."""
        return self._names("/roles")

    def get_role(self, name: str) -> dict[str, Any]:
        """Return one role."""
        return self._object("GET", f"/roles/{_quote(name)}")

    def create_role(self, role: Mapping[str, Any]) -> dict[str, Any]:
        """Create a role (409 ``conflict`` if it exists)."""
        return self._object("POST", "/roles", role)

    def update_role(self, role: Mapping[str, Any]) -> dict[str, Any]:
        """Replace a role, named by ``role["name"]``."""
        return self._object("PUT", f"/roles/{_quote(role['name'])}", role)

    def save_role(self, role: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace a role."""
        return self._save("/roles", role["name"], role)

    def delete_role(self, name: str) -> dict[str, Any]:
        """Delete a role and return what it was."""
        return self._object("DELETE", f"/roles/{_quote(name)}")

    # --- environments -------------------------------------------------------------------------

    def list_environments(self) -> list[str]:
        """Return the names of every environment (``_default`` included)."""
        return self._names("/environments")

    def get_environment(self, name: str) -> dict[str, Any]:
        """Return one environment."""
        return self._object("GET", f"/environments/{_quote(name)}")

    def create_environment(self, environment: Mapping[str, Any]) -> dict[str, Any]:
        """Create an environment (409 ``conflict`` if it exists)."""
        return self._object("POST", "/environments", environment)

    def update_environment(self, environment: Mapping[str, Any]) -> dict[str, Any]:
        """Replace an environment, named by ``environment["name"]``."""
        name = _quote(environment["name"])
        return self._object("PUT", f"/environments/{name}", environment)

    def save_environment(self, environment: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace an environment."""
        return self._save("/environments", environment["name"], environment)

    def delete_environment(self, name: str) -> dict[str, Any]:
        """Delete an environment and return what it was."""
        return self._object("DELETE", f"/environments/{_quote(name)}")

    # --- data bags ----------------------------------------------------------------------------

    def list_data_bags(self) -> list[str]:
        """Return the names of every data bag."""
        return self._names("/data")

    def list_data_bag_items(self, bag: str) -> list[str]:
        """Return the ids of a data bag's items."""
        return self._names(f"/data/{_quote(bag)}")

    def get_data_bag_item(self, bag: str, item_id: str) -> dict[str, Any]:
        """Return one data bag item (its raw data, ``id`` included)."""
        return self._object("GET", f"/data/{_quote(bag)}/{_quote(item_id)}")

    def create_data_bag(self, bag: str) -> dict[str, Any]:
        """Create an empty data bag (409 ``conflict`` if it exists)."""
        return self._object("POST", "/data", {"name": bag})

    def create_data_bag_item(self, bag: str, item: Mapping[str, Any]) -> dict[str, Any]:
        """Create an item in a data bag (409 ``conflict`` if its id exists)."""
        return self._object("POST", f"/data/{_quote(bag)}", item)

    def update_data_bag_item(self, bag: str, item: Mapping[str, Any]) -> dict[str, Any]:
        """Replace a data bag item, named by ``item["id"]``."""
        return self._object("PUT", f"/data/{_quote(bag)}/{_quote(item['id'])}", item)

    def save_data_bag_item(self, bag: str, item: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace a data bag item."""
        return self._save(f"/data/{_quote(bag)}", item["id"], item)

    def delete_data_bag_item(self, bag: str, item_id: str) -> Any:
        """Delete a data bag item."""
        return self.request("DELETE", f"/data/{_quote(bag)}/{_quote(item_id)}")

    def delete_data_bag(self, bag: str) -> Any:
        """Delete a data bag and its items."""
        return self.request("DELETE", f"/data/{_quote(bag)}")

    # --- cookbooks ----------------------------------------------------------------------------

    def list_cookbooks(self) -> dict[str, list[str]]:
        """Return every cookbook name with all its versions, newest first."""
        listing = self._object("GET", "/cookbooks", query="num_versions=all")
        return {name: _versions_of(name, entry) for name, entry in sorted(listing.items())}

    def cookbook_versions(self, name: str) -> list[str]:
        """Return one cookbook's versions, newest first (404 ``not_found`` if it has none)."""
        listing = self._object("GET", f"/cookbooks/{_quote(name)}", query="num_versions=all")
        if name not in listing:
            raise ChefServerError(
                f"GET /cookbooks/{name}: the answer does not list {name}",
                ErrorCode.BAD_RESPONSE,
                path=f"/cookbooks/{name}",
            )
        return _versions_of(name, listing[name])

    def get_cookbook(self, name: str, version: str = "_latest") -> dict[str, Any]:
        """Return one cookbook version's manifest (file lists with checksums and URLs)."""
        return self._object("GET", f"/cookbooks/{_quote(name)}/{_quote(version)}")

    def delete_cookbook(self, name: str, version: str) -> Any:
        """Delete one cookbook version."""
        return self.request("DELETE", f"/cookbooks/{_quote(name)}/{_quote(version)}")

    def file_url(self, url: str) -> str:
        """Resolve a file URL the server handed out, refusing hosts other than its own."""
        resolved = urllib.parse.urljoin(self.root + "/", url)
        if origin(resolved) == origin(self.root) or host_allowed(resolved, self.file_hosts):
            return resolved
        host = urllib.parse.urlsplit(resolved).netloc
        raise ChefServerError(
            f"refusing file URL on {host}: it is not the Chef server ({self.root});"
            " list the host in file_hosts if the server stores files there",
            ErrorCode.BAD_RESPONSE,
            path=urllib.parse.urlsplit(resolved).path,
        )

    def fetch_file(self, url: str, checksum: str | None = None) -> bytes:
        """Download a cookbook file into memory, checking its MD5 checksum if given."""
        data = self._exchange("GET", self.file_url(url), b"", {}, _read_all)
        if checksum is not None and md5_hex(data) != checksum.lower():
            raise _checksum_error(url, checksum, md5_hex(data))
        return data

    def save_file(self, url: str, dest: Path, checksum: str | None = None) -> int:
        """Stream a cookbook file to ``dest``, checking its MD5 checksum; return its size."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def write(response: _GuardedReader) -> tuple[int, str]:
            # Opened per attempt: a retried download starts the file again from zero.
            digest = hashlib.md5(usedforsecurity=False)
            size = 0
            with dest.open("wb") as handle:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    digest.update(chunk)
                    handle.write(chunk)
                    size += len(chunk)
            return size, digest.hexdigest()

        size, actual = self._exchange("GET", self.file_url(url), b"", {}, write)
        if checksum is not None and actual != checksum.lower():
            dest.unlink(missing_ok=True)
            raise _checksum_error(url, checksum, actual)
        return size

    def upload_cookbook(self, path: Path) -> dict[str, Any]:
        """Upload a cookbook directory as knife does: sandbox, file PUTs, commit, manifest PUT."""
        manifest, files = build_manifest(Path(path))
        name, version = manifest["cookbook_name"], manifest["version"]
        if files:
            sandbox = self._object("POST", "/sandboxes", {"checksums": dict.fromkeys(files)})
            sandbox_id = str(sandbox.get("sandbox_id") or "")
            wanted = sandbox.get("checksums")
            if not sandbox_id or not isinstance(wanted, dict):
                raise ChefServerError(
                    "POST /sandboxes: the answer has no sandbox_id or checksums",
                    ErrorCode.BAD_RESPONSE,
                    path="/sandboxes",
                )
            uploaded = 0
            for checksum, info in sorted(wanted.items()):
                if checksum not in files:
                    continue
                if isinstance(info, dict) and info.get("needs_upload") and info.get("url"):
                    self._put_file(str(info["url"]), files[checksum], checksum)
                    uploaded += 1
            log.info("cookbook %s %s: uploaded %d of %d files", name, version, uploaded, len(files))
            self._object("PUT", f"/sandboxes/{_quote(sandbox_id)}", {"is_completed": True})
        return self._object("PUT", f"/cookbooks/{_quote(name)}/{_quote(version)}", manifest)

    def _put_file(self, url: str, path: Path, checksum: str) -> None:
        headers = {
            "Content-Type": "application/x-binary",
            "Content-MD5": base64.b64encode(bytes.fromhex(checksum)).decode("ascii"),
        }
        self._exchange("PUT", self.file_url(url), path.read_bytes(), headers, _read_all)

    # --- transport ----------------------------------------------------------------------------

    def _headers(self, method: str, url: str, body: bytes) -> dict[str, str]:
        headers = {
            "Accept": "application/json",
            "User-Agent": self.user_agent,
            "X-Chef-Version": self.chef_version,
            "X-Ops-Server-API-Version": self.server_api_version,
        }
        # Only the Chef server gets signed headers; a presigned S3 URL carries its own auth.
        if origin(url) == origin(self.root):
            path = urllib.parse.urlsplit(url).path or "/"
            headers |= auth.sign_request(
                self._key,
                self.client_name,
                method,
                path,
                body,
                version=self.signing_version,
                server_api_version=self.server_api_version,
            )
        return headers

    def _exchange(
        self,
        method: str,
        url: str,
        body: bytes,
        extra_headers: Mapping[str, str],
        consume: Callable[[_GuardedReader], T],
    ) -> T:
        attempt = 0
        while True:
            try:
                return self._attempt(method, url, body, extra_headers, consume)
            except _Transient as transient:
                if attempt >= self.retries:
                    raise transient.error from None
                delay = backoff_delay(attempt, self.backoff, self.max_backoff, random.random())
                attempt += 1
                log.warning(
                    "chef server %s: %s %s failed (%s); retry %d of %d in %.2fs",
                    self.root,
                    method,
                    transient.error.path,
                    transient.error.code,
                    attempt,
                    self.retries,
                    delay,
                )
                self._sleep(delay)

    def _attempt(
        self,
        method: str,
        url: str,
        body: bytes,
        extra_headers: Mapping[str, str],
        consume: Callable[[_GuardedReader], T],
    ) -> T:
        path = urllib.parse.urlsplit(url).path
        headers = self._headers(method, url, body) | dict(extra_headers)
        data = body if body or method in ("POST", "PUT") else None
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            response = self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as answer:
            raise self._status_error(method, path, answer) from None
        except urllib.error.URLError as failure:
            reason = failure.reason
            error = ChefServerError(
                f"{method} {path}: cannot reach {self.root}: {reason}",
                ErrorCode.UNREACHABLE,
                path=path,
            )
            # A certificate that does not verify will not verify on the next attempt either.
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise error from None
            raise _Transient(error) from None
        except (OSError, http.client.HTTPException) as failure:
            raise _Transient(self._broken(method, path, failure)) from None
        with response:
            # Only network failures while reading are transient; a local write error is not.
            return consume(_GuardedReader(response, lambda exc: self._broken(method, path, exc)))

    def _status_error(
        self, method: str, path: str, answer: urllib.error.HTTPError
    ) -> ChefServerError | _Transient:
        status = answer.code
        try:
            raw = answer.read()
        except (OSError, http.client.HTTPException):
            raw = b""
        finally:
            answer.close()
        said = server_message(raw)
        code = error_code_for_status(status)
        error = ChefServerError(
            f"{method} {path}: {status} {code}" + (f": {said}" if said else ""),
            code,
            status=status,
            path=path,
            server_message=said,
        )
        return _Transient(error) if is_retryable_status(status) else error

    def _broken(self, method: str, path: str, failure: BaseException) -> ChefServerError:
        # Timeouts and resets after the connection was made arrive outside URLError.
        return ChefServerError(
            f"{method} {path}: no complete answer from {self.root}:"
            f" {type(failure).__name__}: {failure}",
            ErrorCode.UNREACHABLE,
            path=path,
        )


class _GuardedReader:
    """A response whose read failures become retryable, kept apart from the consumer's own."""

    def __init__(
        self, response: IO[bytes], broken: Callable[[BaseException], ChefServerError]
    ) -> None:
        self._response = response
        self._broken = broken

    def read(self, size: int | None = None) -> bytes:
        """Read from the response; a network failure raises a retryable error."""
        try:
            # http.client reads to the end only for read() or read(None), not read(-1).
            return self._response.read() if size is None else self._response.read(size)
        except (OSError, http.client.HTTPException) as failure:
            raise _Transient(self._broken(failure)) from None


def _read_all(response: _GuardedReader) -> bytes:
    return response.read()


def _versions_of(name: str, entry: Any) -> list[str]:
    versions = entry.get("versions") if isinstance(entry, dict) else None
    if not isinstance(versions, list):
        raise ChefServerError(
            f"cookbook listing for {name} has no versions list", ErrorCode.BAD_RESPONSE
        )
    return sort_versions(str(v.get("version")) for v in versions if isinstance(v, dict))


def _checksum_error(url: str, expected: str, actual: str) -> ChefServerError:
    return ChefServerError(
        f"file {url}: checksum {actual} does not match the manifest's {expected}",
        ErrorCode.BAD_RESPONSE,
        path=urllib.parse.urlsplit(url).path,
    )


def _ssl_context(verify: bool | str) -> ssl.SSLContext:
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
