"""Reading cookbook metadata statically, from captured real metadata.rb / metadata.json files."""

from __future__ import annotations

from pathlib import Path

import pytest

from chef_bridge.metadata import MetadataError, parse_metadata_rb, read_metadata
from chef_bridge.versions import Constraint, Version

FIXTURES = Path(__file__).parent / "fixtures" / "metadata"


def deps(text: str) -> dict[str, str]:
    """Dependencies of a metadata.rb source, as constraint strings."""
    meta = parse_metadata_rb(text, "metadata.rb", "fallback")
    return {name: str(c) for name, c in meta.dependencies.items()}


# (fixture dir, name, version, dependencies, supports, chef_version)
FIXTURE_CASES = [
    (
        "opsworks_apache2",
        "apache2",
        "1.0.0",
        {},
        {},
        (),
    ),
    (
        "deploy",  # aws/opsworks-cookbooks deploy: no name, two-part version
        "deploy",
        "0.1.0",
        {
            "dependencies": ">= 0.0.0",
            "apache2": ">= 0.0.0",
            "mod_php5_apache2": ">= 0.0.0",
            "nginx": ">= 0.0.0",
            "ssh_users": ">= 0.0.0",
            "opsworks_agent_monit": ">= 0.0.0",
        },
        {},
        (),
    ),
    (
        "opsworks_apt",
        "apt",
        "2.6.1",
        {},
        {"ubuntu": ">= 0.0.0", "debian": ">= 0.0.0"},
        (),
    ),
    (
        "postgresql",
        "postgresql",
        "3.4.2",
        {"apt": ">= 1.9.0", "build-essential": ">= 0.0.0", "openssl": ">= 0.0.0"},
        {
            "ubuntu": ">= 0.0.0",
            "debian": ">= 0.0.0",
            "fedora": ">= 0.0.0",
            "suse": ">= 0.0.0",
            "amazon": ">= 0.0.0",
            "redhat": ">= 6.0",
            "centos": ">= 6.0",
            "scientific": ">= 6.0",
            "oracle": ">= 6.0",
        },
        (),
    ),
    (
        "sous_chefs_apache2",
        "apache2",
        "8.14.3",
        {"yum-epel": ">= 0.0.0"},
        {
            p: ">= 0.0.0"
            for p in (
                "debian ubuntu redhat centos fedora amazon scientific freebsd suse opensuse "
                "opensuseleap arch"
            ).split()
        },
        (">= 15.3",),
    ),
    (
        "equivs",
        "equivs",
        "0.1.1",
        {"apt": ">= 0.0.0"},
        {"ubuntu": ">= 0.0.0", "debian": ">= 0.0.0"},
        (),
    ),
    (
        "respond_to_guards",
        "build-essential",
        "8.0.3",
        {"seven_zip": ">= 0.0.0", "mingw": ">= 1.1"},
        {
            **{
                p: ">= 0.0.0"
                for p in (
                    "fedora redhat centos ubuntu debian amazon suse opensuse opensuseleap"
                ).split()
            },
            "mac_os_x": ">= 10.9",
            "smartos": ">= 0.0.0",
            "windows": ">= 6.1",
        },
        (">= 12.5, < 15",),
    ),
    (
        "nginx_json",
        "nginx",
        "12.0.11",
        {"yum-epel": ">= 0.0.0", "apt": "~> 7.2", "ohai": ">= 0.0.0"},
        {"amazon": ">= 0.0.0", "centos": ">= 7.0", "debian": ">= 0.0.0", "ubuntu": ">= 18.04"},
        (">= 15.3",),
    ),
]


@pytest.mark.parametrize(
    ("fixture", "name", "version", "dependencies", "supports", "chef_version"), FIXTURE_CASES
)
def test_read_metadata_reads_real_cookbooks(
    fixture: str,
    name: str,
    version: str,
    dependencies: dict[str, str],
    supports: dict[str, str],
    chef_version: tuple[str, ...],
) -> None:
    meta = read_metadata(FIXTURES / fixture)
    assert meta.name == name
    assert meta.version == Version.parse(version)
    assert {n: str(c) for n, c in meta.dependencies.items()} == dependencies
    assert {p: str(c) for p, c in meta.supports.items()} == supports
    assert meta.chef_version == chef_version
    assert meta.source_file.endswith(("metadata.rb", "metadata.json"))


def test_read_metadata_keeps_descriptive_fields() -> None:
    meta = read_metadata(FIXTURES / "opsworks_apache2")
    assert meta.description.startswith("Installs and configures all aspects of apache2")
    assert meta.maintainer == "AWS OpsWorks"
    assert meta.license == "Apache 2.0"
    assert meta.recipes["apache2::mod_ssl"].startswith("Apache module 'ssl'")
    assert len(meta.recipes) == 5


def test_metadata_without_a_name_falls_back_to_the_directory_name() -> None:
    meta = read_metadata(FIXTURES / "deploy")
    assert meta.name == "deploy"
    assert meta.name_from_directory is True
    assert read_metadata(FIXTURES / "postgresql").name_from_directory is False


def test_metadata_json_is_preferred_over_metadata_rb() -> None:
    # The metadata.rb beside it computes its version, which would be an error if read.
    meta = read_metadata(FIXTURES / "json_and_rb")
    assert meta.name == "haproxy"
    assert meta.source_file.endswith("metadata.json")


def test_interpolated_harmless_fields_are_ignored() -> None:
    meta = read_metadata(FIXTURES / "equivs")
    assert meta.source_url == ""  # "https://github.com/ayanich/#{name}" needs Ruby
    assert meta.recipes == {
        "equivs": "Installs equivs",
        "equivs::system_install": "Installs equivs",
    }


@pytest.mark.parametrize(
    ("fixture", "line", "fragment"),
    [
        ("unreadable_version_file", 5, "version"),
        ("unreadable_computed_name", 2, "name File.basename"),
        ("unreadable_interpolated_depends", 7, 'depends "#{db_flavour}"'),
        ("unreadable_conditional_depends", 6, "depends 'datadog'"),
    ],
)
def test_unreadable_declarations_name_the_file_and_line(
    fixture: str, line: int, fragment: str
) -> None:
    with pytest.raises(MetadataError) as caught:
        read_metadata(FIXTURES / fixture)
    error = caught.value
    assert error.code == "metadata_unreadable"
    assert f"{fixture}/metadata.rb:{line}:" in str(error)
    assert fragment in str(error)
    assert error.details["line"] == line


# (metadata.rb source, expected dependencies)
DEPENDS_CASES = [
    ("depends 'a'", {"a": ">= 0.0.0"}),
    ("depends 'a', '>= 1.0'", {"a": ">= 1.0"}),
    ('depends "a", "~> 2.1"', {"a": "~> 2.1"}),
    ("depends('a', '>= 1.0')", {"a": ">= 1.0"}),
    ("depends('a')", {"a": ">= 0.0.0"}),
    ("depends 'a', '= 1.2.3' # pinned for a bug", {"a": "= 1.2.3"}),
    ("depends 'a'; depends 'b', '< 3.0'", {"a": ">= 0.0.0", "b": "< 3.0"}),
    ("depends 'a', '>= 1.0'\ndepends 'a', '>= 2.0'", {"a": ">= 2.0"}),  # last one wins, as Chef
    ("depends :a", {"a": ">= 0.0.0"}),
    ("depends 'a',\n        '~> 1.4'", {"a": "~> 1.4"}),
    ("depends \\\n  'a'", {"a": ">= 0.0.0"}),
    ("%w(a b).each { |cb| depends cb }", {"a": ">= 0.0.0", "b": ">= 0.0.0"}),
    ("['a', 'b'].each do |cb|\n  depends cb, '~> 1.0'\nend", {"a": "~> 1.0", "b": "~> 1.0"}),
    ("%w[a].each do |cb| depends cb end", {"a": ">= 0.0.0"}),
    ("flavour = 'mysql'\ndepends flavour", {"mysql": ">= 0.0.0"}),
    ("=begin\ndepends 'commented'\n=end\ndepends 'a'", {"a": ">= 0.0.0"}),
    ("depends 'a'\n__END__\ndepends 'b'", {"a": ">= 0.0.0"}),
    ("# depends 'commented'\ndepends 'a' # depends 'b'", {"a": ">= 0.0.0"}),
    ("depends 'it\\'s'", {"it's": ">= 0.0.0"}),
    ('depends "tab\\there"', {"tab\there": ">= 0.0.0"}),
    ('depends "caf\\u00e9"', {"café": ">= 0.0.0"}),
    ("depends %q(a)", {"a": ">= 0.0.0"}),
]


@pytest.mark.parametrize(("source", "expected"), DEPENDS_CASES)
def test_depends_forms_are_read_statically(source: str, expected: dict[str, str]) -> None:
    assert deps(source) == expected


# Statements that are ignored because they change nothing the server decides.
HARMLESS = [
    "long_description IO.read(File.join(File.dirname(__FILE__), 'README.md'))",
    "long_description <<-EOH\n  depends 'inside-heredoc'\n  EOH",
    "long_description <<~EOH\n  text with #{interpolation}\nEOH",
    "attribute 'apache/dir',\n  :display_name => 'Apache Directory',\n  :default => '/etc/apache2'",
    "attribute 'apache/ports', display_name: 'Ports', type: 'array', default: ['80', '443']",
    "provides 'service[apache2]'",
    "gem 'chef-sugar', '~> 5.0'",
    "recipe 'apache2::mod_ssl', 'Apache module ssl'",
    "privacy true",
    "ohai_version '>= 14'",
    "issues_url 'https://example.com/issues' if respond_to?(:issues_url)",
    'source_url "https://example.com/#{name}"',
    "eager_load_libraries false",
    "grouping 'apache', title: 'Apache'",
    "if defined?(Chef::VERSION)\n  maintainer 'x'\nend",
    "some_unknown_call 'x', 1, :y",
    "version_file = File.join(File.dirname(__FILE__), 'VERSION')",
]


@pytest.mark.parametrize("statement", HARMLESS)
def test_harmless_statements_are_ignored(statement: str) -> None:
    source = f"name 'web'\nversion '1.2.3'\n{statement}\ndepends 'apt', '>= 2.0'\n"
    meta = parse_metadata_rb(source, "metadata.rb", "fallback")
    assert meta.name == "web"
    assert meta.version == Version(1, 2, 3)
    assert {n: str(c) for n, c in meta.dependencies.items()} == {"apt": ">= 2.0"}


# (source, code, line) for metadata that must be refused.
REFUSED = [
    ("name 'a'\nversion File.read('VERSION').strip", "metadata_unreadable", 2),
    ("name 'a'\nversion VERSION", "metadata_unreadable", 2),
    ("name 'a'\nversion 1.0", "metadata_unreadable", 2),
    ('name "cb-#{suffix}"', "metadata_unreadable", 1),
    ("name 'a'\ndepends \"#{x}\"", "metadata_unreadable", 2),
    ("name 'a'\ndepends 'b', \"~> #{major}.0\"", "metadata_unreadable", 2),
    ("name 'a'\ndepends cookbook_name", "metadata_unreadable", 2),
    ("name 'a'\ndepends 'b' if ENV['B']", "metadata_unreadable", 2),
    ("name 'a'\nunless windows?\n  depends 'apt'\nend", "metadata_unreadable", 3),
    ("name 'a'\nDEPS.each { |d| depends d }", "metadata_unreadable", 2),
    ("name 'a'\nsupports os", "metadata_unreadable", 2),
    ("name 'a'\nchef_version CHEF_MIN", "metadata_unreadable", 2),
    ("name 'a'\nversion '1.2.3.4'", "metadata_invalid", 2),
    ("name 'a'\nversion 'latest'", "metadata_invalid", 2),
    ("name 'a'\ndepends 'b', '>= 1.0', '< 2.0'", "metadata_invalid", 2),
    ("name 'a'\ndepends 'b', 'newest'", "metadata_invalid", 2),
    ("name 'a'\nsupports 'ubuntu', 'latest'", "metadata_invalid", 2),
    ("name 'a'\ndepends 'a'", "metadata_invalid", 2),
    ("name 'a'\nlong_description <<-EOH\nno end", "metadata_unreadable", 2),
    ("name 'a'\ndepends 'b", "metadata_unreadable", 2),
]


@pytest.mark.parametrize(("source", "code", "line"), REFUSED)
def test_metadata_that_matters_but_cannot_be_read_is_refused(
    source: str, code: str, line: int
) -> None:
    with pytest.raises(MetadataError) as caught:
        parse_metadata_rb(source, "cookbooks/a/metadata.rb", "a")
    assert caught.value.code == code
    assert f"cookbooks/a/metadata.rb:{line}:" in str(caught.value)


def test_missing_version_defaults_to_zero() -> None:
    meta = parse_metadata_rb("name 'a'\n", "metadata.rb", "a")
    assert meta.version == Version(0, 0, 0)


def test_chef_version_lines_are_alternatives_of_joined_requirements() -> None:
    meta = parse_metadata_rb(
        "chef_version '>= 12.1', '< 14'\nchef_version('>= 15')", "metadata.rb", "a"
    )
    assert meta.chef_version == (">= 12.1, < 14", ">= 15")


def test_supports_with_a_version_uses_platform_versions() -> None:
    meta = parse_metadata_rb("supports 'centos', '>= 7'", "metadata.rb", "a")
    assert meta.supports == {"centos": Constraint.parse(">= 7.0")}


def test_directory_without_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MetadataError) as caught:
        read_metadata(tmp_path)
    assert caught.value.code == "metadata_missing"


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("{not json", "invalid JSON"),
        ("[]", "expected a JSON object"),
        ('{"name": "a", "version": "one"}', "version"),
        ('{"name": "a", "dependencies": {"b": "newest"}}', "dependencies: b"),
        ('{"name": "a", "dependencies": {"b": [">= 1.0", "< 2.0"]}}', "only one"),
        ('{"name": "a", "dependencies": {"a": ">= 0.0.0"}}', "depends on itself"),
    ],
)
def test_malformed_metadata_json_is_refused(tmp_path: Path, document: str, problem: str) -> None:
    (tmp_path / "metadata.json").write_text(document)
    with pytest.raises(MetadataError) as caught:
        read_metadata(tmp_path)
    assert caught.value.code == "metadata_invalid"
    assert problem in str(caught.value)
    assert str(tmp_path / "metadata.json") in str(caught.value)


def test_metadata_json_without_name_or_version_uses_directory_and_zero(tmp_path: Path) -> None:
    cookbook = tmp_path / "legacy"
    cookbook.mkdir()
    (cookbook / "metadata.json").write_text('{"dependencies": {"apt": []}}')
    meta = read_metadata(cookbook)
    assert (meta.name, meta.version, meta.name_from_directory) == ("legacy", Version(0, 0, 0), True)
    assert meta.dependencies == {"apt": Constraint.any()}
