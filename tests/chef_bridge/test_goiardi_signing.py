"""goiardi, a real Chef server, accepts requests signed by chef_bridge.auth and refuses forgeries.

goiardi 0.11.10 (Debian) verifies protocol versions 1.0, 1.1 and 1.3 (and 1.2, which mixlib
never shipped and we do not speak).
"""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chef_bridge import auth
from tests.chef_bridge import goiardi
from tests.chef_bridge.goiardi import CHEF_VERSION, Goiardi, send, signed_request

pytestmark = pytest.mark.goiardi

# The fixture lives with its helpers; binding it here shares it without a conftest.
goiardi_server = goiardi.goiardi_server

VERSIONS = ["1.0", "1.1", "1.3"]


@pytest.fixture(scope="module")
def stranger_key() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_goiardi_accepts_signed_get_of_clients_and_nodes(
    goiardi_server: Goiardi, version: str
) -> None:
    for path in ("/clients", "/nodes"):
        answer = signed_request(goiardi_server, "GET", path, version=version)
        assert answer.status == 200, (path, answer.body, goiardi_server.log_tail())
    clients = json.loads(signed_request(goiardi_server, "GET", "/clients", version=version).body)
    assert "chef-validator" in clients


@pytest.mark.parametrize("version", VERSIONS)
def test_goiardi_accepts_signed_node_creation_and_read_back(
    goiardi_server: Goiardi, version: str
) -> None:
    name = f"web-{version.replace('.', '-')}"
    node = {
        "name": name,
        "json_class": "Chef::Node",
        "chef_type": "node",
        "chef_environment": "_default",
        "run_list": ["recipe[nginx]"],
        "normal": {"scalarium": {"layer": "app"}},
    }
    created = signed_request(
        goiardi_server, "POST", "/nodes", json.dumps(node).encode(), version=version
    )
    assert created.status == 201, (created.body, goiardi_server.log_tail())

    fetched = signed_request(goiardi_server, "GET", f"/nodes/{name}", version=version)
    assert fetched.status == 200, fetched.body
    assert json.loads(fetched.body)["run_list"] == ["recipe[nginx]"]


@pytest.mark.parametrize("version", VERSIONS)
def test_goiardi_refuses_a_signature_made_with_another_key(
    goiardi_server: Goiardi, stranger_key: bytes, version: str
) -> None:
    answer = signed_request(goiardi_server, "GET", "/clients", version=version, key=stranger_key)
    assert answer.status == 401, answer.body


@pytest.mark.parametrize("version", VERSIONS)
def test_goiardi_refuses_a_signature_replayed_on_another_path(
    goiardi_server: Goiardi, version: str
) -> None:
    headers = auth.sign_request(
        goiardi_server.admin_key, goiardi_server.admin_name, "GET", "/nodes", b"", version=version
    )
    headers |= {"Accept": "application/json", "X-Chef-Version": CHEF_VERSION}
    answer = send(goiardi_server.url, "GET", "/clients", b"", headers)
    assert answer.status == 401, answer.body


def test_goiardi_refuses_an_unsigned_request(goiardi_server: Goiardi) -> None:
    answer = send(goiardi_server.url, "GET", "/clients", b"", {"Accept": "application/json"})
    assert answer.status == 401, answer.body


@pytest.mark.parametrize("version", VERSIONS)
def test_public_key_served_by_goiardi_verifies_our_signatures(
    goiardi_server: Goiardi, version: str
) -> None:
    # The server side of chef_bridge must take keys in the form Chef servers store them.
    user = json.loads(signed_request(goiardi_server, "GET", "/users/admin").body)
    headers = auth.sign_request(
        goiardi_server.admin_key, "admin", "PUT", "/nodes/web1", b"{}", version=version
    )
    auth.verify_request(user["public_key"], "PUT", "/nodes/web1", b"{}", headers)
