"""solo.rb: every setting chef-solo needs, read back exactly, and no way to inject Ruby."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from chef_bridge.solo import SoloError, parse_solo_rb, render_solo_rb, ruby_string

RUBY = shutil.which("ruby")
needs_ruby = pytest.mark.skipif(RUBY is None, reason="ruby is not installed (apt-get install ruby)")

HOSTILE_VALUES = [
    "i-0abc123",
    "it's",
    "back\\slash",
    "trailing\\",
    "x'; system('touch PWNED'); '",
    "x\\'; system('touch PWNED'); #",
    '#{system("touch PWNED")}',
    '"; system("touch PWNED"); "',
    "ünïcødé node ☃",
]

# Evaluates solo.rb with every config call recorded instead of run, then prints them as JSON.
RUBY_RECORDER = r"""
require 'json'
class Recorder
  attr_reader :settings
  def initialize
    @settings = {}
  end

  def method_missing(name, *args)
    value = args.length == 1 ? args[0] : args
    value = ":#{value}" if value.is_a?(Symbol)
    value = 'STDOUT' if value.equal?(STDOUT)
    @settings[name.to_s] = value
  end

  def respond_to_missing?(*)
    true
  end
end
recorder = Recorder.new
recorder.instance_eval(File.read(ARGV[0], encoding: 'UTF-8'), ARGV[0])
puts JSON.generate(recorder.settings)
"""


def test_renders_every_local_mode_setting() -> None:
    text = render_solo_rb(
        "/var/lib/scalarium/run/42/",
        "web1",
        log_location="/var/log/scalarium/42.log",
        log_level="debug",
        json_attribs="/var/lib/scalarium/run/42/node.json",
    )
    base = "/var/lib/scalarium/run/42"
    assert parse_solo_rb(text) == {
        "node_name": "web1",
        "local_mode": True,
        "cookbook_path": [f"{base}/cookbooks"],
        "role_path": f"{base}/roles",
        "data_bag_path": f"{base}/data_bags",
        "environment_path": f"{base}/environments",
        "node_path": f"{base}/nodes",
        "file_cache_path": f"{base}/cache",
        "file_backup_path": f"{base}/backup",
        "json_attribs": f"{base}/node.json",
        "log_location": "/var/log/scalarium/42.log",
        "log_level": ":debug",
        "ssl_verify_mode": ":verify_peer",
        "verify_api_cert": True,
    }


def test_defaults_log_to_stdout_and_leave_json_attribs_to_the_command_line() -> None:
    settings = parse_solo_rb(render_solo_rb("/run", "n"))
    assert settings["log_location"] == "STDOUT"
    assert settings["log_level"] == ":info"
    assert "json_attribs" not in settings


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_names_and_paths_round_trip_exactly(value: str) -> None:
    settings = parse_solo_rb(
        render_solo_rb(f"/srv/{value}", value, log_location=value, json_attribs=value)
    )
    assert settings["node_name"] == value
    assert settings["cookbook_path"] == [f"/srv/{value}/cookbooks"]
    assert settings["log_location"] == settings["json_attribs"] == value


@pytest.mark.parametrize(
    "value,literal",
    [("a", "'a'"), ("it's", "'it\\'s'"), ("a\\b", "'a\\\\b'"), ("#{x}", "'#{x}'")],
)
def test_ruby_string_escapes_only_backslash_and_quote(value: str, literal: str) -> None:
    assert ruby_string(value) == literal


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "nul\0", "tab\t", "del\x7f"])
def test_control_characters_are_refused(bad: str) -> None:
    with pytest.raises(SoloError) as err:
        render_solo_rb("/run", bad)
    assert err.value.code == "solo_invalid_value"


@pytest.mark.parametrize(
    "kwargs,code",
    [
        ({"log_level": "verbose"}, "solo_invalid_log_level"),
        ({"log_level": "info; system('x')"}, "solo_invalid_log_level"),
    ],
)
def test_bad_log_level_is_refused(kwargs: dict[str, str], code: str) -> None:
    with pytest.raises(SoloError) as err:
        render_solo_rb("/run", "n", **kwargs)
    assert err.value.code == code


@pytest.mark.parametrize(
    "text,expected",
    [
        ('node_name "a\\"b\\n"', {"node_name": 'a"b\n'}),
        ("cookbook_path ['/a', \"/b\"]  # two", {"cookbook_path": ["/a", "/b"]}),
        ("cookbook_path []", {"cookbook_path": []}),
        ("local_mode false\nx nil", {"local_mode": False, "x": None}),
        ("# comment\n\nlog_location STDOUT", {"log_location": "STDOUT"}),
        ("node_name 'a\\nb'", {"node_name": "a\\nb"}),
    ],
)
def test_parse_reads_the_supported_forms(text: str, expected: dict[str, object]) -> None:
    assert parse_solo_rb(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        'node_name "#{`id`}"',
        "Ohai::Config[:disabled_plugins] = [:Passwd]",
        "node_name 'unterminated",
        "cookbook_path ['/a' '/b']",
        "node_name 'a'; system('x')",
        "node_name",
    ],
)
def test_parse_refuses_what_it_cannot_read_statically(text: str) -> None:
    with pytest.raises(SoloError) as err:
        parse_solo_rb(text)
    assert err.value.code == "solo_parse_error"


@needs_ruby
def test_rendered_solo_rb_is_valid_ruby(tmp_path: Path) -> None:
    path = tmp_path / "solo.rb"
    path.write_text(render_solo_rb("/run", "n", log_location="/l", json_attribs="/j"))
    result = subprocess.run([RUBY or "ruby", "-c", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Syntax OK" in result.stdout


@needs_ruby
@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_ruby_sees_exactly_the_values_and_runs_nothing_else(tmp_path: Path, value: str) -> None:
    path = tmp_path / "solo.rb"
    text = render_solo_rb(f"/srv/{value}", value, log_location=value, json_attribs=value)
    path.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [RUBY or "ruby", "-e", RUBY_RECORDER, str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == parse_solo_rb(text)
    assert seen["node_name"] == value
    assert not (tmp_path / "PWNED").exists()
