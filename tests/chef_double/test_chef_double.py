"""The chef-solo test double: it resolves what chef would, fails where chef would, records runs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chef_bridge.solo import render_solo_rb

DOUBLE = Path(__file__).resolve().parent / "chef-solo"
AGENT_PATH = Path(__file__).resolve().parents[2] / "bootstrap" / "agent.py"
RUBY = shutil.which("ruby")
needs_ruby = pytest.mark.skipif(RUBY is None, reason="ruby is not installed (apt-get install ruby)")


def load_agent() -> Any:
    """bootstrap/agent.py as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location("scalarium_agent_for_double", AGENT_PATH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Result:
    """One run of the double."""

    code: int
    out: str
    err: str
    records: list[dict[str, Any]]


def write_tree(base: Path, files: dict[str, str]) -> None:
    """Create ``files`` (relative path -> content) under ``base``."""
    for rel, content in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


BASIC_TREE = {
    "cookbooks/web/metadata.rb": "name 'web'\nversion '1.2.3'\ndepends 'base'\n",
    "cookbooks/web/recipes/default.rb": "package 'nginx'\n",
    "cookbooks/web/recipes/app.rb": "include_recipe 'base::users'\nservice 'app'\n",
    "cookbooks/base/metadata.json": json.dumps({"name": "base", "version": "0.4.0"}),
    "cookbooks/base/recipes/default.rb": "log 'base'\n",
    "cookbooks/base/recipes/users.rb": "user 'deploy'\n",
    "roles/webserver.json": json.dumps(
        {"name": "webserver", "run_list": ["role[common]", "recipe[web::app]", "role[common]"]}
    ),
    "roles/common.json": json.dumps(
        {
            "name": "common",
            "run_list": ["recipe[base]"],
            "env_run_lists": {"staging": ["recipe[base::users]"]},
        }
    ),
}

NODE = {
    "run_list": ["recipe[web]", "recipe[web::app]"],
    "scalarium": {
        "activity": "configure",
        "command_id": "c-1",
        "cluster_version": 7,
        "layers": {
            "lb": {"instances": {"lb1": {}}},
            "app": {"instances": {"app2": {}, "app1": {}}},
        },
    },
    "opsworks": {"activity": "configure", "layers": {"app": {"instances": {"app1": {}}}}},
}


def solo_rb(base: Path, extra: str = "") -> str:
    """A minimal solo.rb for a tree under ``base``."""
    return (
        f"cookbook_path ['{base}/cookbooks']\n"
        f"role_path '{base}/roles'\n"
        f"file_cache_path '{base}/cache'\n"
        "log_location STDOUT\n"
        "node_name 'i-0001'\n" + extra
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A cookbook tree with roles, a solo.rb and the node JSON above."""
    write_tree(tmp_path, BASIC_TREE)
    (tmp_path / "solo.rb").write_text(solo_rb(tmp_path))
    (tmp_path / "node.json").write_text(json.dumps(NODE))
    return tmp_path


def run(
    base: Path,
    *args: str,
    env: dict[str, str] | None = None,
    program: Path = DOUBLE,
    license_env: bool = True,
) -> Result:
    """Run the double in ``base``; records go to base/record.jsonl."""
    record = base / "record.jsonl"
    full_env = {"PATH": os.environ["PATH"], "CHEF_DOUBLE_RECORD": str(record)}
    if license_env:
        full_env["CHEF_LICENSE"] = "accept-no-persist"
    full_env.update(env or {})
    argv = [str(program), *(args or ("-c", "solo.rb", "-j", "node.json"))]
    proc = subprocess.run(
        argv, cwd=base, env=full_env, capture_output=True, text=True, timeout=60, check=False
    )
    lines = record.read_text().splitlines() if record.exists() else []
    return Result(proc.returncode, proc.stdout, proc.stderr, [json.loads(x) for x in lines])


def test_a_resolvable_run_list_converges_every_recipe_in_order_and_exits_0(tree: Path) -> None:
    result = run(tree)
    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert lines[0] == "Starting Chef Infra Client, version 18.4.12 (test double)"
    assert 'resolving cookbooks for run list: ["web", "web::app"]' in lines
    recipes = [line.removeprefix("Recipe: ") for line in lines if line.startswith("Recipe: ")]
    assert recipes == ["web::default", "base::users", "web::app"]
    assert "  - base (0.4.0)" in lines and "  - web (1.2.3)" in lines
    assert lines[-1].startswith("Chef Infra Client finished, 3/3 resources updated in ")
    assert lines[-1].endswith(" seconds")


def test_the_record_holds_run_list_node_cluster_members_and_the_node_json(tree: Path) -> None:
    assert run(tree).code == 0
    assert run(tree, "-c", "solo.rb", "-j", "node.json", "-o", "recipe[base]").code == 0
    first, second = run(tree).records[:2]
    assert first["run_list"] == ["recipe[web]", "recipe[web::app]"]
    assert first["recipes"] == ["web::default", "base::users", "web::app"]
    assert first["node_name"] == "i-0001"
    assert first["activity"] == "configure"
    assert first["command_id"] == "c-1"
    assert first["cluster_version"] == 7
    assert first["cluster"] == {
        "scalarium": {"lb": ["lb1"], "app": ["app1", "app2"]},
        "opsworks": {"app": ["app1"]},
    }
    assert first["node_json"] == NODE
    assert first["node_json_path"] == str(tree / "node.json")
    assert first["chef_license"] == "accept-no-persist"
    assert (first["outcome"], first["exit_code"], first["error"]) == ("success", 0, None)
    assert first["started_at"] <= first["finished_at"]
    assert second["run_list"] == ["recipe[base]"], "-o overrides the node's run list"
    assert second["recipes"] == ["base::default"]


def test_without_the_env_var_the_record_goes_to_the_file_cache_path(tree: Path) -> None:
    proc = subprocess.run(
        [str(DOUBLE), "-c", "solo.rb", "-j", "node.json"],
        cwd=tree,
        env={"PATH": os.environ["PATH"], "CHEF_LICENSE": "accept-no-persist"},
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0
    lines = (tree / "cache" / "chef-double-runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["outcome"] for line in lines] == ["success"]


def test_roles_expand_recursively_once_each_with_environment_run_lists(tree: Path) -> None:
    (tree / "node.json").write_text(json.dumps({"run_list": ["role[webserver]"]}))
    result = run(tree)
    assert result.code == 0, result.out
    assert result.records[0]["roles"] == ["webserver", "common"]
    assert result.records[0]["expanded_run_list"] == ["base", "web::app"]
    staged = run(tree, "-c", "solo.rb", "-j", "node.json", "-E", "staging")
    assert staged.records[-1]["expanded_run_list"] == ["base::users", "web::app"]


FAILURES = [
    pytest.param(
        {"run_list": ["recipe[db]"]},
        {},
        "Chef::Exceptions::CookbookNotFound: Cookbook db not found",
        id="missing-cookbook",
    ),
    pytest.param(
        {"run_list": ["recipe[web::nope]"]},
        {},
        "Chef::Exceptions::RecipeNotFound: could not find recipe nope for cookbook web",
        id="missing-recipe",
    ),
    pytest.param(
        {"run_list": ["recipe[web]"]},
        {"cookbooks/web/metadata.rb": "name 'web'\ndepends 'mysql'\n"},
        "Chef::Exceptions::CookbookNotFound: Cookbook mysql not found",
        id="missing-dependency",
    ),
    pytest.param(
        {"run_list": ["recipe[bare]"]},
        {"cookbooks/bare/recipes/default.rb": "log 'x'\n"},
        "Chef::Exceptions::MetadataNotFound: No metadata.rb or metadata.json found for "
        "cookbook bare",
        id="missing-metadata",
    ),
    pytest.param(
        {"run_list": ["recipe[web::app]"]},
        {"cookbooks/web/recipes/app.rb": "include_recipe 'base::gone'\n"},
        "Chef::Exceptions::RecipeNotFound: could not find recipe gone for cookbook base",
        id="missing-included-recipe",
    ),
    pytest.param(
        {"run_list": ["role[nosuch]"]},
        {},
        "Chef::Exceptions::MissingRole: The expanded run list includes nonexistent roles: nosuch",
        id="missing-role",
    ),
    pytest.param(
        {"run_list": ["recipe[bad name]"]},
        {},
        "ArgumentError: Unable to create Chef::RunList::RunListItem from recipe[bad name]",
        id="invalid-run-list-entry",
    ),
    pytest.param(
        {"run_list": ["recipe[web]"], "chef_double": {"fail": True}},
        {},
        "RuntimeError: chef double: failure requested",
        id="fail-attribute",
    ),
]


@pytest.mark.parametrize(("node", "files", "fatal"), FAILURES)
def test_what_chef_fails_on_exits_1_with_chefs_exception(
    tree: Path, node: dict[str, Any], files: dict[str, str], fatal: str
) -> None:
    write_tree(tree, files)
    (tree / "node.json").write_text(json.dumps(node))
    result = run(tree)
    assert result.code == 1, result.out
    fatal_lines = [line for line in result.out.splitlines() if "FATAL: " in line]
    assert fatal_lines[-1].split("FATAL: ", 1)[1].startswith(fatal)
    assert (tree / "cache" / "chef-stacktrace.out").is_file()
    record = result.records[-1]
    assert (record["outcome"], record["exit_code"]) == ("failed", 1)
    assert fatal.startswith(record["error"]["class"])


@pytest.mark.parametrize(
    ("content", "fatal"),
    [
        ("{not json", "Could not parse the provided JSON file (node.json): "),
        ("[1, 2]", "Could not parse the provided JSON file (node.json): not a JSON object"),
    ],
)
def test_invalid_node_json_fails_with_chefs_message(tree: Path, content: str, fatal: str) -> None:
    (tree / "node.json").write_text(content)
    result = run(tree)
    assert result.code == 1
    assert f"FATAL: {fatal}" in result.out
    assert result.records[-1]["outcome"] == "failed"


def test_a_missing_node_json_file_fails(tree: Path) -> None:
    result = run(tree, "-c", "solo.rb", "-j", "absent.json")
    assert result.code == 1
    assert "FATAL: Cannot load configuration from absent.json" in result.out


def test_solo_rb_with_ruby_code_is_refused_as_a_configuration_error(tree: Path) -> None:
    (tree / "solo.rb").write_text(solo_rb(tree, "cookbook_path File.join('a', 'b')\n"))
    result = run(tree)
    assert result.code == 1
    assert "FATAL: Configuration error detected in solo.rb: line 6:" in result.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-c", "solo.rb", "--bogus"], "invalid option: --bogus"),
        (["-c", "solo.rb", "-Q"], "invalid option: -Q"),
        (["-c"], "missing argument: -c"),
        (["-l", "chatty"], "-l: chatty is not one of the allowed values"),
        (["--no-color=yes"], "needless argument: --no-color=yes"),
        (["stray"], "invalid argument: stray"),
    ],
)
def test_a_bad_command_line_exits_2_like_chefs_option_parser(
    tree: Path, args: list[str], message: str
) -> None:
    result = run(tree, *args)
    assert result.code == 2
    assert result.err.splitlines()[0].startswith(message)
    assert "Usage: chef-solo (options)" in result.err
    assert result.records == []


def test_every_option_the_agent_or_an_operator_may_pass_is_accepted(tree: Path) -> None:
    result = run(
        tree,
        "--config=solo.rb",
        "--json-attributes",
        "node.json",
        "-l",
        "debug",
        "--no-color",
        "-z",
        "--legacy-mode",
        "--no-fork",
        "--force-formatter",
        "-F",
        "doc",
        "-N",
        "from-cli",
    )
    assert result.code == 0, result.err
    assert result.records[0]["node_name"] == "from-cli"
    assert any("DEBUG: solo.rb settings:" in line for line in result.out.splitlines())


def test_log_location_and_logfile_send_the_log_to_a_file(tree: Path) -> None:
    (tree / "solo.rb").write_text(solo_rb(tree).replace("STDOUT", f"'{tree}/solo.log'"))
    result = run(tree)
    assert result.code == 0
    assert result.out == ""
    assert (tree / "solo.log").read_text().startswith("Starting Chef Infra Client")
    result = run(tree, "-c", "solo.rb", "-j", "node.json", "-L", str(tree / "cli.log"))
    assert "Chef Infra Client finished" in (tree / "cli.log").read_text()


def test_an_empty_run_list_succeeds_with_a_warning(tree: Path) -> None:
    (tree / "node.json").write_text("{}")
    result = run(tree)
    assert result.code == 0
    assert "WARN: Node i-0001 has an empty run list." in result.out
    assert "Chef Infra Client finished, 0/0 resources updated" in result.out


@needs_ruby
def test_a_recipe_with_a_ruby_syntax_error_fails_the_compile(tree: Path) -> None:
    write_tree(tree, {"cookbooks/web/recipes/app.rb": "package 'x' do\n  action :install\n"})
    result = run(tree)
    assert result.code == 1
    assert f"Recipe Compile Error in {tree}/cookbooks/web/recipes/app.rb" in result.out
    assert result.records[-1]["error"]["class"] == "SyntaxError"
    assert "Recipe: " not in result.out, "nothing converges after a compile error"
    assert run(tree, env={"CHEF_DOUBLE_RUBY": ""}).code == 0, "syntax checks can be disabled"


def test_a_recipe_marked_to_fail_fails_after_the_recipes_before_it(tree: Path) -> None:
    failing = "include_recipe 'base::users'\n# chef-double: fail\n"
    write_tree(tree, {"cookbooks/web/recipes/app.rb": failing})
    result = run(tree)
    assert result.code == 1
    recipes = [line for line in result.out.splitlines() if line.startswith("Recipe: ")]
    assert recipes == ["Recipe: web::default", "Recipe: base::users", "Recipe: web::app"]
    assert "Chef Infra Client failed. 2 resources updated" in result.out
    assert "execute[chef-double-fail] (web::app line 2) had an error" in result.out
    assert result.records[-1]["error"]["class"] == "Mixlib::ShellOut::ShellCommandFailed"


def test_chef_double_fail_env_fails_the_run(tree: Path) -> None:
    assert run(tree, env={"CHEF_DOUBLE_FAIL": "1"}).code == 1
    assert run(tree, env={"CHEF_DOUBLE_FAIL": "0"}).code == 0


def test_sigterm_mid_run_exits_3_promptly_and_is_recorded(tree: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "CHEF_LICENSE": "accept-no-persist",
        "CHEF_DOUBLE_RECORD": str(tree / "record.jsonl"),
        "CHEF_DOUBLE_SLEEP": "60",
    }
    proc = subprocess.Popen(
        [str(DOUBLE), "-c", "solo.rb", "-j", "node.json"],
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("Converging"):
                break
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    assert code == 3
    assert time.monotonic() - started < 5
    assert "FATAL: Chef::Exceptions::SigTerm: SIGTERM received, stopping" in rest
    record = json.loads((tree / "record.jsonl").read_text())
    assert (record["outcome"], record["exit_code"]) == ("interrupted", 3)


@pytest.mark.parametrize(
    ("name", "extra", "env", "code"),
    [
        ("chef-solo", [], {}, 172),
        ("chef-solo", ["--chef-license", "accept"], {}, 0),
        ("chef-solo", [], {"CHEF_LICENSE": "accept-no-persist"}, 0),
        ("cinc-solo", [], {}, 0),
    ],
)
def test_chef_branded_runs_need_the_licence_accepted_and_cinc_ones_do_not(
    tree: Path, name: str, extra: list[str], env: dict[str, str], code: int
) -> None:
    link = tree / "bin" / name
    link.parent.mkdir()
    link.symlink_to(DOUBLE)
    result = run(
        tree, "-c", "solo.rb", "-j", "node.json", *extra, env=env, program=link, license_env=False
    )
    assert result.code == code, result.out + result.err


def test_version_prints_that_it_is_a_test_double(tree: Path) -> None:
    result = run(tree, "--version")
    assert (result.code, result.out) == (0, "Chef Infra Client: 18.4.12 (test double)\n")


def test_the_double_understands_chef_bridge_render_solo_rb(tmp_path: Path) -> None:
    base = tmp_path / "run"
    write_tree(base, BASIC_TREE)
    (tmp_path / "node.json").write_text(json.dumps({"run_list": ["role[webserver]"]}))
    (tmp_path / "solo.rb").write_text(
        render_solo_rb(
            str(base),
            "i-0abc's node",
            log_location=str(tmp_path / "chef.log"),
            log_level="warn",
            json_attribs=str(tmp_path / "node.json"),
        )
    )
    result = run(tmp_path, "-c", "solo.rb")
    assert result.code == 0, (tmp_path / "chef.log").read_text()
    record = result.records[0]
    assert record["node_name"] == "i-0abc's node"
    assert record["recipes"] == ["base::default", "base::users", "web::app"]
    assert record["node_json_path"] == str(tmp_path / "node.json"), "json_attribs from solo.rb"
    assert "Chef Infra Client finished" in (tmp_path / "chef.log").read_text()


def test_the_double_understands_the_agents_solo_rb(tmp_path: Path) -> None:
    agent = load_agent()
    bundle, run_dir, state = tmp_path / "bundle", tmp_path / "cmd", tmp_path / "state"
    write_tree(bundle, BASIC_TREE)
    run_dir.mkdir()
    (run_dir / "node.json").write_text(json.dumps(NODE))
    (run_dir / "solo.rb").write_text(
        agent.solo_rb(str(bundle), str(run_dir), str(state), "i-0agent")
    )
    # The agent runs exactly `BINARY -c solo.rb -j node.json` from the run directory.
    proc = subprocess.run(
        [str(DOUBLE), "-c", str(run_dir / "solo.rb"), "-j", str(run_dir / "node.json")],
        cwd=run_dir,
        env={"PATH": os.environ["PATH"], "CHEF_LICENSE": "accept-no-persist"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout
    records = (state / "cache" / "chef-double-runs.jsonl").read_text().splitlines()
    record = json.loads(records[0])
    assert record["node_name"] == "i-0agent"
    assert record["recipes"] == ["web::default", "base::users", "web::app"]
