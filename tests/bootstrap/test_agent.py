"""Unit tests of bootstrap/agent.py against the loopback protocol stub."""

from __future__ import annotations

import base64
import datetime
import hashlib
import importlib.util
import io
import json
import os
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.bootstrap.agent_server_stub import StubCA, StubServer, make_ca

AGENT_PATH = Path(__file__).resolve().parents[2] / "bootstrap" / "agent.py"
_spec = importlib.util.spec_from_file_location("scalarium_agent", AGENT_PATH)
assert _spec and _spec.loader
agent = importlib.util.module_from_spec(_spec)
sys.modules["scalarium_agent"] = agent
_spec.loader.exec_module(agent)

INSTANCE = "i-0123abcd"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ca() -> StubCA:
    return make_ca()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture()
def key_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> str:
    path = tmp_path / "agent-key.pem"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return str(path)


@pytest.fixture()
def stub(ca: StubCA, rsa_key: rsa.RSAPrivateKey) -> Iterator[StubServer]:
    server = StubServer(ca).start()
    server.register_key(INSTANCE, rsa_key.public_key())
    yield server
    server.stop()


@pytest.fixture()
def fake_chef(tmp_path: Path) -> str:
    """A stand-in for chef-solo: checks its arguments, prints a log, obeys node.json."""
    script = tmp_path / "bin" / "cinc-solo"
    script.parent.mkdir()
    script.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            """
            import json, os, sys, time
            assert sys.argv[1] == "-c" and sys.argv[3] == "-j", sys.argv
            solo = open(sys.argv[2]).read()
            node = json.load(open(sys.argv[4]))
            test = node.get("test", {})
            print("Starting chef run, licence=%s" % os.environ.get("CHEF_LICENSE"))
            print("solo.rb has json_attribs:", "json_attribs" in solo)
            for i in range(test.get("lines", 3)):
                print("line %d \u00e9\u00e9\u00e9" % i)
            sys.stdout.flush()
            time.sleep(test.get("sleep", 0))
            sys.exit(test.get("exit", 0))
            """
        )
    )
    script.chmod(0o755)
    return str(script)


def make_agent(
    stub: StubServer, key_file: str, tmp_path: Path, clock: Any = None, **overrides: Any
) -> Any:
    config = agent.Config(
        server_url=stub.url,
        instance_id=INSTANCE,
        key_path=key_file,
        cert_path=str(tmp_path / "agent.pem"),
        ca_path=str(tmp_path / "ca.pem"),
        state_dir=str(tmp_path / "state"),
        heartbeat_interval=60.0,
        poll_wait=0,
        log_flush_interval=0.05,
        kill_grace=2.0,
        **overrides,
    )
    return agent.Agent(config, clock=clock or FakeClock(), rand=lambda: 0.5)


# --- signing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/agent/v1/heartbeat", "/agent/v1/heartbeat"),
        ("/agent//v1///commands/", "/agent/v1/commands"),
        ("/agent/v1/commands?wait=30", "/agent/v1/commands"),
        ("/", "/"),
    ],
)
def test_canonical_path_collapses_slashes_and_drops_query(path: str, expected: str) -> None:
    assert agent.canonical_path(path) == expected


def test_canonical_request_has_mixlib_v13_layout() -> None:
    text = agent.canonical_request("post", "/a//b/", "HASH", "2024-01-02T03:04:05Z", "i-1", "1")
    assert text.split("\n") == [
        "Method:POST",
        "Path:/a/b",
        "X-Ops-Content-Hash:HASH",
        "X-Ops-Sign:version=1.3",
        "X-Ops-Timestamp:2024-01-02T03:04:05Z",
        "X-Ops-UserId:i-1",
        "X-Ops-Server-API-Version:1",
    ]


def test_signed_headers_verify_with_cryptography(key_file: str, rsa_key: Any) -> None:
    body = b'{"x":1}'
    headers = agent.signed_headers(key_file, "POST", "/agent/v1/heartbeat", body, INSTANCE, 0)
    assert headers["X-Ops-Timestamp"] == "1970-01-01T00:00:00Z"
    assert headers["X-Ops-Sign"] == "algorithm=sha256;version=1.3;"
    assert headers["X-Ops-Content-Hash"] == base64.b64encode(hashlib.sha256(body).digest()).decode()
    lines = [headers[f"X-Ops-Authorization-{n}"] for n in range(1, 7)]
    assert "X-Ops-Authorization-7" not in headers
    assert all(len(line) == 60 for line in lines[:-1]) and 0 < len(lines[-1]) <= 60
    canonical = "\n".join(
        [
            "Method:POST",
            "Path:/agent/v1/heartbeat",
            f"X-Ops-Content-Hash:{headers['X-Ops-Content-Hash']}",
            "X-Ops-Sign:version=1.3",
            "X-Ops-Timestamp:1970-01-01T00:00:00Z",
            f"X-Ops-UserId:{INSTANCE}",
            "X-Ops-Server-API-Version:1",
        ]
    )
    signature = base64.b64decode("".join(lines))
    rsa_key.public_key().verify(signature, canonical.encode(), padding.PKCS1v15(), hashes.SHA256())


def test_signature_does_not_verify_for_another_body(key_file: str, rsa_key: Any) -> None:
    headers = agent.signed_headers(key_file, "GET", "/agent/v1/commands", b"", INSTANCE, 0)
    signature = base64.b64decode("".join(v for k, v in sorted(headers.items()) if "Auth" in k))
    tampered = agent.canonical_request(
        "GET", "/agent/v1/commands", agent.content_hash(b"x"), "1970-01-01T00:00:00Z", INSTANCE, "1"
    )
    with pytest.raises(InvalidSignature):
        rsa_key.public_key().verify(
            signature, tampered.encode(), padding.PKCS1v15(), hashes.SHA256()
        )


def test_signed_headers_verify_with_chef_bridge_auth(key_file: str, rsa_key: Any) -> None:
    auth = pytest.importorskip("chef_bridge.auth")
    if not hasattr(auth, "verify_request"):
        pytest.skip("chef_bridge.auth.verify_request not written yet")
    body = b'{"offset":0,"data":"x"}'
    path = "/agent/v1/commands/c1/log"
    now = datetime.datetime.now(datetime.UTC)
    headers = agent.signed_headers(key_file, "POST", path, body, INSTANCE, now.timestamp())
    auth.verify_request(rsa_key.public_key(), "POST", path, body, headers, now=now)
    with pytest.raises(auth.AuthError):
        auth.verify_request(rsa_key.public_key(), "POST", path, body + b" ", headers, now=now)


def test_signing_with_a_missing_key_raises_signing_error(tmp_path: Path) -> None:
    with pytest.raises(agent.SigningError):
        agent.signed_headers(str(tmp_path / "nope.pem"), "GET", "/", b"", INSTANCE, 0)


# Each step: (method, path, body, wall-clock time) -> the wait the spacer asks for.
SPACING_CASES = [
    pytest.param(
        [
            ("GET", "/agent/v1/commands", b"", 100.2, 0.0),
            ("GET", "/agent/v1/commands", b"", 100.7, 0.301),
        ],
        id="same request same second waits for the next second",
    ),
    pytest.param(
        [
            ("GET", "/agent/v1/commands?wait=30", b"", 100.2, 0.0),
            ("GET", "/agent//v1/commands/", b"", 100.9, 0.101),
        ],
        id="query and slashes do not make a request different (the server ignores them too)",
    ),
    pytest.param(
        [
            ("GET", "/agent/v1/commands", b"", 100.2, 0.0),
            ("GET", "/agent/v1/commands", b"", 101.0, 0.0),
        ],
        id="same request next second is free",
    ),
    pytest.param(
        [
            ("POST", "/agent/v1/heartbeat", b"{}", 100.1, 0.0),
            ("POST", "/agent/v1/heartbeat", b'{"x":1}', 100.2, 0.0),
            ("POST", "/agent/v1/commands/c1/start", b"{}", 100.3, 0.0),
            ("GET", "/agent/v1/heartbeat", b"{}", 100.4, 0.0),
        ],
        id="another body, path or method in the same second is free",
    ),
    pytest.param(
        [
            ("POST", "/agent/v1/commands/c1/start", b"{}", 100.5, 0.0),
            ("POST", "/agent/v1/commands/c1/start", b"{}", 101.5, 0.0),
            ("POST", "/agent/v1/commands/c1/start", b"{}", 100.9, 0.101),
        ],
        id="a wall clock stepped back still finds the earlier signature",
    ),
]


@pytest.mark.parametrize("steps", SPACING_CASES)
def test_signature_spacer_never_lets_a_signature_repeat(
    steps: list[tuple[str, str, bytes, float, float]],
) -> None:
    spacer = agent.SignatureSpacer()
    for method, path, body, epoch, expected in steps:
        wait = spacer.claim(method, path, agent.content_hash(body), epoch)
        assert wait == pytest.approx(expected, abs=1e-6)
        if wait:  # waiting lands in the next second, never further
            assert int(epoch + wait) == int(epoch) + 1


def test_signature_spacer_forgets_past_its_limit() -> None:
    spacer = agent.SignatureSpacer(limit=2)
    for path in ("/a", "/b", "/c"):
        assert spacer.claim("GET", path, "h", 5.0) == 0.0
    assert spacer.claim("GET", "/a", "h", 5.0) == 0.0  # the oldest was dropped
    assert spacer.claim("GET", "/c", "h", 5.0) > 0


def test_identical_requests_in_one_second_are_signed_in_different_seconds(
    stub: StubServer, key_file: str
) -> None:
    """Two polls in the same second would carry the same signature: a replay to the server."""
    clock = [1_700_000_000.25]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock[0] += seconds

    client = agent.Client(
        stub.url, None, INSTANCE, key_file, wall_clock=lambda: clock[0], sleep=sleep
    )
    for _ in range(3):
        client.request("GET", "/agent/v1/commands?wait=0")
    client.request("POST", "/agent/v1/heartbeat", {"n": 1})
    client.request("POST", "/agent/v1/heartbeat", {"n": 2})
    sent = [headers for _, _, headers, _ in stub.state.raw_requests]
    stamps = [h["X-Ops-Timestamp"] for h in sent]
    assert stamps == [
        "2023-11-14T22:13:20Z",
        "2023-11-14T22:13:21Z",
        "2023-11-14T22:13:22Z",
        "2023-11-14T22:13:22Z",  # a heartbeat with another body needs no wait
        "2023-11-14T22:13:22Z",
    ]
    signatures = {"".join(v for k, v in sorted(h.items()) if "Authorization" in k) for h in sent}
    assert len(signatures) == len(sent)
    assert len(waits) == 2 and stub.state.bad_signatures == 0


def test_back_to_back_polls_with_the_real_clock_never_repeat_a_signature(
    stub: StubServer, key_file: str
) -> None:
    client = agent.Client(stub.url, None, INSTANCE, key_file)
    for _ in range(3):
        client.request("GET", "/agent/v1/commands?wait=0")
    sent = [headers for _, _, headers, _ in stub.state.raw_requests]
    signatures = {"".join(v for k, v in sorted(h.items()) if "Authorization" in k) for h in sent}
    assert len(signatures) == 3 and stub.state.bad_signatures == 0


# --- backoff -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "rand", "expected"),
    [
        (0, 0.9, 0.0),
        (1, 0.0, 0.5),
        (1, 1.0, 1.0),
        (3, 0.0, 2.0),
        (3, 1.0, 4.0),
        (9, 0.5, 75.0),  # window capped at 100
        (500, 1.0, 100.0),
    ],
)
def test_backoff_is_exponential_capped_and_jittered(
    failures: int, rand: float, expected: float
) -> None:
    assert agent.backoff_delay(failures, 1.0, 100.0, lambda: rand) == pytest.approx(expected)


# --- the loop against the stub -------------------------------------------------------------------


def test_loop_heartbeats_only_when_due_and_polls_every_iteration(
    stub: StubServer, key_file: str, tmp_path: Path
) -> None:
    clock = FakeClock()
    node = make_agent(stub, key_file, tmp_path, clock)
    assert node.loop() == 0.0
    assert len(stub.state.heartbeats) == 1 and stub.state.polls == 1
    clock.now += 59
    node.loop()
    assert len(stub.state.heartbeats) == 1 and stub.state.polls == 2
    clock.now += 1
    node.loop()
    assert len(stub.state.heartbeats) == 2 and stub.state.polls == 3
    beat = stub.state.heartbeats[0]
    assert beat["agent_version"] == agent.AGENT_VERSION and beat["running_command"] is None
    assert len(beat["load"]) == 3 and beat["memory"]["total"] > 0 and beat["disk"]["total"] > 0
    assert stub.state.bad_signatures == 0


def test_loop_backs_off_on_errors_and_resets_on_success(
    stub: StubServer, key_file: str, tmp_path: Path
) -> None:
    node = make_agent(stub, key_file, tmp_path, backoff_base=2.0, backoff_cap=5.0)
    stub.state.forced_errors["/agent/v1/commands"] = (503, "unavailable")
    delays = [node.loop() for _ in range(4)]
    assert delays == [pytest.approx(d) for d in (1.5, 3.0, 3.75, 3.75)]
    del stub.state.forced_errors["/agent/v1/commands"]
    assert node.loop() == 0.0 and node.failures == 0


def test_unreachable_server_is_a_backoff_not_a_crash(key_file: str, tmp_path: Path) -> None:
    class Dead:
        url = "http://127.0.0.1:9"

    node = make_agent(Dead(), key_file, tmp_path)  # type: ignore[arg-type]
    assert node.loop() > 0 and node.failures == 1 and not node.stop.is_set()


@pytest.mark.parametrize("code", ["instance_terminated", "certificate_revoked"])
def test_terminated_instance_stops_the_agent(
    stub: StubServer, key_file: str, tmp_path: Path, code: str
) -> None:
    node = make_agent(stub, key_file, tmp_path)
    stub.state.forced_errors["/agent/v1/heartbeat"] = (403, code)
    assert node.loop() == 0.0
    assert node.retired and node.stop.is_set()


def test_other_401_is_retried_not_fatal(stub: StubServer, key_file: str, tmp_path: Path) -> None:
    node = make_agent(stub, key_file, tmp_path)
    stub.state.forced_errors["/agent/v1/heartbeat"] = (401, "bad_signature")
    assert node.loop() > 0 and not node.retired and not node.stop.is_set()


def test_plain_http_is_refused_off_loopback() -> None:
    with pytest.raises(agent.ConfigError) as caught:
        agent.Client("http://scalarium.example.com", None)
    assert caught.value.code == "insecure_server_url"


# --- commands ------------------------------------------------------------------------------------


def command(cid: str, **extra: Any) -> dict[str, Any]:
    doc = {
        "id": cid,
        "type": "configure",
        "node_json_url": f"/agent/v1/commands/{cid}/node.json",
        "bundle_url": None,
        "bundle_sha256": None,
        "timeout": 30,
    }
    doc.update(extra)
    return doc


def make_bundle(files: dict[str, bytes]) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return raw, hashlib.sha256(raw).hexdigest()


def test_command_runs_chef_streams_log_and_reports_success(
    stub: StubServer, key_file: str, tmp_path: Path, fake_chef: str
) -> None:
    raw, sha = make_bundle({"cookbooks/base/recipes/default.rb": b"log 'hi'\n"})
    stub.state.bundles[sha] = raw
    stub.state.node_json["c1"] = {"run_list": ["recipe[base]"], "test": {"lines": 200}}
    stub.state.deliveries = [
        [command("c1", bundle_url=f"/agent/v1/bundles/{sha}.tar.gz", bundle_sha256=sha)]
    ]
    node = make_agent(stub, key_file, tmp_path, chef_binary=fake_chef, log_chunk_bytes=256)
    assert node.loop() == 0.0
    assert stub.state.starts == ["c1"]
    finish = stub.state.finishes["c1"][0]
    assert finish["status"] == "successful" and finish["exit_code"] == 0
    assert finish["reason"] is None
    text = stub.state.logs["c1"].decode()
    assert "licence=None" in text and "json_attribs: True" in text
    assert "line 199 \u00e9\u00e9\u00e9" in text and "\ufffd" not in text
    bundle_dir = tmp_path / "state" / "bundles" / sha
    assert (bundle_dir / "cookbooks/base/recipes/default.rb").read_bytes() == b"log 'hi'\n"
    solo = (tmp_path / "state" / "commands" / "c1" / "solo.rb").read_text()
    assert f"cookbook_path ['{bundle_dir}/cookbooks']" in solo
    assert not (tmp_path / "state" / "running").exists()


def test_duplicate_command_ids_run_once_even_across_restarts(
    stub: StubServer, key_file: str, tmp_path: Path, fake_chef: str
) -> None:
    stub.state.deliveries = [[command("c1"), command("c1")], [command("c1")]]
    node = make_agent(stub, key_file, tmp_path, chef_binary=fake_chef)
    node.loop()
    restarted = make_agent(stub, key_file, tmp_path, chef_binary=fake_chef)
    restarted.loop()
    assert stub.state.starts == ["c1"] and len(stub.state.finishes["c1"]) == 1


def test_seen_ids_keep_only_the_newest(tmp_path: Path) -> None:
    seen = agent.SeenCommands(str(tmp_path / "seen.json"), limit=3)
    for cid in ["a", "b", "c", "d"]:
        seen.add(cid)
    reloaded = agent.SeenCommands(str(tmp_path / "seen.json"), limit=3)
    assert "a" not in reloaded and all(c in reloaded for c in "bcd")


def test_failing_chef_reports_failed_with_exit_code_and_licence_for_chef_binary(
    stub: StubServer, key_file: str, tmp_path: Path, fake_chef: str
) -> None:
    chef_named = Path(fake_chef).with_name("chef-solo")
    chef_named.symlink_to(fake_chef)
    stub.state.node_json["c2"] = {"test": {"exit": 3}}
    stub.state.deliveries = [[command("c2")]]
    node = make_agent(stub, key_file, tmp_path, chef_binary=str(chef_named))
    node.loop()
    finish = stub.state.finishes["c2"][0]
    assert (finish["status"], finish["exit_code"]) == ("failed", 3)
    assert "status 3" in finish["reason"]
    assert "licence=accept-no-persist" in stub.state.logs["c2"].decode()


def test_chef_past_its_timeout_is_killed_and_reported(
    stub: StubServer, key_file: str, tmp_path: Path, fake_chef: str
) -> None:
    stub.state.node_json["c3"] = {"test": {"sleep": 30}}
    stub.state.deliveries = [[command("c3", timeout=0.5)]]
    node = make_agent(stub, key_file, tmp_path, chef_binary=fake_chef)
    started = time.monotonic()
    node.loop()
    assert time.monotonic() - started < 10
    finish = stub.state.finishes["c3"][0]
    assert (finish["status"], finish["exit_code"], finish["reason"]) == ("failed", None, "timeout")


def test_bundle_with_wrong_checksum_fails_the_command_without_running_chef(
    stub: StubServer, key_file: str, tmp_path: Path, fake_chef: str
) -> None:
    raw, _ = make_bundle({"cookbooks/x/metadata.rb": b"name 'x'\n"})
    wrong = "0" * 64
    stub.state.bundles[wrong] = raw
    stub.state.deliveries = [
        [command("c4", bundle_url=f"/agent/v1/bundles/{wrong}.tar.gz", bundle_sha256=wrong)]
    ]
    node = make_agent(stub, key_file, tmp_path, chef_binary=fake_chef)
    node.loop()
    finish = stub.state.finishes["c4"][0]
    assert finish["status"] == "failed"
    assert finish["reason"].startswith("bundle_checksum_mismatch")
    assert "c4" not in stub.state.logs


def test_log_resumes_by_offset_after_send_errors(
    stub: StubServer, key_file: str, tmp_path: Path, fake_chef: str
) -> None:
    stub.state.node_json["c5"] = {"test": {"lines": 50}}
    stub.state.log_failures = 2
    stub.state.deliveries = [[command("c5")]]
    node = make_agent(stub, key_file, tmp_path, chef_binary=fake_chef, log_chunk_bytes=100)
    node.loop()
    log_path = tmp_path / "state" / "commands" / "c5" / "chef.log"
    assert stub.state.logs["c5"] == log_path.read_bytes()


def test_interrupted_command_is_reported_failed_and_never_rerun(
    stub: StubServer, key_file: str, tmp_path: Path, fake_chef: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "running").write_text(json.dumps({"id": "c6", "finish": None}))
    stub.state.deliveries = [[command("c6")]]
    node = make_agent(stub, key_file, tmp_path, chef_binary=fake_chef)
    node.loop()
    assert stub.state.finishes["c6"] == [
        {"exit_code": None, "status": "failed", "duration": 0.0, "reason": "interrupted"}
    ]
    assert stub.state.starts == []


def test_finish_lost_to_an_outage_is_resent_next_iteration(
    stub: StubServer, key_file: str, tmp_path: Path, fake_chef: str
) -> None:
    stub.state.forced_errors["/agent/v1/commands/c7/finish"] = (503, "unavailable")
    stub.state.deliveries = [[command("c7")]]
    node = make_agent(stub, key_file, tmp_path, chef_binary=fake_chef)
    assert node.loop() > 0
    del stub.state.forced_errors["/agent/v1/commands/c7/finish"]
    assert node.loop() == 0.0
    assert stub.state.finishes["c7"][0]["status"] == "successful"


def test_fast_stop_kills_a_running_chef(
    stub: StubServer, key_file: str, tmp_path: Path, fake_chef: str
) -> None:
    stub.state.node_json["c8"] = {"test": {"sleep": 30}}
    stub.state.deliveries = [[command("c8")]]
    node = make_agent(stub, key_file, tmp_path, chef_binary=fake_chef)
    threading.Timer(0.3, node.fast_stop.set).start()
    node.loop()
    assert stub.state.finishes["c8"][0]["reason"] == "agent_stopped"


# --- bundles, solo.rb, parsers -------------------------------------------------------------------


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("member", "safe"),
    [
        (_member("cookbooks/a/recipes/default.rb"), True),
        (_member("cookbooks/a", tarfile.DIRTYPE), True),
        (_member("/etc/passwd"), False),
        (_member("cookbooks/../../etc/cron.d/x"), False),
        (_member(".."), False),
        (_member("dev/sda", tarfile.BLKTYPE), False),
        (_member("dev/tty", tarfile.CHRTYPE), False),
        (_member("fifo", tarfile.FIFOTYPE), False),
        (_member("cookbooks/a/link", tarfile.SYMTYPE, "../b/file"), True),
        (_member("cookbooks/a/link", tarfile.SYMTYPE, "../../../etc/shadow"), False),
        (_member("cookbooks/a/link", tarfile.SYMTYPE, "/etc/shadow"), False),
        (_member("cookbooks/a/hard", tarfile.LNKTYPE, "cookbooks/b/file"), True),
        (_member("cookbooks/a/hard", tarfile.LNKTYPE, "../outside"), False),
    ],
)
def test_unsafe_bundle_members_are_refused(member: tarfile.TarInfo, safe: bool) -> None:
    if safe:
        agent.check_member(member)
    else:
        with pytest.raises(agent.BundleError) as caught:
            agent.check_member(member)
        assert caught.value.code == "unsafe_bundle"


def test_solo_rb_escapes_ruby_strings() -> None:
    text = agent.solo_rb("/b'x\\", "/run", "/state", "i-1'; system('rm')")
    assert "node_name 'i-1\\'; system(\\'rm\\')'" in text
    assert "cookbook_path ['/b\\'x\\\\/cookbooks']" in text
    assert "log_location STDOUT" in text and "json_attribs '/run/node.json'" in text


@pytest.mark.parametrize(
    ("data", "cut"),
    [
        (b"abc", 3),
        ("ab\u00e9".encode(), 4),
        ("ab\u00e9".encode()[:3], 2),
        ("a\u20ac".encode()[:3], 1),
        ("a\U0001f600".encode(), 5),
        ("a\U0001f600".encode()[:4], 1),
    ],
)
def test_log_chunks_end_on_utf8_boundaries(data: bytes, cut: int) -> None:
    assert agent.utf8_cut(data) == cut


def test_proc_parsers_read_real_formats() -> None:
    assert agent.parse_loadavg("0.52 0.58 0.59 2/1033 12345\n") == [0.52, 0.58, 0.59]
    stat = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n"
    assert agent.parse_cpu_times(stat) == (200, 1000)
    assert agent.cpu_percent((200, 1000), (300, 1200)) == 50.0
    meminfo = "MemTotal:  2048 kB\nMemFree:  100 kB\nMemAvailable:  1024 kB\n"
    assert agent.parse_meminfo(meminfo) == {"total": 2048 * 1024, "available": 1024 * 1024}


def test_server_error_document_is_parsed_into_code_and_message() -> None:
    body = json.dumps({"error": {"code": "token_expired", "message": "too late", "details": {}}})
    err = agent.error_from_response(401, body.encode())
    assert (err.code, str(err), err.status) == ("token_expired", "too late", 401)
    assert agent.error_from_response(502, b"<html>").code == "http_502"


def test_config_document_round_trips_with_server_settings(tmp_path: Path) -> None:
    doc = {
        "server_url": "https://s",
        "instance_id": INSTANCE,
        "paths": {"key": "k", "cert": "c", "ca": "a", "state_dir": str(tmp_path)},
        "settings": {"heartbeat_interval": "15", "poll_wait": 20, "unknown": 1},
    }
    (tmp_path / "agent.json").write_text(json.dumps(doc))
    config = agent.load_config(str(tmp_path / "agent.json"))
    assert (config.heartbeat_interval, config.poll_wait, config.chef_binary) == (
        15.0,
        20,
        "chef-solo",
    )
    os.unlink(tmp_path / "agent.json")
    with pytest.raises(agent.ConfigError):
        agent.load_config(str(tmp_path / "agent.json"))


def test_search_nodes_replace_the_node_files_and_refuse_unsafe_names(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    (nodes / "gone.json").write_text("{}")
    (nodes / "notes.txt").write_text("kept: not a node file")
    written = agent.write_search_nodes(str(nodes), {"lb1": {"name": "lb1"}, "i-1": {"name": "i-1"}})
    assert written == ["i-1", "lb1"]
    assert sorted(p.name for p in nodes.iterdir()) == ["i-1.json", "lb1.json", "notes.txt"]
    assert json.loads((nodes / "lb1.json").read_text()) == {"name": "lb1"}
    for bad in ("../etc/passwd", "a/b", "", ".hidden"):
        with pytest.raises(agent.AgentError):
            agent.write_search_nodes(str(nodes), {bad: {}})
    with pytest.raises(agent.AgentError):
        agent.write_search_nodes(str(nodes), {"ok": []})
