"""Cookbook sources: git (file://, git daemon, ssh with a deploy key, http with basic auth),
http(s) archives, S3 through moto, local directories, and the layouts of a fetched tree.

Every server here is started by the test on loopback and stopped after it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import socket
import stat
import subprocess
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest

from chef_bridge.repository import (
    RepositoryError,
    RepositoryLayout,
    detect_layout,
    find_cookbooks,
    find_repo_dirs,
)
from chef_bridge.sources import (
    S3Location,
    SourceError,
    SourceType,
    check_revision,
    classify_git_error,
    fetch_source,
    git_url_kind,
    parse_s3_url,
    scrub,
    split_url_credentials,
)
from tests.chef_bridge import moto

moto_server = moto.moto_server
aws_test_env = moto.aws_test_env

MiB = 1024 * 1024
USER = "deployer"
PASSWORD = "s3cr3t-pa55w0rd-for-the-test"
DEPLOY_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nTHIS-IS-A-TEST-KEY-NOT-A-REAL-ONE\n"
    "-----END OPENSSH PRIVATE KEY-----"
)
GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo`` for building fixtures."""
    done = subprocess.run(
        ["git", *args], cwd=repo, env=GIT_ENV, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def metadata_rb(name: str, version: str) -> str:
    """A minimal metadata.rb."""
    return f"name '{name}'\nversion '{version}'\n"


def write(root: Path, files: dict[str, str]) -> None:
    """Write text files under ``root``."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return moto.free_loopback_port()


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}", pytrace=False)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"nothing listens on 127.0.0.1:{port}", pytrace=False)


def fetch_error(source: dict[str, Any], dest: Path, **options: Any) -> SourceError:
    """The SourceError a fetch raises; the destination must be left absent."""
    with pytest.raises(SourceError) as caught:
        fetch_source(source, dest, **options)
    assert not dest.exists() or not any(dest.iterdir())
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.fetch-")]
    return caught.value


# -- a git origin with branches and tags ----------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """A bare repository and the commits a revision must resolve to."""

    base: Path  # --base-path of git daemon
    bare: Path
    shas: dict[str, str]  # revision label -> commit SHA
    versions: dict[str, str]  # commit SHA -> version of the app cookbook in it


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Origin:
    """main: v1 (tagged, lightweight and annotated) then v2; feature: v3 on top of v1."""
    base = tmp_path_factory.mktemp("git")
    work = base / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    versions: dict[str, str] = {}
    shas: dict[str, str] = {}

    def commit(version: str) -> str:
        write(work, {"cookbooks/app/metadata.rb": metadata_rb("app", version)})
        git(work, "add", "-A")
        git(work, "commit", "-q", "-m", f"app {version}")
        sha = git(work, "rev-parse", "HEAD")
        versions[sha] = version
        return sha

    shas["v1"] = commit("1.0.0")
    git(work, "tag", "v1")
    git(work, "tag", "-a", "-m", "annotated", "v1-annotated")
    shas["main"] = commit("2.0.0")
    git(work, "checkout", "-q", "-b", "feature", shas["v1"])
    shas["feature"] = commit("3.0.0")
    git(work, "checkout", "-q", "main")
    bare = base / "origin.git"
    git(base, "clone", "-q", "--bare", str(work), str(bare))
    return Origin(base=base, bare=bare, shas=shas, versions=versions)


@pytest.fixture(scope="module")
def git_daemon(origin: Origin) -> Iterator[str]:
    """``git daemon`` serving the origin on a free loopback port; yields the repository URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--listen=127.0.0.1",
            f"--port={port}",
            f"--base-path={origin.base}",
            "--export-all",
            "--informative-errors",
            str(origin.base),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        yield f"git://127.0.0.1:{port}/origin.git"
    finally:
        process.terminate()
        process.wait(timeout=5)


REVISIONS = [
    # (revision given, label of the commit it must resolve to)
    ("main", "main"),
    ("feature", "feature"),
    ("v1", "v1"),
    ("v1-annotated", "v1"),
    (None, "main"),  # the remote's HEAD
    ("full:v1", "v1"),
    ("short:feature", "feature"),
    ("short:v1", "v1"),  # not a tip: only a full fetch finds it
]


def _revision(origin: Origin, given: str | None) -> str | None:
    if given and given.startswith("full:"):
        return origin.shas[given[5:]]
    if given and given.startswith("short:"):
        return origin.shas[given[6:]][:8]
    return given


@pytest.mark.parametrize("transport", ["file", "daemon"])
@pytest.mark.parametrize(("given", "label"), REVISIONS)
def test_git_fetch_checks_out_the_revision_and_reports_its_sha(
    origin: Origin,
    git_daemon: str,
    tmp_path: Path,
    transport: str,
    given: str | None,
    label: str,
) -> None:
    url = origin.bare.as_uri() if transport == "file" else git_daemon
    source = {"type": "git", "url": url, "revision": _revision(origin, given)}
    fetched = fetch_source(source, tmp_path / "tree")
    sha = origin.shas[label]
    assert (fetched.type, fetched.revision, fetched.path) == (
        SourceType.GIT,
        sha,
        tmp_path / "tree",
    )
    metadata = (fetched.path / "cookbooks/app/metadata.rb").read_text()
    assert metadata == metadata_rb("app", origin.versions[sha])
    assert not (fetched.path / ".git").exists()


@pytest.mark.parametrize("transport", ["file", "daemon"])
@pytest.mark.parametrize("revision", ["no-such-branch", "deadbeef", "0" * 40])
def test_git_unknown_revision_is_revision_not_found(
    origin: Origin, git_daemon: str, tmp_path: Path, transport: str, revision: str
) -> None:
    url = origin.bare.as_uri() if transport == "file" else git_daemon
    error = fetch_error({"type": "git", "url": url, "revision": revision}, tmp_path / "tree")
    assert error.code == "revision_not_found"


@pytest.mark.parametrize("submodules", [False, True])
def test_git_submodules_are_fetched_only_when_asked(
    origin: Origin, tmp_path: Path, submodules: bool
) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    git(parent, "init", "-q", "-b", "main")
    write(parent, {"app/metadata.rb": metadata_rb("app", "9.0.0")})
    git(
        parent,
        "-c",
        "protocol.file.allow=always",
        "submodule",
        "add",
        "-q",
        origin.bare.as_uri(),
        "vendor",
    )
    git(parent, "commit", "-q", "-am", "with a submodule")
    source = {"type": "git", "url": parent.as_uri(), "submodules": submodules}
    tree = fetch_source(source, tmp_path / "tree").path
    vendored = tree / "vendor/cookbooks/app/metadata.rb"
    assert vendored.is_file() is submodules
    assert not (tree / "vendor/.git").exists() and not (tree / ".git").exists()


def test_git_unreachable_repository_is_source_unreachable(tmp_path: Path) -> None:
    url = f"git://127.0.0.1:{free_port()}/nothing.git"
    error = fetch_error({"type": "git", "url": url}, tmp_path / "tree")
    assert error.code == "source_unreachable"


@pytest.mark.parametrize(
    ("url", "revision"),
    [
        ("ext::sh -c touch% /tmp/scalarium-pwned", None),
        ("fd::17", None),
        ("-uhelp", None),
        ("ftp://example.invalid/repo.git", None),
        ("relative/path", None),
        ("file:///srv/repo.git", "--upload-pack=touch /tmp/scalarium-pwned"),
        ("file:///srv/repo.git", "main:refs/heads/evil"),
        ("file:///srv/repo.git", "a..b"),
    ],
)
def test_git_refuses_dangerous_urls_and_revisions(
    tmp_path: Path, url: str, revision: str | None
) -> None:
    error = fetch_error({"type": "git", "url": url, "revision": revision}, tmp_path / "tree")
    assert error.code == "invalid_source"
    assert not Path("/tmp/scalarium-pwned").exists()


# -- git over ssh with a deploy key (a stand-in ssh runs the remote command locally) --------------

FAKE_SSH = """#!/bin/sh
# Stand-in for OpenSSH: records what it was given, then runs the remote command locally.
log={log}
printf '%s\\n' "$@" > "$log.args"
prev=""
for arg in "$@"; do
  if [ "$prev" = "-i" ]; then
    stat -c '%a' "$arg" > "$log.mode"; cat "$arg" > "$log.key"; echo "$arg" > "$log.keypath"
  fi
  prev="$arg"
done
{before_exec}
for last in "$@"; do :; done
exec sh -c "$last"
"""


def fake_ssh(directory: Path, before_exec: str = "") -> Path:
    """Put a stand-in ``ssh`` in ``directory``; return the prefix of the files it records."""
    directory.mkdir(exist_ok=True)
    log = directory / "ssh"
    script = directory / "ssh-bin" / "ssh"
    script.parent.mkdir()
    script.write_text(FAKE_SSH.format(log=log, before_exec=before_exec))
    script.chmod(0o755)
    return log


@pytest.fixture
def ssh_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in ssh first on PATH; the prefix of the files it records."""
    log = fake_ssh(tmp_path / "ssh")
    monkeypatch.setenv("PATH", f"{log.parent / 'ssh-bin'}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.mark.parametrize("style", ["ssh://git@git.example.invalid{path}", "git@git.example:{path}"])
def test_git_over_ssh_uses_the_deploy_key_from_a_0600_file_removed_afterwards(
    origin: Origin, ssh_log: Path, tmp_path: Path, style: str
) -> None:
    known_hosts = tmp_path / "known_hosts"
    source = {
        "type": "git",
        "url": style.format(path=origin.bare),
        "revision": "feature",
        "ssh_key": DEPLOY_KEY,
    }
    fetched = fetch_source(source, tmp_path / "tree", known_hosts_file=known_hosts)
    assert fetched.revision == origin.shas["feature"]
    assert Path(f"{ssh_log}.mode").read_text().strip() == "600"
    assert Path(f"{ssh_log}.key").read_text() == DEPLOY_KEY + "\n"
    assert not Path(Path(f"{ssh_log}.keypath").read_text().strip()).exists()
    args = Path(f"{ssh_log}.args").read_text().splitlines()
    for option in (
        "IdentitiesOnly=yes",
        "StrictHostKeyChecking=accept-new",
        "BatchMode=yes",
        f"UserKnownHostsFile={known_hosts}",
    ):
        assert option in args
    assert "THIS-IS-A-TEST-KEY" not in "\n".join(args)


def test_git_timeout_kills_the_whole_process_group(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake_ssh(tmp_path / "ssh", before_exec='echo $$ > "$log.pid"; exec sleep 60')
    monkeypatch.setenv("PATH", f"{log.parent / 'ssh-bin'}{os.pathsep}{os.environ['PATH']}")
    source = {"type": "git", "url": f"ssh://h{origin.bare}", "ssh_key": DEPLOY_KEY}
    started = time.monotonic()
    error = fetch_error(source, tmp_path / "tree", timeout=1.5)
    assert error.code == "timeout"
    assert time.monotonic() - started < 10
    pid = int(Path(f"{log}.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the stand-in ssh outlived the timeout"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# -- git over http with basic auth (git http-backend behind a tiny CGI server) --------------------


def processes_showing(secret: str) -> list[str]:
    """Every process whose argv or environment contains ``secret``."""
    needle = secret.encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(os.getpid()):
            continue
        for part in ("cmdline", "environ"):
            try:
                data = (proc / part).read_bytes()
            except OSError:
                continue
            if needle in data:
                found.append(f"{proc.name} {part}: {data[:200]!r}")
    return found


@dataclass
class GitHttp:
    """A running smart-http git server and what it saw."""

    url: str
    leaks: list[str] = field(default_factory=list)
    authenticated: list[str] = field(default_factory=list)


def _git_http_handler(root: Path, state: GitHttp) -> type[BaseHTTPRequestHandler]:
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.serve()

        def do_POST(self) -> None:
            self.serve()

        def serve(self) -> None:
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            # git is waiting on this answer right now: its helpers' argv and env are visible.
            state.leaks.extend(processes_showing(PASSWORD))
            state.authenticated.append(self.path)
            path, _, query = self.path.partition("?")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            env = {
                "PATH": os.environ["PATH"],
                "GIT_PROJECT_ROOT": str(root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "REQUEST_METHOD": self.command,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_USER": USER,
                "REMOTE_ADDR": "127.0.0.1",
                "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            }
            done = subprocess.run(
                ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
            )
            head, _, payload = done.stdout.partition(b"\r\n\r\n")
            headers = [line.split(":", 1) for line in head.decode().split("\r\n") if ":" in line]
            status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
            self.send_response(status)
            for key, value in headers:
                if key.lower() != "status":
                    self.send_header(key, value.strip())
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@pytest.fixture(scope="module")
def git_http(origin: Origin) -> Iterator[GitHttp]:
    """Smart-http git on loopback, basic auth required."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = GitHttp(url=f"http://127.0.0.1:{server.server_address[1]}/origin.git")
    server.RequestHandlerClass = _git_http_handler(origin.base, state)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("in_url", [False, True])
def test_git_over_http_authenticates_through_askpass_without_exposing_the_password(
    origin: Origin, git_http: GitHttp, tmp_path: Path, in_url: bool
) -> None:
    git_http.leaks.clear()
    git_http.authenticated.clear()
    if in_url:
        url = git_http.url.replace("http://", f"http://{USER}:{PASSWORD}@")
        source = {"type": "git", "url": url, "revision": "main"}
    else:
        source = {
            "type": "git",
            "url": git_http.url,
            "revision": "main",
            "username": USER,
            "password": PASSWORD,
        }
    messages: list[str] = []
    fetched = fetch_source(source, tmp_path / "tree", progress=messages.append)
    assert fetched.revision == origin.shas["main"]
    assert git_http.authenticated, "the server never saw an authenticated request"
    assert git_http.leaks == []
    assert PASSWORD not in fetched.url
    assert messages and not [m for m in messages if PASSWORD in m]


@pytest.mark.parametrize(
    "credentials",
    [
        {"username": USER, "password": "wrong-password-123"},
        {},
        {"url_credentials": f"{USER}:wrong-password-123@"},
    ],
)
def test_git_over_http_with_bad_credentials_is_auth_failed_and_never_shows_them(
    git_http: GitHttp, tmp_path: Path, credentials: dict[str, str]
) -> None:
    url = git_http.url.replace("http://", "http://" + credentials.pop("url_credentials", ""))
    source = {"type": "git", "url": url, **credentials}
    error = fetch_error(source, tmp_path / "tree", timeout=30)
    assert error.code == "source_auth_failed"
    assert "wrong-password-123" not in f"{error} {error.details}"


# -- archives over http ---------------------------------------------------------------------------


def make_tarball(files: dict[str, bytes]) -> bytes:
    """A .tar.gz holding ``files`` (name -> content); a name may climb out on purpose."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_zip(files: dict[str, bytes]) -> bytes:
    """A .zip holding ``files``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()


GITHUB_STYLE = {
    "acme-cookbooks-0a1b2c3/cookbooks/app/metadata.rb": metadata_rb("app", "1.2.3").encode(),
    "acme-cookbooks-0a1b2c3/roles/web.json": b"{}",
}


@dataclass
class FileServer:
    """A loopback http server of fixed routes; counts what it sent on the endless route."""

    url: str
    routes: dict[str, bytes]
    endless_sent: list[int] = field(default_factory=list)
    endless_done: threading.Event = field(default_factory=threading.Event)


def _file_handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.startswith("/private/") and self.headers.get("Authorization") != auth:
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/endless.tar.gz":
                self.endless(declared=None)
            elif self.path == "/declared-huge.tar.gz":
                self.endless(declared=100 * MiB)
            elif self.path in state.routes:
                data = state.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def endless(self, declared: int | None) -> None:
            self.send_response(200)
            if declared is not None:
                self.send_header("Content-Length", str(declared))
            self.end_headers()
            sent = 0
            try:
                while sent < 64 * MiB:
                    self.wfile.write(b"\0" * (256 * 1024))
                    sent += 256 * 1024
            except OSError:
                pass
            finally:
                state.endless_sent.append(sent)
                state.endless_done.set()

    return Handler


@pytest.fixture(scope="module")
def file_server() -> Iterator[FileServer]:
    """Serves archives on loopback."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = FileServer(url=f"http://127.0.0.1:{server.server_address[1]}", routes={})
    server.RequestHandlerClass = _file_handler(state)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("name", "build"),
    [("cookbooks.tar.gz", make_tarball), ("cookbooks.tgz", make_tarball), ("c.zip", make_zip)],
)
def test_archive_download_unpacks_with_the_top_level_directory_stripped(
    file_server: FileServer, tmp_path: Path, name: str, build: Callable[[dict[str, bytes]], bytes]
) -> None:
    data = build(GITHUB_STYLE)
    file_server.routes[f"/{name}"] = data
    digest = hashlib.sha256(data).hexdigest()
    source = {"type": "archive", "url": f"{file_server.url}/{name}", "sha256": digest.upper()}
    fetched = fetch_source(source, tmp_path / "tree")
    assert (fetched.type, fetched.revision) == (SourceType.ARCHIVE, f"sha256:{digest}")
    assert sorted(p.name for p in fetched.path.iterdir()) == ["cookbooks", "roles"]
    assert find_cookbooks(fetched.path) == {"app": fetched.path / "cookbooks/app"}
    assert stat.S_IMODE(fetched.path.stat().st_mode) == 0o755


def test_archive_with_a_wrong_sha256_is_refused(file_server: FileServer, tmp_path: Path) -> None:
    file_server.routes["/pinned.tar.gz"] = make_tarball(GITHUB_STYLE)
    source = {"type": "archive", "url": f"{file_server.url}/pinned.tar.gz", "sha256": "ab" * 32}
    assert fetch_error(source, tmp_path / "tree").code == "source_checksum_mismatch"


@pytest.mark.parametrize("path", ["/endless.tar.gz", "/declared-huge.tar.gz"])
def test_oversized_archive_download_is_refused_without_reading_it_all(
    file_server: FileServer, tmp_path: Path, path: str
) -> None:
    file_server.endless_sent.clear()
    file_server.endless_done.clear()
    source = {"type": "archive", "url": file_server.url + path}
    assert fetch_error(source, tmp_path / "tree", max_bytes=1 * MiB).code == "source_too_large"
    assert file_server.endless_done.wait(10)
    assert file_server.endless_sent[0] < 64 * MiB


@pytest.mark.parametrize(
    ("files", "code_prefix"),
    [
        ({"../evil.txt": b"x"}, "archive_"),
        ({"top/../../evil.txt": b"x"}, "archive_"),
        ({"/etc/evil.txt": b"x"}, "archive_"),
    ],
)
def test_hostile_archive_is_refused_with_the_archive_code(
    file_server: FileServer, tmp_path: Path, files: dict[str, bytes], code_prefix: str
) -> None:
    file_server.routes["/hostile.tar.gz"] = make_tarball(files)
    source = {"type": "archive", "url": f"{file_server.url}/hostile.tar.gz"}
    error = fetch_error(source, tmp_path / "sub" / "tree")
    assert error.code.startswith(code_prefix)
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize(
    ("path", "credentials", "code"),
    [
        ("/missing.tar.gz", {}, "source_unreachable"),
        ("/private/c.tar.gz", {}, "source_auth_failed"),
        ("/private/c.tar.gz", {"username": USER, "password": "nope"}, "source_auth_failed"),
        ("/private/c.tar.gz", {"username": USER, "password": PASSWORD}, None),
    ],
)
def test_archive_http_errors_and_basic_auth(
    file_server: FileServer,
    tmp_path: Path,
    path: str,
    credentials: dict[str, str],
    code: str | None,
) -> None:
    file_server.routes["/private/c.tar.gz"] = make_tarball(GITHUB_STYLE)
    source = {"type": "archive", "url": file_server.url + path, **credentials}
    if code is None:
        assert (fetch_source(source, tmp_path / "tree").path / "cookbooks/app").is_dir()
    else:
        assert fetch_error(source, tmp_path / "tree").code == code


def test_archive_from_an_unreachable_server_is_source_unreachable(tmp_path: Path) -> None:
    source = {"type": "archive", "url": f"http://127.0.0.1:{free_port()}/c.tar.gz"}
    assert fetch_error(source, tmp_path / "tree").code == "source_unreachable"


# -- S3 through moto -------------------------------------------------------------------------------


def test_s3_object_is_downloaded_and_unpacked(
    moto_server: moto.MotoServer, aws_test_env: dict[str, str], tmp_path: Path
) -> None:
    client = boto3.client("s3", endpoint_url=moto_server.endpoint_url)
    client.create_bucket(Bucket="cookbooks")
    data = make_tarball(GITHUB_STYLE)
    client.put_object(Bucket="cookbooks", Key="stacks/prod.tar.gz", Body=data)
    source = {
        "type": "s3",
        "url": "s3://cookbooks/stacks/prod.tar.gz",
        "username": moto.ACCESS_KEY_ID,
        "password": moto.SECRET_ACCESS_KEY,
    }
    fetched = fetch_source(source, tmp_path / "tree", s3_endpoint_url=moto_server.endpoint_url)
    assert fetched.revision == f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert find_cookbooks(fetched.path) == {"app": fetched.path / "cookbooks/app"}

    missing = {"type": "s3", "url": "s3://cookbooks/stacks/none.tar.gz"}  # default chain
    error = fetch_error(missing, tmp_path / "t2", s3_endpoint_url=moto_server.endpoint_url)
    assert error.code == "source_unreachable"
    too_large = fetch_error(
        source, tmp_path / "t3", s3_endpoint_url=moto_server.endpoint_url, max_bytes=16
    )
    assert too_large.code == "source_too_large"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/a/b.tgz", S3Location("bucket", "a/b.tgz")),
        ("https://bucket.s3.amazonaws.com/a/b.tgz", S3Location("bucket", "a/b.tgz")),
        (
            "https://my.bucket.s3.eu-west-1.amazonaws.com/k.tgz",
            S3Location("my.bucket", "k.tgz", "eu-west-1"),
        ),
        ("https://s3.amazonaws.com/bucket/k.tgz", S3Location("bucket", "k.tgz")),
        ("https://s3.us-west-2.amazonaws.com/b/k%20x.tgz", S3Location("b", "k x.tgz", "us-west-2")),
        ("https://b.s3-ap-southeast-1.amazonaws.com/k", S3Location("b", "k", "ap-southeast-1")),
    ],
)
def test_parse_s3_url_accepts_every_url_style(url: str, expected: S3Location) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize(
    "url", ["s3://bucket", "s3://bucket/", "https://example.com/b/k", "ftp://b/k"]
)
def test_parse_s3_url_refuses_what_names_no_object(url: str) -> None:
    with pytest.raises(SourceError) as caught:
        parse_s3_url(url)
    assert caught.value.code == "invalid_source"


# -- local directories ----------------------------------------------------------------------------


def test_directory_is_copied_with_inside_links_kept_and_vcs_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src, {"app/metadata.rb": metadata_rb("app", "1.0.0"), "app/files/a.txt": "a"})
    write(src, {".git/config": "[core]", "app/recipes/default.rb": "package 'x'"})
    (src / "app/files/b.txt").symlink_to("a.txt")
    (src / "app/files/abs.txt").symlink_to(src / "app/files/a.txt")
    (src / "app/recipes/default.rb").chmod(0o755)
    fetched = fetch_source({"type": "directory", "url": str(src)}, tmp_path / "tree")
    tree = fetched.path
    assert not (tree / ".git").exists()
    assert (tree / "app/files/b.txt").read_text() == "a"
    assert os.readlink(tree / "app/files/abs.txt") == "a.txt"  # rewritten to stay inside
    assert stat.S_IMODE((tree / "app/recipes/default.rb").stat().st_mode) == 0o755
    assert fetched.revision.startswith("sha256:")
    again = fetch_source({"type": "directory", "url": src.as_uri()}, tmp_path / "again")
    assert again.revision == fetched.revision
    (src / "app/files/a.txt").write_text("changed")
    changed = fetch_source({"type": "directory", "url": str(src)}, tmp_path / "changed")
    assert changed.revision != fetched.revision


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside.txt", "/"])
def test_directory_with_a_link_outside_is_refused(tmp_path: Path, target: str) -> None:
    src = tmp_path / "src"
    write(src, {"app/metadata.rb": metadata_rb("app", "1.0.0")})
    (tmp_path / "outside.txt").write_text("secret")
    (src / "app/leak").symlink_to(target)
    error = fetch_error({"type": "directory", "url": str(src)}, tmp_path / "tree")
    assert error.code == "source_link_outside"


def test_directory_larger_than_the_cap_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src, {"app/metadata.rb": metadata_rb("app", "1.0.0"), "app/big": "x" * 5000})
    error = fetch_error({"type": "directory", "url": str(src)}, tmp_path / "tree", max_bytes=4096)
    assert error.code == "source_too_large"


# -- source validation and the pure helpers ------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "code"),
    [
        (
            {"type": "chef_server", "url": "https://chef.example.invalid/organizations/o"},
            "invalid_source",
        ),
        ({"type": "svn", "url": "svn://x"}, "invalid_source"),
        ({"type": "git"}, "invalid_source"),
        ({"type": "git", "url": 42}, "invalid_source"),
        ({"type": "archive", "url": "file:///etc/passwd"}, "invalid_source"),
        (
            {"type": "archive", "url": "http://127.0.0.1:9/c.tgz", "sha256": "xyz"},
            "source_unreachable",
        ),
        ({"type": "directory", "url": "relative/dir"}, "invalid_source"),
        ({"type": "directory", "url": "/nonexistent/scalarium/dir"}, "source_unreachable"),
    ],
)
def test_bad_sources_are_refused_with_a_code(
    tmp_path: Path, source: dict[str, Any], code: str
) -> None:
    assert fetch_error(source, tmp_path / "tree").code == code


def test_fetch_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "keep").write_text("mine")
    with pytest.raises(SourceError) as caught:
        fetch_source({"type": "directory", "url": str(tmp_path)}, tmp_path / "tree")
    assert caught.value.code == "invalid_source"
    assert (tmp_path / "tree" / "keep").read_text() == "mine"


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://github.com/acme/cookbooks.git", "https"),
        ("http://127.0.0.1/repo.git", "http"),
        ("ssh://git@github.com:22/acme/cookbooks.git", "ssh"),
        ("git@github.com:acme/cookbooks.git", "ssh"),
        ("github.com:acme/cookbooks.git", "ssh"),
        ("git://127.0.0.1/repo.git", "git"),
        ("file:///srv/repo.git", "file"),
        ("/srv/repo.git", "file"),
    ],
)
def test_git_url_kind_recognises_every_git_url_form(url: str, kind: str) -> None:
    assert git_url_kind(url) == kind


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://u:p%40ss@host/r.git", ("https://host/r.git", "u", "p@ss")),
        ("https://u@host/r.git", ("https://host/r.git", "u", None)),
        ("https://host/r.git", ("https://host/r.git", None, None)),
    ],
)
def test_split_url_credentials_moves_them_out_of_the_url(
    url: str, expected: tuple[str, str | None, str | None]
) -> None:
    assert split_url_credentials(url) == expected


@pytest.mark.parametrize(
    ("text", "secrets", "expected"),
    [
        ("fatal: https://bob:hunter2@host/r.git", (), "fatal: https://bob:***@host/r.git"),
        ("key ABCDEF in message", ("ABCDEF",), "key *** in message"),
        ("ssh://git@host/r.git", (), "ssh://git@host/r.git"),
    ],
)
def test_scrub_hides_secrets_and_url_passwords(
    text: str, secrets: tuple[str, ...], expected: str
) -> None:
    assert scrub(text, secrets) == expected


@pytest.mark.parametrize(
    ("stderr", "code", "reason"),
    [
        ("fatal: couldn't find remote ref nope", "revision_not_found", None),
        ("fatal: Authentication failed for 'https://host/r.git/'", "source_auth_failed", None),
        (
            "fatal: could not read Username for 'https://host': terminal prompts disabled",
            "source_auth_failed",
            None,
        ),
        ("git@host: Permission denied (publickey).", "source_auth_failed", None),
        ("Host key verification failed.", "source_auth_failed", "host_key"),
        ("fatal: unable to connect to 127.0.0.1:", "source_unreachable", None),
        ("fatal: transport 'ext' not allowed", "invalid_source", "protocol"),
    ],
)
def test_classify_git_error(stderr: str, code: str, reason: str | None) -> None:
    assert classify_git_error(stderr) == (code, reason)


@pytest.mark.parametrize("revision", ["main", "v1.2.3", "release/2024-01", "abc1234", "HEAD"])
def test_check_revision_accepts_branches_tags_and_shas(revision: str) -> None:
    assert check_revision(revision) == revision


# -- layouts of a fetched tree --------------------------------------------------------------------


def test_find_cookbooks_in_a_chef_repo(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "cookbooks/app/metadata.rb": metadata_rb("app", "1.0.0"),
            "cookbooks/apt-7.5.0/metadata.json": '{"name": "apt", "version": "7.5.0"}',
            "cookbooks/README.md": "docs",
            "cookbooks/notes/readme.txt": "not a cookbook",
            "site-cookbooks/local/metadata.rb": metadata_rb("local", "0.1.0"),
            "roles/web.json": "{}",
            "environments/prod.json": "{}",
            "data_bags/users/alice.json": "{}",
        },
    )
    assert detect_layout(tmp_path) is RepositoryLayout.CHEF_REPO
    assert find_cookbooks(tmp_path) == {
        "app": tmp_path / "cookbooks/app",
        "apt": tmp_path / "cookbooks/apt-7.5.0",
        "local": tmp_path / "site-cookbooks/local",
    }
    assert find_repo_dirs(tmp_path) == {
        name: tmp_path / name for name in ("roles", "environments", "data_bags")
    }


def test_find_cookbooks_in_an_opsworks_style_repository(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "app/metadata.rb": metadata_rb("app", "1.0.0"),
            "nginx_custom/metadata.rb": metadata_rb("nginx_custom", "0.2.0"),
            ".github/workflows/ci.yml": "on: push",
            "roles/web.json": "{}",
            "README.md": "docs",
        },
    )
    assert detect_layout(tmp_path) is RepositoryLayout.COOKBOOKS
    assert find_cookbooks(tmp_path) == {
        "app": tmp_path / "app",
        "nginx_custom": tmp_path / "nginx_custom",
    }
    assert find_repo_dirs(tmp_path) == {"roles": tmp_path / "roles"}


def test_find_cookbooks_in_a_single_cookbook_repository(tmp_path: Path) -> None:
    write(tmp_path, {"metadata.rb": metadata_rb("solo", "1.0.0"), "recipes/default.rb": ""})
    write(tmp_path, {"roles/not-repo-roles.json": "{}"})
    assert detect_layout(tmp_path) is RepositoryLayout.SINGLE_COOKBOOK
    assert find_cookbooks(tmp_path) == {"solo": tmp_path}
    assert find_repo_dirs(tmp_path) == {}


def test_find_cookbooks_refuses_two_cookbooks_with_one_name(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "cookbooks/app/metadata.rb": metadata_rb("app", "1.0.0"),
            "site-cookbooks/app-fork/metadata.rb": metadata_rb("app", "1.1.0"),
        },
    )
    with pytest.raises(RepositoryError) as caught:
        find_cookbooks(tmp_path)
    assert caught.value.code == "cookbook_duplicate"
