"""Chef versions and constraints, as chef/chef version_class.rb and version_constraint.rb."""

from __future__ import annotations

import pytest

from chef_bridge.versions import Constraint, Version, VersionError, parse_constraint


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3", Version(1, 2, 3)),
        ("1.2", Version(1, 2, 0)),
        ("0.0.0", Version(0, 0, 0)),
        ("10.20.30", Version(10, 20, 30)),
        ("01.002.3", Version(1, 2, 3)),  # Chef reads each part with to_i
    ],
)
def test_version_parses_three_and_two_part_versions(text: str, expected: Version) -> None:
    assert Version.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    ["1", "1.2.3.4", "v1.2.3", "1.2.3-beta", "1.2.x", "", " 1.2.3", "1.2.3 ", "a.b.c", "1..2"],
)
def test_version_refuses_anything_but_x_y_z_or_x_y(text: str) -> None:
    with pytest.raises(VersionError) as caught:
        Version.parse(text)
    assert caught.value.code == "invalid_version"
    assert repr(text) in str(caught.value) or text in str(caught.value)


def test_version_refuses_a_non_string() -> None:
    with pytest.raises(VersionError):
        Version.parse(1.2)  # type: ignore[arg-type]


def test_platform_versions_may_have_one_part() -> None:
    assert Version.parse("7", platform=True) == Version(7, 0, 0)
    assert Version.parse("18.04", platform=True) == Version(18, 4, 0)


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        ("1.2.3", "1.2.4"),
        ("1.2.9", "1.3.0"),
        ("1.9.9", "2.0.0"),
        ("1.2", "1.2.1"),
        ("1.10.0", "1.10.1"),
        ("2.9.0", "2.10.0"),  # numeric, not lexical
    ],
)
def test_versions_order_numerically(smaller: str, larger: str) -> None:
    assert Version.parse(smaller) < Version.parse(larger)
    assert sorted([Version.parse(larger), Version.parse(smaller)])[0] == Version.parse(smaller)


def test_two_part_version_equals_its_zero_patch_and_prints_three_parts() -> None:
    assert Version.parse("1.2") == Version.parse("1.2.0")
    assert str(Version.parse("1.2")) == "1.2.0"


# (constraint, version, satisfied)
CASES = [
    ("= 1.2.3", "1.2.3", True),
    ("= 1.2.3", "1.2.4", False),
    ("= 1.2", "1.2.0", True),
    ("1.2.3", "1.2.3", True),  # a bare version means "="
    ("1.2.3", "1.2.4", False),
    ("!= 1.2.3", "1.2.3", False),
    ("!= 1.2.3", "1.2.4", True),
    ("> 1.2.3", "1.2.3", False),
    ("> 1.2.3", "1.2.4", True),
    ("< 1.2.3", "1.2.2", True),
    ("< 1.2.3", "1.2.3", False),
    (">= 1.2.3", "1.2.3", True),
    (">= 1.2.3", "1.2.2", False),
    (">= 1.2.3", "9.0.0", True),
    ("<= 1.2.3", "1.2.3", True),
    ("<= 1.2.3", "1.2.4", False),
    (">=1.0", "1.0.0", True),  # Chef's pattern allows no space after the operator
    # Two-part pessimistic: ~> 2.1 means >= 2.1, < 3.0.
    ("~> 2.1", "2.1.0", True),
    ("~> 2.1", "2.1.9", True),
    ("~> 2.1", "2.9.0", True),
    ("~> 2.1", "2.0.9", False),
    ("~> 2.1", "3.0.0", False),
    ("~> 2.1", "1.9.0", False),
    # Three-part pessimistic: ~> 2.1.3 means >= 2.1.3, < 2.2.0.
    ("~> 2.1.3", "2.1.3", True),
    ("~> 2.1.3", "2.1.10", True),
    ("~> 2.1.3", "2.1.2", False),
    ("~> 2.1.3", "2.2.0", False),
    ("~> 2.1.3", "3.1.3", False),
    ("~> 2.1.0", "2.2.0", False),  # three parts pin the minor even when patch is 0
    ("~> 0.0", "0.99.0", True),
    ("~> 0.0", "1.0.0", False),
    (">= 0.0.0", "0.0.0", True),
]


@pytest.mark.parametrize(("constraint", "version", "satisfied"), CASES)
def test_constraint_satisfied_by_follows_chef_semantics(
    constraint: str, version: str, satisfied: bool
) -> None:
    assert Constraint.parse(constraint).satisfied_by(Version.parse(version)) is satisfied
    assert Constraint.parse(constraint).satisfied_by(version) is satisfied


@pytest.mark.parametrize(
    "text",
    [
        "~>",
        ">= ",
        "=> 1.0",
        "~ 1.0",
        ">= 1",
        ">= 1.2.3.4",
        "1.2.3 2.0",
        ">= a.b",
        "== 1.0",
        ">>1.0",
    ],
)
def test_constraint_refuses_malformed_text(text: str) -> None:
    with pytest.raises(VersionError) as caught:
        Constraint.parse(text)
    assert caught.value.code == "invalid_version"
    assert text in str(caught.value)


@pytest.mark.parametrize("text", [None, "", "   "])
def test_missing_constraint_means_any_version(text: str | None) -> None:
    constraint = Constraint.parse(text)
    assert constraint.satisfied_by("0.0.0")
    assert constraint.satisfied_by("99.0.0")
    assert str(constraint) == ">= 0.0.0"


def test_constraint_keeps_the_authors_text_for_messages() -> None:
    assert str(Constraint.parse("~>  2.1")) == "~>  2.1"
    assert Constraint.parse("~>  2.1").text == "~>  2.1"


def test_constraints_compare_by_meaning_not_spelling() -> None:
    assert Constraint.parse(">=1.0") == Constraint.parse(">= 1.0")
    assert Constraint.parse("~> 2.1") != Constraint.parse("~> 2.1.0")


def test_platform_constraints_accept_one_part_versions() -> None:
    assert Constraint.parse(">= 7", platform=True).satisfied_by(Version.parse("7.9", platform=True))
    with pytest.raises(VersionError):
        Constraint.parse(">= 7")


def test_parse_constraint_passes_constraints_through() -> None:
    constraint = Constraint.parse("~> 1.0")
    assert parse_constraint(constraint) is constraint
    assert parse_constraint("~> 1.0") == constraint
