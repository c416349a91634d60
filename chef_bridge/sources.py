"""Fetching a stack's custom cookbooks from where they live: git, an http(s) archive, S3, a local
directory (a Chef Server source is served by ``chef_bridge.chef_server``).

:func:`fetch_source` turns the stack's stored source (``{"type", "url", "revision", "ssh_key",
"username", "password", ...}``, secrets already decrypted) into a plain directory tree at ``dest``
and reports the revision it resolved to: a commit SHA for git, ``sha256:<hex>`` of the downloaded
archive or of the copied tree otherwise. The tree is built in a staging directory next to
``dest`` and renamed into place, so a failed fetch leaves nothing behind.

Secrets never reach argv (visible to every user through ``ps``), the environment of a child
process, a log line or an error message:

- git over ssh uses a deploy key written to a 0600 file in a private temporary directory, removed
  afterwards, through ``GIT_SSH_COMMAND`` with ``IdentitiesOnly=yes`` and ``BatchMode=yes``.
  Host keys follow trust on first use (``StrictHostKeyChecking=accept-new``): the first key seen
  for a host is recorded in ``known_hosts_file`` (or the worker user's ``~/.ssh/known_hosts``),
  and a later, different key is refused (``source_auth_failed``, ``details.reason=host_key``).
  Operators who want stricter checking pre-populate that file.
- git over http(s) gets its username and password from a ``GIT_ASKPASS`` script that reads them
  from 0600 files; credentials written into the URL are moved there too. Credential helpers are
  switched off so nothing is stored, and ``GIT_TERMINAL_PROMPT=0`` so nothing ever waits on a tty.
- error messages and progress lines go through :func:`scrub`.

Every git command runs under one overall deadline in its own process group, killed whole on
timeout (git spawns ssh and remote helpers that would otherwise outlive it).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from chef_bridge.archive import ArchiveError, safe_extract
from chef_bridge.bundle import SKIP_DIRS
from chef_bridge.repository import REPO_DIRS
from chef_bridge.versions import CookbookError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_BYTES = 512 * MiB
_CHUNK = 64 * 1024
_KILL_WAIT = 5.0
# Transports git may use, submodules included: ``ext::`` and other remote helpers run commands.
GIT_PROTOCOLS = ("file", "git", "http", "https", "ssh")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./+@-]{0,254}")
_HEX_REVISION = re.compile(r"[0-9a-fA-F]{4,40}")
_SCP_LIKE = re.compile(r"(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9._-]+:(?!//)[^\s]*")
_URL_USERINFO = re.compile(r"(?<=://)([^/@\s:]*):[^/@\s]*@")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# Environment variables a git child never inherits: they would redirect the repository, inject
# configuration or commands, or ask for credentials some other way.
_GIT_ENV_KEEP = frozenset({"GIT_SSL_CAINFO", "GIT_SSL_CAPATH"})
_ENV_DROP = frozenset({"SSH_ASKPASS", "SSH_ASKPASS_REQUIRE", "LANGUAGE"})


class SourceType(StrEnum):
    """Where a stack's custom cookbooks live."""

    GIT = "git"
    ARCHIVE = "archive"
    S3 = "s3"
    DIRECTORY = "directory"
    CHEF_SERVER = "chef_server"


class SourceError(CookbookError):
    """A source that cannot be fetched; ``code`` says why, the message holds no secret."""

    code = "source_unreachable"


@dataclass(frozen=True)
class FetchedSource:
    """A fetched tree: where it is, the revision it resolved to, and where it came from."""

    type: SourceType
    path: Path
    revision: str
    url: str  # scrubbed of credentials


@dataclass(frozen=True)
class S3Location:
    """An S3 object named by a source URL."""

    bucket: str
    key: str
    region: str | None = None


Progress = Callable[[str], None]


def fetch_source(
    source: Mapping[str, Any],
    dest: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    s3_endpoint_url: str | None = None,
    progress: Progress | None = None,
    known_hosts_file: Path | None = None,
) -> FetchedSource:
    """Fetch ``source`` into ``dest`` (absent or an empty directory) and say what was fetched."""
    kind = _source_type(source)
    url = _text(source, "url")
    if not url:
        raise SourceError("the source has no url", "invalid_source")
    secrets = _secrets(source)
    shown = scrub(url, secrets)
    report = _reporter(progress, secrets)
    deadline = _Deadline(timeout)
    dest = Path(dest)
    with _staging(dest) as staging:
        tree = staging / "tree"
        if kind is SourceType.GIT:
            revision = _fetch_git(source, url, tree, deadline, report, known_hosts_file)
            _check_tree(tree, max_bytes)
        elif kind is SourceType.DIRECTORY:
            revision = _copy_directory(_local_path(url), tree, max_bytes, deadline)
        elif kind is SourceType.CHEF_SERVER:
            imported = staging / "imported"
            _import_chef_server(source, url, imported, deadline, report)
            revision = _copy_directory(imported, tree, max_bytes, deadline)
        else:
            download = staging / "download"
            if kind is SourceType.ARCHIVE:
                digest = _download_http(source, url, download, max_bytes, deadline, report)
            else:
                digest = _download_s3(source, url, download, max_bytes, deadline, s3_endpoint_url)
            _check_sha256(source, digest)
            report(f"archive: unpacking {_human(download.stat().st_size)}")
            tree = _unpack(download, staging / "unpacked", max_bytes)
            revision = f"sha256:{digest}"
        os.chmod(tree, 0o755)
        _place(tree, dest)
    log.info("source %s: fetched %s revision %s", shown, kind.value, revision)
    report(f"{kind.value}: fetched revision {revision}")
    return FetchedSource(type=kind, path=dest, revision=revision, url=shown)


# -- pure helpers ---------------------------------------------------------------------------------


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with every secret and every password written into a URL replaced by ``***``."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return _URL_USERINFO.sub(r"\1:***@", text)


def git_url_kind(url: str) -> str:
    """The transport of a git URL (https, http, ssh, git, file); refuse anything else."""
    if url.startswith("-") or any(c.isspace() or ord(c) < 32 for c in url):
        raise SourceError("git url is not a URL", "invalid_source")
    if "://" in url:
        scheme = url.split("://", 1)[0].lower()
        if scheme in GIT_PROTOCOLS:
            return scheme
        raise SourceError(f"git url scheme {scheme!r} is not allowed", "invalid_source")
    if url.startswith("/"):
        return "file"
    if "::" not in url and _SCP_LIKE.fullmatch(url):
        return "ssh"  # scp-like user@host:path
    raise SourceError(
        "git url must be https://, ssh://, git://, file:// or user@host:path", "invalid_source"
    )


def split_url_credentials(url: str) -> tuple[str, str | None, str | None]:
    """Split ``scheme://user:password@host/...`` into the bare URL, the user and the password."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return (
        bare,
        urllib.parse.unquote(user) or None,
        urllib.parse.unquote(password) if password else None,
    )


def check_revision(revision: str) -> str:
    """Return ``revision`` if it can only be read as a branch, tag or SHA (never an option)."""
    if not _REVISION.fullmatch(revision) or ".." in revision or revision.endswith(("/", ".lock")):
        raise SourceError(f"revision {revision!r} is not a branch, tag or SHA", "invalid_source")
    return revision


def classify_git_error(stderr: str) -> tuple[str, str | None]:
    """Map git's (LC_ALL=C) error output to an error code and, when useful, a reason."""
    text = stderr.lower()
    for needle, code, reason in _GIT_ERRORS:
        if needle in text:
            return code, reason
    return "source_unreachable", None


_GIT_ERRORS: tuple[tuple[str, str, str | None], ...] = (
    ("host key verification failed", "source_auth_failed", "host_key"),
    ("remote host identification has changed", "source_auth_failed", "host_key"),
    ("permission denied", "source_auth_failed", None),
    ("authentication failed", "source_auth_failed", None),
    ("could not read username", "source_auth_failed", None),
    ("could not read password", "source_auth_failed", None),
    ("terminal prompts disabled", "source_auth_failed", None),
    ("access denied", "source_auth_failed", None),
    ("the requested url returned error: 401", "source_auth_failed", None),
    ("the requested url returned error: 403", "source_auth_failed", None),
    ("couldn't find remote ref", "revision_not_found", None),
    ("not our ref", "revision_not_found", None),
    ("unknown revision", "revision_not_found", None),
    ("bad object", "revision_not_found", None),
    ("did not match any", "revision_not_found", None),
    ("transport '", "invalid_source", "protocol"),
)


def parse_s3_url(url: str) -> S3Location:
    """Bucket, key and region of ``s3://bucket/key`` or of an https S3 URL (either style)."""
    parts = urllib.parse.urlsplit(url)
    path = urllib.parse.unquote(parts.path).lstrip("/")
    host = (parts.hostname or "").lower()
    if parts.scheme == "s3":
        bucket, key, region = host or parts.netloc, path, None
    elif parts.scheme == "https" and host.endswith(".amazonaws.com"):
        labels = host[: -len(".amazonaws.com")].split(".")
        s3_at = next((i for i, label in enumerate(labels) if _is_s3_label(label)), None)
        if s3_at is None:
            raise SourceError("not an S3 URL", "invalid_source")
        region = _region_of(labels[s3_at:])
        if s3_at == 0:  # path style: s3.<region>.amazonaws.com/<bucket>/<key>
            bucket, _, key = path.partition("/")
        else:  # virtual-hosted style: <bucket>.s3.<region>.amazonaws.com/<key>
            bucket, key = ".".join(labels[:s3_at]), path
    else:
        raise SourceError("an S3 source is s3://bucket/key or an https S3 URL", "invalid_source")
    if not bucket or not key:
        raise SourceError("the S3 URL names no bucket or no key", "invalid_source")
    return S3Location(bucket=bucket, key=key, region=region)


def _is_s3_label(label: str) -> bool:
    return label in ("s3", "s3-external-1") or label.startswith(("s3-", "s3."))


def _region_of(labels: list[str]) -> str | None:
    first = labels[0]
    if first.startswith("s3-") and first != "s3-external-1":
        return first[3:]  # legacy s3-<region>
    rest = [label for label in labels[1:] if label not in ("dualstack",)]
    return rest[0] if rest else None


def strip_single_top_dir(tree: Path) -> Path:
    """The one top-level directory of an unpacked tree (as GitHub/GitLab tarballs have), else
    the tree itself; a chef-repo directory such as ``cookbooks/`` is never stripped."""
    entries = list(tree.iterdir())
    if len(entries) != 1:
        return tree
    only = entries[0]
    if only.is_symlink() or not only.is_dir() or only.name in (*REPO_DIRS, "cookbooks"):
        return tree
    return only


# -- the edges: staging, deadlines ----------------------------------------------------------------


class _Deadline:
    """The time left for the whole fetch, shared by every step."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise SourceError(f"fetch took longer than {self.timeout:g}s", "timeout")
        return left


def _source_type(source: Mapping[str, Any]) -> SourceType:
    try:
        return SourceType(str(source.get("type")))
    except ValueError:
        raise SourceError(f"unknown source type {source.get('type')!r}", "invalid_source") from None


def _text(source: Mapping[str, Any], key: str) -> str | None:
    value = source.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SourceError(f"source field {key!r} must be a string", "invalid_source")
    return value


def _secrets(source: Mapping[str, Any]) -> tuple[str, ...]:
    found = [_text(source, "password"), _text(source, "ssh_key")]
    url = _text(source, "url")
    if url and "://" in url:
        found.append(split_url_credentials(url)[2])
    return tuple(s for s in found if s)


def _reporter(progress: Progress | None, secrets: tuple[str, ...]) -> Progress:
    def report(message: str) -> None:
        if progress is not None:
            progress(scrub(message, secrets))

    return report


@contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A private directory next to ``dest``, removed whatever happens."""
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise SourceError(f"{dest} exists and is not an empty directory", "invalid_source")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.fetch-", dir=dest.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _place(tree: Path, dest: Path) -> None:
    if dest.exists():
        dest.rmdir()  # empty, checked before fetching
    os.rename(tree, dest)


def _human(size: int) -> str:
    return f"{size / MiB:.1f} MiB"


# -- git ------------------------------------------------------------------------------------------


def _fetch_git(
    source: Mapping[str, Any],
    url: str,
    tree: Path,
    deadline: _Deadline,
    report: Progress,
    known_hosts_file: Path | None,
) -> str:
    """Check out the source's revision into ``tree``; return the commit SHA."""
    transport = git_url_kind(url)
    revision = check_revision(_text(source, "revision") or "HEAD")
    username, password = _text(source, "username"), _text(source, "password")
    if transport in ("http", "https"):
        url, url_user, url_password = split_url_credentials(url)
        username, password = username or url_user, password or url_password
    with tempfile.TemporaryDirectory(prefix="scalarium-git-") as private:
        git = _Git(tree, deadline, _scrubber(source, password))
        git.env = _git_env(
            Path(private),
            ssh_key=_text(source, "ssh_key") if transport == "ssh" else None,
            username=username if transport in ("http", "https") else None,
            password=password if transport in ("http", "https") else None,
            known_hosts_file=known_hosts_file,
        )
        report(f"git: fetching {revision} from {url}")
        git.run("init", "--quiet", "--template=", str(tree), cwd=tree.parent)
        git.run("remote", "add", "origin", url)
        sha = _fetch_revision(git, revision)
        git.run("-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", sha)
        if source.get("submodules"):
            report("git: updating submodules")
            git.run("submodule", "update", "--init", "--recursive", "--depth", "1")
    _remove_git_dirs(tree)
    return sha


def _fetch_revision(git: _Git, revision: str) -> str:
    """Fetch one revision shallowly, or everything when a SHA is not advertised; return its SHA."""
    try:
        git.run("fetch", "--quiet", "--depth", "1", "--no-tags", "origin", revision)
        return git.output("rev-parse", "--verify", "--end-of-options", "FETCH_HEAD^{commit}")
    except SourceError as error:
        # A short SHA, or a full one the server only serves to a full fetch.
        if error.code != "revision_not_found" or not _HEX_REVISION.fullmatch(revision):
            raise
    git.run(
        "fetch",
        "--quiet",
        "--no-tags",
        "origin",
        "+refs/heads/*:refs/remotes/origin/*",
        "+refs/tags/*:refs/tags/*",
    )
    try:
        return git.output("rev-parse", "--verify", "--end-of-options", f"{revision}^{{commit}}")
    except SourceError as error:
        raise SourceError(
            f"revision {revision!r} is not a commit of the repository (unknown or ambiguous)",
            "revision_not_found",
            {"revision": revision},
        ) from error


def _scrubber(source: Mapping[str, Any], password: str | None) -> Callable[[str], str]:
    secrets = tuple(s for s in (*_secrets(source), password) if s)
    return lambda text: scrub(text, secrets)


class _Git:
    """Runs git commands in one repository under the fetch's deadline."""

    def __init__(self, repo: Path, deadline: _Deadline, scrub_text: Callable[[str], str]) -> None:
        self.repo = repo
        self.deadline = deadline
        self.scrub = scrub_text
        self.env: dict[str, str] = {}

    def run(self, *args: str, cwd: Path | None = None) -> str:
        """Run ``git args`` and return its stdout; raise a classified SourceError on failure."""
        command = ["git", *_GIT_CONFIG, *args]
        process = subprocess.Popen(
            command,
            cwd=cwd or self.repo,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # one process group: ssh and remote helpers die with git
        )
        try:
            out, err = process.communicate(timeout=self.deadline.remaining())
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise SourceError(
                f"git {args[0]} took longer than {self.deadline.timeout:g}s", "timeout"
            ) from None
        except BaseException:
            _kill_group(process)
            raise
        if process.returncode != 0:
            stderr = self.scrub(err.decode("utf-8", "replace")).strip()
            code, reason = classify_git_error(stderr)
            details: dict[str, Any] = {"command": f"git {args[0]}", "stderr": stderr[-2000:]}
            if reason:
                details["reason"] = reason
            last = stderr.splitlines()[-1] if stderr else f"exit status {process.returncode}"
            raise SourceError(f"git {args[0]} failed: {last}", code, details)
        return out.decode("utf-8", "replace")

    def output(self, *args: str) -> str:
        """Run git and return its stdout stripped."""
        return self.run(*args).strip()


# Configuration for every git command: no stored or system credentials, no hooks, no fsmonitor.
_GIT_CONFIG = (
    "-c",
    "credential.helper=",
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.communicate(timeout=_KILL_WAIT)
    except subprocess.TimeoutExpired:
        pass


def _git_env(
    private: Path,
    *,
    ssh_key: str | None,
    username: str | None,
    password: str | None,
    known_hosts_file: Path | None,
) -> dict[str, str]:
    """The environment of git children; secrets go into 0600 files under ``private``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _ENV_DROP and (not k.startswith("GIT_") or k in _GIT_ENV_KEEP)
    }
    env |= {
        "LC_ALL": "C",  # error messages in English, for classify_git_error
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ALLOW_PROTOCOL": ":".join(GIT_PROTOCOLS),
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new"]
    ssh += ["-o", "ConnectTimeout=30"]
    if known_hosts_file is not None:
        ssh += ["-o", f"UserKnownHostsFile={known_hosts_file}"]
    if ssh_key:
        key_file = _private_file(
            private / "deploy_key", ssh_key.replace("\r\n", "\n").strip() + "\n"
        )
        ssh += ["-i", str(key_file), "-o", "IdentitiesOnly=yes"]
    env["GIT_SSH_COMMAND"] = shlex.join(ssh)
    if username or password:
        env["GIT_ASKPASS"] = str(_askpass(private, username or "", password or ""))
    else:
        env["GIT_ASKPASS"] = "false"  # never prompt through a desktop helper either
    return env


def _private_file(path: Path, content: str) -> Path:
    """Write ``content`` to a new file that only this user can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(content)
    os.chmod(path, 0o600)  # whatever the umask
    return path


def _askpass(private: Path, username: str, password: str) -> Path:
    """A GIT_ASKPASS script answering git's prompts from 0600 files (the script holds no secret)."""
    user_file = _private_file(private / "username", username)
    password_file = _private_file(private / "password", password)
    script = private / "askpass"
    script.write_text(
        "#!/bin/sh\n"
        "# git asks 'Username for ...' or 'Password for ...'\n"
        'case "$1" in\n'
        f"  Username*) exec cat {shlex.quote(str(user_file))} ;;\n"
        f"  *) exec cat {shlex.quote(str(password_file))} ;;\n"
        "esac\n",
        encoding="utf-8",
    )
    os.chmod(script, 0o700)
    return script


def _remove_git_dirs(tree: Path) -> None:
    """Drop repository metadata: the tree is cookbooks, the SHA is already known."""
    shutil.rmtree(tree / ".git")
    for git_dir in list(tree.rglob(".git")):  # submodules' .git files or directories
        if git_dir.is_symlink() or git_dir.is_file():
            git_dir.unlink()
        elif git_dir.is_dir():
            shutil.rmtree(git_dir)


def _check_tree(tree: Path, max_bytes: int) -> None:
    """Refuse a checked-out tree that is too large, holds special files or links outside."""
    real_root = os.path.realpath(tree)
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                _refuse_link_outside(path, real_root, tree)
            elif stat.S_ISREG(mode):
                total += os.lstat(path).st_size
                if total > max_bytes:
                    raise SourceError(
                        f"the checked-out tree is larger than {max_bytes} bytes",
                        "source_too_large",
                        {"max_bytes": max_bytes},
                    )
            elif not stat.S_ISDIR(mode):
                raise SourceError(
                    f"{os.path.relpath(path, tree)!r} is not a file, directory or link",
                    "invalid_source",
                )


def _refuse_link_outside(path: str, real_root: str, root: Path) -> str:
    """The real target of a symlink, refused unless it stays under ``real_root``."""
    real = os.path.realpath(path)
    if os.path.commonpath([real, real_root]) != real_root:
        raise SourceError(
            f"symlink {os.path.relpath(path, root)!r} points outside the source",
            "source_link_outside",
        )
    return real


# -- directory ------------------------------------------------------------------------------------


def _local_path(url: str) -> Path:
    if url.startswith("file://"):
        url = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    path = Path(url)
    if not path.is_absolute():
        raise SourceError("a directory source is an absolute path", "invalid_source")
    if not path.is_dir():
        raise SourceError(f"{path} is not a directory", "source_unreachable")
    return path


def _import_chef_server(
    source: Mapping[str, Any], url: str, dest: Path, deadline: _Deadline, report: Progress
) -> None:
    """Copy a Chef Server's cookbooks, roles, environments and data bags into a chef-repo.

    The source names the server (``url``, with ``/organizations/ORG`` for Chef Infra Server),
    the client to sign as (``username``) and that client's private key (``ssh_key``).
    """
    from chef_bridge.auth import AuthError
    from chef_bridge.chef_import import ChefImportError, import_from_server
    from chef_bridge.chef_server import ChefServerClient, ChefServerError

    client_name, key = _text(source, "username"), _text(source, "ssh_key")
    if not client_name or not key:
        raise SourceError(
            "a chef_server source needs username (the client name) and ssh_key (its key)",
            "invalid_source",
        )
    try:
        client = ChefServerClient(
            url, client_name, key.encode(), timeout=max(1.0, min(60.0, deadline.remaining()))
        )
        import_from_server(client, dest, progress=report)
    except ChefServerError as exc:
        code = {
            "unauthorized": "source_auth_failed",
            "forbidden": "source_auth_failed",
            "unreachable": "source_unreachable",
            "server_error": "source_unreachable",
        }.get(exc.code, "invalid_source")
        raise SourceError(f"chef server: {exc}", code, {"status": exc.status}) from None
    except (ChefImportError, AuthError) as exc:
        raise SourceError(f"chef server: {exc}", "invalid_source") from None


def _copy_directory(src: Path, dst: Path, max_bytes: int, deadline: _Deadline) -> str:
    """Copy ``src`` (VCS directories skipped) to ``dst``; return ``sha256:`` of the tree."""
    real_root = os.path.realpath(src)
    digest = hashlib.sha256()
    total = 0
    dst.mkdir()
    for dirpath, dirnames, filenames in os.walk(src):
        deadline.remaining()
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rel_dir = os.path.relpath(dirpath, src)
        real_dir = os.path.realpath(dirpath)
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            target = dst / rel
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                # Rewritten relative to the real tree, so it resolves the same way in the copy.
                link = os.path.relpath(_refuse_link_outside(path, real_root, src), real_dir)
                os.symlink(link, target)
                digest.update(f"link {rel} {link}\n".encode())
            elif stat.S_ISDIR(mode):
                target.mkdir()
                os.chmod(target, 0o755)
                digest.update(f"dir {rel}\n".encode())
            elif stat.S_ISREG(mode):
                total += _copy_file(path, target, mode, max_bytes - total, digest, rel)
            else:
                raise SourceError(f"{rel!r} is not a file, directory or link", "invalid_source")
    return f"sha256:{digest.hexdigest()}"


def _copy_file(path: str, target: Path, mode: int, budget: int, digest: Any, rel: str) -> int:
    """Copy one file within ``budget`` bytes, feeding its name, mode and content to ``digest``."""
    content = hashlib.sha256()
    copied = 0
    with open(path, "rb") as src, open(target, "xb") as out:
        while chunk := src.read(_CHUNK):
            copied += len(chunk)
            if copied > budget:
                raise SourceError("the directory is larger than the size cap", "source_too_large")
            content.update(chunk)
            out.write(chunk)
    executable = bool(mode & 0o111)
    os.chmod(target, 0o755 if executable else 0o644)
    digest.update(f"file {rel} {int(executable)} {content.hexdigest()}\n".encode())
    return copied


# -- archives over http(s) and S3 -----------------------------------------------------------------


def _download_http(
    source: Mapping[str, Any],
    url: str,
    target: Path,
    max_bytes: int,
    deadline: _Deadline,
    report: Progress,
) -> str:
    """Download an http(s) archive to ``target`` within ``max_bytes``; return its sha256."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise SourceError("an archive source is an http(s) URL", "invalid_source")
    url, url_user, url_password = split_url_credentials(url)
    username = _text(source, "username") or url_user
    password = _text(source, "password") or url_password
    request = urllib.request.Request(url, headers={"User-Agent": "scalarium"})
    if username or password:
        token = base64.b64encode(f"{username or ''}:{password or ''}".encode()).decode()
        request.add_unredirected_header("Authorization", f"Basic {token}")  # never to a redirect
    report(f"archive: downloading {url}")
    try:
        with urllib.request.urlopen(request, timeout=min(deadline.remaining(), 60)) as answer:
            length = answer.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise _too_large(max_bytes)
            return _save(answer, target, max_bytes, deadline)
    except urllib.error.HTTPError as error:
        error.close()  # it holds the response and its socket
        code = "source_auth_failed" if error.code in (401, 403) else "source_unreachable"
        raise SourceError(
            f"archive download failed: HTTP {error.code}", code, {"status": error.code}
        ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError):
            raise SourceError("archive download timed out", "timeout") from None
        raise SourceError(f"archive download failed: {reason}", "source_unreachable") from None


def _save(stream: IO[bytes], target: Path, max_bytes: int, deadline: _Deadline) -> str:
    """Copy ``stream`` to ``target``, stopping as soon as it passes ``max_bytes``."""
    digest = hashlib.sha256()
    written = 0
    with open(target, "xb") as out:
        while chunk := stream.read(_CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise _too_large(max_bytes)
            deadline.remaining()
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _too_large(max_bytes: int) -> SourceError:
    return SourceError(
        f"the archive is larger than {max_bytes} bytes",
        "source_too_large",
        {"max_bytes": max_bytes},
    )


def _download_s3(
    source: Mapping[str, Any],
    url: str,
    target: Path,
    max_bytes: int,
    deadline: _Deadline,
    endpoint_url: str | None,
) -> str:
    """Download an S3 object to ``target`` within ``max_bytes``; return its sha256."""
    # Imported here: boto3 takes a noticeable time to import and only this source needs it.
    import boto3
    import botocore.config
    import botocore.exceptions

    location = parse_s3_url(url)
    session = boto3.session.Session(
        aws_access_key_id=_text(source, "username"),
        aws_secret_access_key=_text(source, "password"),
        region_name=_text(source, "region") or location.region,
    )
    config = botocore.config.Config(
        connect_timeout=min(deadline.remaining(), 30),
        read_timeout=min(deadline.remaining(), 60),
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    client = session.client("s3", endpoint_url=endpoint_url, config=config)
    extra = {"VersionId": v} if (v := _text(source, "revision")) else {}
    where = f"s3://{location.bucket}/{location.key}"
    try:
        head = client.head_object(Bucket=location.bucket, Key=location.key, **extra)
        if int(head.get("ContentLength", 0)) > max_bytes:
            raise _too_large(max_bytes)
        body = client.get_object(Bucket=location.bucket, Key=location.key, **extra)["Body"]
        try:
            return _save(body, target, max_bytes, deadline)
        finally:
            body.close()
    except botocore.exceptions.ClientError as error:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        aws_code = str(error.response.get("Error", {}).get("Code", ""))
        code = _s3_error_code(aws_code, status, bool(extra))
        raise SourceError(
            f"{where}: {aws_code or status}", code, {"aws_code": aws_code, "status": status}
        ) from None
    except botocore.exceptions.NoCredentialsError:
        raise SourceError(f"{where}: no AWS credentials", "source_auth_failed") from None
    except (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError):
        raise SourceError(f"{where}: timed out", "timeout") from None
    except botocore.exceptions.BotoCoreError as error:
        raise SourceError(f"{where}: {error}", "source_unreachable") from None


def _s3_error_code(aws_code: str, status: int | None, versioned: bool) -> str:
    if aws_code in ("NoSuchVersion", "InvalidArgument") and versioned:
        return "revision_not_found"
    if status in (401, 403) or aws_code in (
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
    ):
        return "source_auth_failed"
    return "source_unreachable"


def _check_sha256(source: Mapping[str, Any], digest: str) -> None:
    expected = _text(source, "sha256")
    if expected is None:
        return
    if not _SHA256.fullmatch(expected):
        raise SourceError("sha256 must be 64 hexadecimal digits", "invalid_source")
    if expected.lower() != digest:
        raise SourceError(
            "the archive's sha256 does not match the expected one",
            "source_checksum_mismatch",
            {"expected": expected.lower(), "actual": digest},
        )


def _unpack(archive: Path, into: Path, max_bytes: int) -> Path:
    """Safely extract ``archive``; return the tree with a single top-level directory stripped."""
    try:
        safe_extract(archive, into, max_bytes=max_bytes)
    except ArchiveError as error:
        raise SourceError(error.message, error.code, error.details) from error
    return strip_single_top_dir(into)
