"""Tests of bootstrap/install.sh: syntax, shellcheck, and real runs against the stub over TLS."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bootstrap.agent_server_stub import StubCA, StubServer, make_ca

BOOTSTRAP = Path(__file__).resolve().parents[2] / "bootstrap"
INSTALL = BOOTSTRAP / "install.sh"
TOKEN = "tok-SECRET-4f1c9a0e7b"
INSTANCE = "i-0feedbeef"


@pytest.fixture(scope="module")
def ca() -> StubCA:
    return make_ca()


@pytest.fixture()
def stub(ca: StubCA) -> Iterator[StubServer]:
    server = StubServer(ca, tls=True).start()
    server.state.tokens[TOKEN] = INSTANCE
    yield server
    server.stop()


@pytest.fixture()
def ca_file(tmp_path: Path, ca: StubCA) -> str:
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.pem)
    return str(path)


def run_install(
    tmp_path: Path, *args: str, token: str = TOKEN, script: Path = INSTALL
) -> subprocess.CompletedProcess[str]:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    env = dict(os.environ, SCALARIUM_AGENT_ONCE="1")
    return subprocess.run(
        ["bash", str(script), "--token", token, "--root", str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_install_sh_parses() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_install_sh_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_embedded_unit_matches_the_shipped_service_file() -> None:
    text = INSTALL.read_text()
    embedded = re.search(r"<<'UNIT'\n(.*?)\nUNIT\n", text, re.S)
    assert embedded is not None
    assert embedded.group(1) + "\n" == (BOOTSTRAP / "scalarium-agent.service").read_text()


def test_install_enrolls_runs_the_agent_once_and_keeps_the_token_secret(
    stub: StubServer, tmp_path: Path, ca_file: str
) -> None:
    result = run_install(
        tmp_path, "--server", stub.url, "--foreground", "--chef", "skip", "--ca", ca_file
    )
    assert result.returncode == 0, result.stderr
    etc = tmp_path / "root" / "etc" / "scalarium"
    key_mode = stat.S_IMODE((etc / "agent-key.pem").stat().st_mode)
    config_mode = stat.S_IMODE((etc / "agent.json").stat().st_mode)
    assert (key_mode, config_mode) == (0o600, 0o600)
    assert stub.state.csr_subjects == [INSTANCE]
    assert TOKEN not in result.stdout + result.stderr
    assert TOKEN not in (etc / "agent.json").read_text()
    # The agent ran one signed iteration: a heartbeat and a poll, both verified by the stub.
    assert len(stub.state.heartbeats) == 1 and stub.state.polls == 1
    assert stub.state.bad_signatures == 0
    facts = stub.state.enroll_bodies[0]["facts"]
    assert facts["private_ip"] == "127.0.0.1" and facts["hostname"]
    assert (tmp_path / "root" / "opt" / "scalarium" / "agent.py").is_file()
    # Nothing installed and no server preference: the agent falls back to chef-solo.
    assert json.loads((etc / "agent.json").read_text())["settings"]["chef_binary"] == "chef-solo"


def test_explicit_chef_binary_beats_the_server_setting(
    stub: StubServer, tmp_path: Path, ca_file: str
) -> None:
    stub.state.settings["chef_binary"] = "/opt/cinc/bin/cinc-solo"
    args = ("--server", stub.url, "--foreground", "--chef", "skip", "--ca", ca_file)
    result = run_install(tmp_path, *args, "--chef-binary", "/usr/local/bin/my-solo")
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "root/etc/scalarium/agent.json").read_text())
    assert doc["settings"]["chef_binary"] == "/usr/local/bin/my-solo"


def test_second_install_does_not_enroll_again(
    stub: StubServer, tmp_path: Path, ca_file: str
) -> None:
    args = ("--server", stub.url, "--foreground", "--chef", "skip", "--ca", ca_file)
    assert run_install(tmp_path, *args).returncode == 0
    key_before = (tmp_path / "root" / "etc" / "scalarium" / "agent-key.pem").read_bytes()
    again = run_install(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert "already enrolled" in again.stderr
    assert len(stub.state.enroll_bodies) == 1 and len(stub.state.heartbeats) == 2
    assert (tmp_path / "root" / "etc" / "scalarium" / "agent-key.pem").read_bytes() == key_before


def test_rejected_token_prints_the_server_error_and_fails(
    stub: StubServer, tmp_path: Path, ca_file: str
) -> None:
    result = run_install(
        tmp_path,
        "--server",
        stub.url,
        "--foreground",
        "--chef",
        "skip",
        "--ca",
        ca_file,
        token="tok-WRONG-123",
    )
    assert result.returncode != 0
    assert "invalid_token" in result.stderr and "unknown or used token" in result.stderr
    assert "tok-WRONG-123" not in result.stdout + result.stderr


@pytest.mark.parametrize("source", ["stdin", "file"])
def test_token_file_or_stdin_enrolls_without_the_token_on_the_command_line(
    stub: StubServer, tmp_path: Path, ca_file: str, source: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    where = "-" if source == "stdin" else str(token_file)
    argv = ["bash", str(INSTALL), "--token-file", where, "--root", str(root)]
    argv += ["--server", stub.url, "--foreground", "--chef", "skip", "--ca", ca_file]
    result = subprocess.run(
        argv,
        input=TOKEN if source == "stdin" else "",
        capture_output=True,
        text=True,
        env=dict(os.environ, SCALARIUM_AGENT_ONCE="1"),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert TOKEN not in " ".join(argv)
    assert stub.state.csr_subjects == [INSTANCE]
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--token", TOKEN, "--token-file", "-"), "not both"),
        (("--token-file", "/nonexistent/token"), "not readable"),
        (("--token-file", "-"), "--token (or --token-file) is required"),
    ],
)
def test_token_file_mistakes_fail_with_a_clear_message(
    tmp_path: Path, ca_file: str, args: tuple[str, ...], message: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    argv = ["bash", str(INSTALL), *args, "--root", str(root), "--ca", ca_file]
    argv += ["--server", "https://127.0.0.1:1", "--chef", "skip"]
    result = subprocess.run(argv, input="", capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_server_substituted_into_the_script_makes_server_optional(
    stub: StubServer, tmp_path: Path, ca_file: str
) -> None:
    served = tmp_path / "install.sh"
    served.write_text(INSTALL.read_text().replace("@@SCALARIUM_URL@@", stub.url))
    result = run_install(tmp_path, "--foreground", "--chef", "skip", "--ca", ca_file, script=served)
    assert result.returncode == 0, result.stderr
    assert stub.state.csr_subjects == [INSTANCE]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--chef", "skip"), "--server URL is required"),
        (("--server", "http://scalarium.example.com", "--chef", "skip"), "must be an https"),
        (("--server", "https://127.0.0.1:1", "--chef", "bogus"), "unknown --chef mode"),
        (("--server", "https://127.0.0.1:1", "--ca", "/nonexistent"), "not readable"),
        (("--frobnicate",), "unknown argument"),
    ],
)
def test_bad_invocations_fail_with_a_clear_message(
    tmp_path: Path, ca_file: str, args: tuple[str, ...], message: str
) -> None:
    extra = () if "--ca" in args else ("--ca", ca_file)
    result = run_install(tmp_path, *args, *extra)
    assert result.returncode != 0 and message in result.stderr


def test_without_foreground_a_unit_is_written_under_the_root(
    stub: StubServer, tmp_path: Path, ca_file: str
) -> None:
    result = run_install(tmp_path, "--server", stub.url, "--chef", "skip", "--ca", ca_file)
    assert result.returncode == 0, result.stderr
    root = tmp_path / "root"
    unit = (root / "etc/systemd/system/scalarium-agent.service").read_text()
    assert f"{root}/opt/scalarium/agent.py --config {root}/etc/scalarium/agent.json" in unit


@pytest.mark.parametrize(
    ("env_root", "arg_root", "foreground", "installed_in", "agent_ran"),
    [
        ("env", None, "1", "env", True),
        ("env", "arg", "1", "arg", True),  # an explicit --root beats SCALARIUM_ROOT
        ("env", None, "", "env", False),  # without SCALARIUM_FOREGROUND=1 a unit is written
    ],
)
def test_environment_gives_defaults_for_root_and_foreground(
    stub: StubServer,
    tmp_path: Path,
    ca_file: str,
    env_root: str,
    arg_root: str | None,
    foreground: str,
    installed_in: str,
    agent_ran: bool,
) -> None:
    """Unchanged user-data can run under a prefix without systemd: how the e2e test runs it."""
    for name in ("env", "arg"):
        (tmp_path / name).mkdir()
    argv = ["bash", str(INSTALL), "--token", TOKEN, "--server", stub.url, "--chef", "skip"]
    argv += ["--ca", ca_file] + (["--root", str(tmp_path / arg_root)] if arg_root else [])
    env = dict(os.environ, SCALARIUM_AGENT_ONCE="1", SCALARIUM_ROOT=str(tmp_path / env_root))
    env["SCALARIUM_FOREGROUND"] = foreground
    result = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr
    root = tmp_path / installed_in
    assert (root / "etc/scalarium/agent.json").is_file()
    assert not (tmp_path / ({"env", "arg"} - {installed_in}).pop() / "etc").exists()
    assert (len(stub.state.heartbeats) == 1) is agent_ran
    assert (root / "etc/systemd/system/scalarium-agent.service").exists() is not agent_ran
