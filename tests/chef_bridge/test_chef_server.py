"""ChefServerClient against goiardi (CRUD, cookbooks, errors) and against loopback test servers
(retries, timeouts, organization prefix, file URL checks)."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chef_bridge import auth
from chef_bridge.chef_server import (
    ChefServerClient,
    ChefServerError,
    ErrorCode,
    backoff_delay,
    build_manifest,
    error_code_for_status,
    manifest_files,
    server_message,
    sort_versions,
)
from tests.chef_bridge import goiardi
from tests.chef_bridge.goiardi import Goiardi

pytestmark = pytest.mark.goiardi

goiardi_server = goiardi.goiardi_server

VERSIONS = ["1.0", "1.1", "1.3"]


def new_key() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def stranger_key() -> bytes:
    return new_key()


def admin_client(server: Goiardi, version: str = "1.3") -> ChefServerClient:
    return ChefServerClient(
        server.url, server.admin_name, server.admin_key, signing_version=version
    )


def write_cookbook(root: Path, name: str, version: str) -> Path:
    """A small cookbook: metadata.json, a recipe, a template, an attribute file, and extras."""
    files = {
        "metadata.json": json.dumps(
            {"name": name, "version": version, "dependencies": {"apt": ">= 2.0"}}, indent=2
        ),
        "recipes/default.rb": f"template '/etc/{name}.conf' do\n  source 'site.conf.erb'\nend\n",
        "templates/default/site.conf.erb": "listen <%= node['web']['port'] %>\n",
        "attributes/default.rb": "default['web']['port'] = 8080\n",
        "README.md": f"# {name}\n",
        "spec/default_spec.rb": "# not part of a Chef upload\n",
        ".git/HEAD": "ref: refs/heads/main\n",
    }
    cookbook = root / f"{name}-{version}"
    for relative, text in files.items():
        (cookbook / relative).parent.mkdir(parents=True, exist_ok=True)
        (cookbook / relative).write_text(text)
    return cookbook


# --- pure pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, ErrorCode.UNAUTHORIZED),
        (403, ErrorCode.FORBIDDEN),
        (404, ErrorCode.NOT_FOUND),
        (409, ErrorCode.CONFLICT),
        (400, ErrorCode.BAD_REQUEST),
        (413, ErrorCode.BAD_REQUEST),
        (500, ErrorCode.SERVER_ERROR),
        (503, ErrorCode.SERVER_ERROR),
        (302, ErrorCode.BAD_RESPONSE),
    ],
)
def test_http_statuses_map_to_error_codes(status: int, code: ErrorCode) -> None:
    assert error_code_for_status(status) is code


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error":["Cannot load role nope"]}\n', "Cannot load role nope"),
        (b'{"error":["one","two"]}', "one; two"),
        (b'{"error":"plain string"}', "plain string"),
        (b'{"error_messages":["bad field"]}', "bad field"),
        (b"File with checksum 0000 not found\n", "File with checksum 0000 not found"),
        (b"", ""),
    ],
)
def test_server_message_extracts_chef_error_bodies(body: bytes, message: str) -> None:
    assert server_message(body) == message


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(0, 1.0, 0.5), (0, 0.0, 0.25), (1, 1.0, 1.0), (3, 1.0, 4.0), (4, 1.0, 8.0), (10, 1.0, 8.0)],
)
def test_backoff_doubles_and_is_capped(attempt: int, jitter: float, expected: float) -> None:
    assert backoff_delay(attempt, base=0.5, cap=8.0, jitter=jitter) == pytest.approx(expected)


def test_versions_sort_numerically_newest_first() -> None:
    assert sort_versions(["1.9.0", "1.10.0", "0.2.1", "1.2"]) == ["1.10.0", "1.9.0", "1.2", "0.2.1"]


@pytest.mark.parametrize(
    "path", ["../etc/passwd", "/etc/passwd", "recipes/../../x", "a\\b", "", "recipes/./x"]
)
def test_manifest_paths_that_escape_the_cookbook_are_refused(path: str) -> None:
    manifest = {"recipes": [{"path": path, "checksum": "0" * 32, "url": "/file_store/x"}]}
    with pytest.raises(ChefServerError) as caught:
        manifest_files(manifest)
    assert caught.value.code is ErrorCode.BAD_RESPONSE


def test_manifest_files_reads_segments_and_api_v2_all_files_alike() -> None:
    entry = {"path": "recipes/default.rb", "checksum": "a" * 32, "url": "/file_store/a"}
    by_segment = manifest_files({"recipes": [entry], "root_files": []})
    by_all_files = manifest_files({"all_files": [entry]})
    assert [f.path for f in by_segment] == [f.path for f in by_all_files] == ["recipes/default.rb"]


def test_upload_manifest_skips_files_knife_would_not_upload(tmp_path: Path) -> None:
    manifest, files = build_manifest(write_cookbook(tmp_path, "web", "1.0.0"))
    paths = {
        entry["path"]
        for segment in manifest.values()
        if isinstance(segment, list)
        for entry in segment
    }
    assert paths == {
        "metadata.json",
        "README.md",
        "recipes/default.rb",
        "templates/default/site.conf.erb",
        "attributes/default.rb",
    }
    assert len(files) == 5
    assert manifest["templates"][0]["specificity"] == "default"


def test_upload_manifest_of_a_metadata_rb_cookbook_carries_its_metadata(tmp_path: Path) -> None:
    cookbook = tmp_path / "db"
    (cookbook / "recipes").mkdir(parents=True)
    (cookbook / "recipes" / "default.rb").write_text("package 'postgresql'\n")
    (cookbook / "metadata.rb").write_text(
        "name 'db'\nversion '2.1.0'\ndepends 'apt', '~> 7.0'\nsupports 'ubuntu', '>= 20.04'\n"
    )
    manifest, files = build_manifest(cookbook)
    assert (manifest["cookbook_name"], manifest["version"], manifest["name"]) == (
        "db",
        "2.1.0",
        "db-2.1.0",
    )
    assert manifest["metadata"]["dependencies"] == {"apt": "~> 7.0"}
    assert manifest["metadata"]["platforms"] == {"ubuntu": ">= 20.04"}
    assert [entry["path"] for entry in manifest["root_files"]] == ["metadata.rb"]
    assert len(files) == 2


@pytest.mark.parametrize(
    ("url", "allowed", "resolved"),
    [
        ("/file_store/abc", (), "http://chef.test:4545/file_store/abc"),
        ("http://chef.test:4545/file_store/abc", (), "http://chef.test:4545/file_store/abc"),
        ("http://CHEF.test:4545/x", (), "http://CHEF.test:4545/x"),
        ("http://chef.test:4546/file_store/abc", (), None),
        ("https://chef.test:4545/file_store/abc", (), None),
        ("http://evil.test/file_store/abc", (), None),
        ("https://s3.test/bucket/abc?sig=1", ("s3.test",), "https://s3.test/bucket/abc?sig=1"),
        ("https://s3.test/bucket/abc", ("s3.test:443",), "https://s3.test/bucket/abc"),
        ("https://s3.test:8443/bucket/abc", ("s3.test:443",), None),
    ],
)
def test_file_urls_resolve_on_the_server_and_other_hosts_are_refused(
    url: str, allowed: tuple[str, ...], resolved: str | None
) -> None:
    client = ChefServerClient("http://chef.test:4545", "me", KEY, file_hosts=allowed)
    if resolved is None:
        with pytest.raises(ChefServerError) as caught:
            client.file_url(url)
        assert caught.value.code is ErrorCode.BAD_RESPONSE
    else:
        assert client.file_url(url) == resolved


# --- loopback test servers ------------------------------------------------------------------


@dataclass
class Script:
    """What a loopback server answers, in order (the last answer repeats), and what it saw."""

    answers: list[tuple[int, bytes]]
    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def scripted() -> Iterator[tuple[str, Script]]:
    script = Script(answers=[(200, b"{}")])

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            script.seen.append((self.command, self.path, dict(self.headers), body))
            index = min(len(script.seen), len(script.answers)) - 1
            status, payload = script.answers[index]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", script
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


KEY = new_key()


def fast_client(url: str, **options: Any) -> ChefServerClient:
    settings: dict[str, Any] = {"retries": 3, "backoff": 0.01, "timeout": 2.0}
    settings.update(options)
    return ChefServerClient(url, "me", KEY, **settings)


def test_retries_503_until_the_server_answers(scripted: tuple[str, Script]) -> None:
    url, script = scripted
    script.answers = [(503, b'{"error":["busy"]}'), (503, b"{}"), (200, b'{"web":"/roles/web"}')]
    assert fast_client(url).list_roles() == ["web"]
    assert len(script.seen) == 3


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, ErrorCode.BAD_REQUEST),
        (401, ErrorCode.UNAUTHORIZED),
        (403, ErrorCode.FORBIDDEN),
        (404, ErrorCode.NOT_FOUND),
        (409, ErrorCode.CONFLICT),
    ],
)
def test_client_errors_are_not_retried(
    scripted: tuple[str, Script], status: int, code: ErrorCode
) -> None:
    url, script = scripted
    script.answers = [(status, b'{"error":["no"]}')]
    with pytest.raises(ChefServerError) as caught:
        fast_client(url).get_role("web")
    assert (caught.value.code, caught.value.status, caught.value.server_message) == (
        code,
        status,
        "no",
    )
    assert caught.value.path == "/roles/web"
    assert len(script.seen) == 1


def test_persistent_5xx_fails_as_server_error_after_every_retry(
    scripted: tuple[str, Script],
) -> None:
    url, script = scripted
    script.answers = [(500, b'{"error":["boom"]}')]
    with pytest.raises(ChefServerError) as caught:
        fast_client(url, retries=2).list_nodes()
    assert caught.value.code is ErrorCode.SERVER_ERROR
    assert "boom" in str(caught.value)
    assert len(script.seen) == 3


@pytest.mark.parametrize(
    ("body", "expected"), [(b"<html>oops</html>", "not JSON"), (b"", "JSON object")]
)
def test_unusable_answers_are_bad_responses(
    scripted: tuple[str, Script], body: bytes, expected: str
) -> None:
    url, script = scripted
    script.answers = [(200, body)]
    with pytest.raises(ChefServerError, match=expected) as caught:
        fast_client(url).list_roles()
    assert caught.value.code is ErrorCode.BAD_RESPONSE


def test_a_server_that_never_answers_is_unreachable_within_the_timeouts() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts connections; nobody ever reads or answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ChefServerError) as caught:
            fast_client(url, timeout=0.3, retries=2).list_roles()
        elapsed = time.monotonic() - started
    assert caught.value.code is ErrorCode.UNREACHABLE
    assert 0.9 <= elapsed < 3.0


def test_a_refused_connection_is_unreachable_after_the_retries() -> None:
    port = goiardi.free_loopback_port()
    sleeps: list[float] = []
    client = fast_client(f"http://127.0.0.1:{port}", retries=2, sleep=sleeps.append)
    with pytest.raises(ChefServerError) as caught:
        client.get_node("web1")
    assert caught.value.code is ErrorCode.UNREACHABLE
    assert len(sleeps) == 2


def test_organization_prefixes_paths_and_the_signature_covers_them(
    scripted: tuple[str, Script],
) -> None:
    url, script = scripted
    script.answers = [(201, b'{"uri":"x"}')]
    key = auth.load_private_key(KEY)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for client in (
        fast_client(url, organization="acme"),
        fast_client(url + "/organizations/acme"),  # knife's chef_server_url form
    ):
        script.seen.clear()
        client.create_role({"name": "web"})
        method, path, headers, body = script.seen[0]
        assert (method, path) == ("POST", "/organizations/acme/roles")
        assert json.loads(body) == {"name": "web"}
        auth.verify_request(public, method, path, body, headers)
        assert auth.lower_headers(headers)["x-ops-server-api-version"] == "1"


def test_download_with_a_wrong_checksum_is_refused_and_leaves_no_file(
    scripted: tuple[str, Script], tmp_path: Path
) -> None:
    url, script = scripted
    script.answers = [(200, b"tampered")]
    client = fast_client(url)
    with pytest.raises(ChefServerError) as caught:
        client.fetch_file("/file_store/x", checksum=hashlib.md5(b"original").hexdigest())
    assert caught.value.code is ErrorCode.BAD_RESPONSE
    target = tmp_path / "x"
    with pytest.raises(ChefServerError):
        client.save_file("/file_store/x", target, checksum=hashlib.md5(b"original").hexdigest())
    assert not target.exists()


def test_the_key_never_appears_in_repr_or_logs(
    scripted: tuple[str, Script], caplog: pytest.LogCaptureFixture
) -> None:
    url, script = scripted
    script.answers = [(503, b"{}"), (200, b"{}")]
    caplog.set_level(logging.DEBUG)
    client = fast_client(url)
    client.list_roles()
    secret = KEY.decode().splitlines()[1]
    assert secret not in repr(client)
    assert caplog.records, "the retry should have been logged"
    assert all(secret not in record.getMessage() for record in caplog.records)


# --- goiardi ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_node_crud_round_trip(goiardi_server: Goiardi, version: str) -> None:
    client = admin_client(goiardi_server, version)
    name = f"node-{version.replace('.', '-')}"
    node = {
        "name": name,
        "json_class": "Chef::Node",
        "chef_type": "node",
        "chef_environment": "_default",
        "run_list": ["recipe[web]"],
        "normal": {"scalarium": {"layer": "app"}},
    }
    client.create_node(node)
    assert name in client.list_nodes()
    assert client.get_node(name)["normal"] == {"scalarium": {"layer": "app"}}
    client.update_node(node | {"run_list": ["role[db]"]})
    assert client.get_node(name)["run_list"] == ["role[db]"]
    client.delete_node(name)
    assert name not in client.list_nodes()


@pytest.mark.parametrize("version", VERSIONS)
def test_role_crud_round_trip(goiardi_server: Goiardi, version: str) -> None:
    client = admin_client(goiardi_server, version)
    name = f"role-{version.replace('.', '-')}"
    role = {"name": name, "json_class": "Chef::Role", "chef_type": "role", "run_list": []}
    client.create_role(role | {"run_list": ["recipe[web]"]})
    assert client.get_role(name)["run_list"] == ["recipe[web]"]
    client.update_role(role | {"default_attributes": {"web": {"port": 81}}})
    assert client.get_role(name)["default_attributes"] == {"web": {"port": 81}}
    client.save_role(role | {"description": "saved"})  # exists: replaced
    client.save_role(role | {"name": name + "-new"})  # absent: created
    assert {name, name + "-new"} <= set(client.list_roles())
    assert client.get_role(name)["description"] == "saved"
    client.delete_role(name + "-new")
    assert name + "-new" not in client.list_roles()


@pytest.mark.parametrize("version", VERSIONS)
def test_environment_crud_round_trip(goiardi_server: Goiardi, version: str) -> None:
    client = admin_client(goiardi_server, version)
    name = f"env-{version.replace('.', '-')}"
    environment = {
        "name": name,
        "json_class": "Chef::Environment",
        "chef_type": "environment",
        "cookbook_versions": {"web": "~> 1.2"},
    }
    client.create_environment(environment)
    assert client.get_environment(name)["cookbook_versions"] == {"web": "~> 1.2"}
    client.update_environment(environment | {"override_attributes": {"tier": "staging"}})
    assert client.get_environment(name)["override_attributes"] == {"tier": "staging"}
    client.save_environment(environment | {"description": "saved"})
    assert client.get_environment(name)["description"] == "saved"
    assert {"_default", name} <= set(client.list_environments())


@pytest.mark.parametrize("version", VERSIONS)
def test_data_bag_crud_round_trip(goiardi_server: Goiardi, version: str) -> None:
    client = admin_client(goiardi_server, version)
    bag = f"bag-{version.replace('.', '-')}"
    client.create_data_bag(bag)
    client.create_data_bag_item(bag, {"id": "alice", "uid": 1000})
    client.update_data_bag_item(bag, {"id": "alice", "uid": 1001})
    client.save_data_bag_item(bag, {"id": "bob", "uid": 1002})
    assert bag in client.list_data_bags()
    assert client.list_data_bag_items(bag) == ["alice", "bob"]
    assert client.get_data_bag_item(bag, "alice") == {"id": "alice", "uid": 1001}
    client.delete_data_bag_item(bag, "bob")
    assert client.list_data_bag_items(bag) == ["alice"]


@pytest.mark.parametrize("version", VERSIONS)
def test_uploaded_cookbook_lists_and_downloads_byte_for_byte(
    goiardi_server: Goiardi, version: str, tmp_path: Path
) -> None:
    client = admin_client(goiardi_server, version)
    name = f"web{version.replace('.', '')}"
    older = write_cookbook(tmp_path, name, "1.9.0")
    newer = write_cookbook(tmp_path, name, "1.10.0")
    client.upload_cookbook(older)
    client.upload_cookbook(newer)

    assert client.list_cookbooks()[name] == ["1.10.0", "1.9.0"]
    assert client.cookbook_versions(name) == ["1.10.0", "1.9.0"]
    manifest = client.get_cookbook(name, "1.10.0")
    assert manifest["metadata"]["dependencies"] == {"apt": ">= 2.0"}
    files = manifest_files(manifest)
    assert {f.path for f in files} == {
        "metadata.json",
        "README.md",
        "recipes/default.rb",
        "templates/default/site.conf.erb",
        "attributes/default.rb",
    }
    for entry in files:
        original = (newer / entry.path).read_bytes()
        assert client.fetch_file(entry.url, entry.checksum) == original
        target = tmp_path / "download" / entry.path
        assert client.save_file(entry.url, target, entry.checksum) == len(original)
        assert target.read_bytes() == original


def test_wrong_key_is_unauthorized(goiardi_server: Goiardi, stranger_key: bytes) -> None:
    client = ChefServerClient(goiardi_server.url, goiardi_server.admin_name, stranger_key)
    with pytest.raises(ChefServerError) as caught:
        client.list_roles()
    assert (caught.value.code, caught.value.status) == (ErrorCode.UNAUTHORIZED, 401)


def test_missing_role_is_not_found_with_the_server_message(goiardi_server: Goiardi) -> None:
    with pytest.raises(ChefServerError) as caught:
        admin_client(goiardi_server).get_role("no-such-role")
    assert (caught.value.code, caught.value.status) == (ErrorCode.NOT_FOUND, 404)
    assert "no-such-role" in caught.value.server_message


def test_duplicate_create_is_a_conflict(goiardi_server: Goiardi) -> None:
    client = admin_client(goiardi_server)
    client.create_role({"name": "twice", "json_class": "Chef::Role", "chef_type": "role"})
    with pytest.raises(ChefServerError) as caught:
        client.create_role({"name": "twice", "json_class": "Chef::Role", "chef_type": "role"})
    assert (caught.value.code, caught.value.status) == (ErrorCode.CONFLICT, 409)


def test_non_admin_client_writing_a_role_is_forbidden(goiardi_server: Goiardi) -> None:
    created = admin_client(goiardi_server).request(
        "POST", "/clients", {"name": "plain", "admin": False}
    )
    plain = ChefServerClient(goiardi_server.url, "plain", created["private_key"])
    assert isinstance(plain.list_roles(), list)  # reading is allowed
    with pytest.raises(ChefServerError) as caught:
        plain.create_role({"name": "nope", "json_class": "Chef::Role", "chef_type": "role"})
    assert (caught.value.code, caught.value.status) == (ErrorCode.FORBIDDEN, 403)
