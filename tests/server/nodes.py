"""Simulated nodes for lifecycle tests: real keys, CSRs and request signatures."""

from __future__ import annotations

import itertools
import json
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from chef_bridge.auth import format_time, sign_request
from server import pki
from tests.conftest import Api

_KEYS: dict[int, bytes] = {}


def key(n: int) -> bytes:
    if n not in _KEYS:
        _KEYS[n] = pki.generate_private_key_pem(2048)
    return _KEYS[n]


@dataclass
class Node:
    """A simulated node that signs every request, each with its own timestamp."""

    client: FlaskClient
    instance_id: str
    key: bytes
    clock: itertools.count = field(default_factory=lambda: itertools.count(-600))

    def signed(self, method: str, path: str, payload: Any = None) -> Any:
        body = b"" if payload is None else json.dumps(payload).encode()
        # Identical requests signed in the same second are replays; tick a second per request.
        moment = datetime.now(UTC) + timedelta(seconds=next(self.clock))
        headers = sign_request(
            self.key,
            self.instance_id,
            method,
            path.split("?")[0],
            body,
            timestamp=format_time(moment),
            server_api_version="1",
        )
        return self.client.open(
            path, method=method, data=body, headers={**headers, "Content-Type": "application/json"}
        )

    def heartbeat(self) -> Any:
        return self.signed("POST", "/agent/v1/heartbeat", {"agent_version": "1.0.0"})

    def poll(self) -> list[dict[str, Any]]:
        response = self.signed("GET", "/agent/v1/commands?wait=0")
        assert response.status_code == 200, response.get_json()
        return response.get_json()["commands"]  # type: ignore[no-any-return]

    def node_json(self, command_id: str) -> dict[str, Any]:
        response = self.signed("GET", f"/agent/v1/commands/{command_id}/node.json")
        assert response.status_code == 200, response.get_json()
        return json.loads(response.data)  # type: ignore[no-any-return]

    def run(self, command: dict[str, Any], status: str = "successful", log: str = "ok\n") -> Any:
        """Run one command the way the agent does: start, log, finish."""
        cid = command["id"]
        assert self.signed("POST", f"/agent/v1/commands/{cid}/start", {}).status_code == 200
        logged = self.signed("POST", f"/agent/v1/commands/{cid}/log", {"offset": 0, "data": log})
        assert logged.status_code == 200, logged.get_json()
        return self.signed(
            "POST",
            f"/agent/v1/commands/{cid}/finish",
            {
                "status": status,
                "exit_code": 0 if status == "successful" else 1,
                "duration": 1.5,
                "reason": None,
            },
        )


def enroll(
    app: Flask, admin: Api, cluster: dict[str, Any], hostname: str, layer: str, n: int
) -> Node:
    """Create a manual instance, take its user-data token, enroll it: a connected node."""
    created = admin.ok(
        "POST",
        f"/stacks/{cluster['stack']['id']}/instances",
        {"hostname": hostname, "layer_ids": [cluster[layer]["id"]]},
    )
    script = admin.ok("GET", f"/instances/{created['id']}/user-data")["user_data"]
    words = shlex.split(script.splitlines()[-1])
    token = words[words.index("--token") + 1]
    client = app.test_client()
    response = client.post(
        "/agent/v1/enroll",
        json={
            "token": token,
            "csr": pki.build_csr_pem(key(n), created["id"]).decode(),
            "agent_version": "1.0.0",
            "facts": {"hostname": hostname, "private_ip": f"10.0.0.{n}", "os": "debian"},
        },
    )
    assert response.status_code == 201, response.get_json()
    return Node(client, created["id"], key(n))


def status(admin: Api, node: Node) -> str:
    return str(admin.ok("GET", f"/instances/{node.instance_id}")["status"])


def bring_online(admin: Api, node: Node) -> dict[str, Any]:
    """Heartbeat, receive setup, run it: the node is online. Returns the setup's node JSON."""
    assert node.heartbeat().status_code == 200
    assert status(admin, node) == "running_setup"
    (setup,) = node.poll()
    assert setup["type"] == "setup"
    document = node.node_json(setup["id"])
    assert node.run(setup).status_code == 200
    assert status(admin, node) == "online"
    return document


def members(document: dict[str, Any]) -> dict[str, list[str]]:
    """Hostnames per layer in a node JSON, from the OpsWorks view."""
    return {
        layer: sorted(data["instances"]) for layer, data in document["opsworks"]["layers"].items()
    }


def run_configures(nodes: list[Node]) -> dict[str, dict[str, Any]]:
    """Each node polls and runs every configure waiting for it; returns the last node JSONs."""
    seen: dict[str, dict[str, Any]] = {}
    for node in nodes:
        while True:
            commands = node.poll()
            if not commands:
                break
            (command,) = commands
            assert command["type"] == "configure"
            seen[node.instance_id] = node.node_json(command["id"])
            assert node.run(command).status_code == 200
    return seen
