"""Cookbook versions and version constraints, with Chef's own semantics.

Follows chef/chef ``lib/chef/version_class.rb`` and ``lib/chef/version_constraint.rb``:
a cookbook version is ``x.y.z`` or ``x.y`` (meaning ``x.y.0``); a constraint is one operator and
one version; a bare version means ``=``; ``~> x.y`` allows any later minor of the same major and
``~> x.y.z`` any later patch of the same minor. ``!=`` is accepted as well (Berkshelf and the
Supermarket understand it; Chef's own class does not).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from chef_bridge.errors import ChefBridgeError


class CookbookError(ChefBridgeError):
    """Base of every cookbook error: a machine-readable ``code`` and a ``details`` dict."""

    code: str = "cookbook_error"


class VersionError(CookbookError):
    """A version or a version constraint that Chef would refuse."""

    code = "invalid_version"


_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
# Platform versions (``supports 'centos', '>= 7'``) may have a single part, as in Chef's
# Chef::Version::Platform; cookbook versions may not.
_PLATFORM_VERSION = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")
_OPERATORS = ("~>", ">=", "<=", "!=", ">", "<", "=")
_CONSTRAINT = re.compile(r"(~>|>=|<=|!=|>|<|=) *([0-9]\S*)")


@dataclass(frozen=True, order=True)
class Version:
    """A cookbook version: major.minor.patch, ordered numerically."""

    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str, *, platform: bool = False) -> Version:
        """Parse ``x.y.z`` or ``x.y`` (or ``x`` for a platform); else raise VersionError."""
        if not isinstance(text, str):
            raise VersionError(
                f"version must be a string, not {type(text).__name__}: {text!r}",
                details={"version": repr(text)},
            )
        pattern = _PLATFORM_VERSION if platform else _VERSION
        match = pattern.fullmatch(text)
        if match is None:
            expected = "'x.y.z', 'x.y' or 'x'" if platform else "'x.y.z' or 'x.y'"
            raise VersionError(
                f"'{text}' is not a valid version: it does not match {expected}",
                details={"version": text},
            )
        parts = [int(p) if p is not None else 0 for p in match.groups()]
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def _version_part_count(text: str) -> int:
    return len(text.split("."))


@dataclass(frozen=True)
class Constraint:
    """One Chef version constraint such as ``~> 2.1``; ``text`` is what the author wrote."""

    op: str
    version: Version
    text: str = field(compare=False)
    # ``~> 2.1`` and ``~> 2.1.0`` differ: the first allows 2.9, the second does not.
    missing_patch: bool = False

    ANY_TEXT: ClassVar[str] = ">= 0.0.0"

    @classmethod
    def parse(cls, text: str | None, *, platform: bool = False) -> Constraint:
        """Parse a constraint string; ``None`` or ``""`` mean any version (``>= 0.0.0``)."""
        if text is None:
            text = cls.ANY_TEXT
        if not isinstance(text, str):
            raise VersionError(
                f"version constraint must be a string, not {type(text).__name__}: {text!r}",
                details={"constraint": repr(text)},
            )
        stripped = text.strip()
        if not stripped:
            stripped = cls.ANY_TEXT
        if " " not in stripped and stripped[:1].isdigit():
            # A lone version means "exactly this one", as in Chef.
            op, raw = "=", stripped
        else:
            match = _CONSTRAINT.fullmatch(stripped)
            if match is None:
                raise VersionError(
                    f"'{text}' is not a valid version constraint: expected one of "
                    f"{', '.join(_OPERATORS)} followed by a version",
                    details={"constraint": text},
                )
            op, raw = match.group(1), match.group(2)
        try:
            version = Version.parse(raw, platform=platform)
        except VersionError as exc:
            raise VersionError(
                f"'{text}' is not a valid version constraint: {exc}",
                details={"constraint": text},
            ) from exc
        return cls(op=op, version=version, text=text, missing_patch=_version_part_count(raw) <= 2)

    @classmethod
    def any(cls) -> Constraint:
        """The constraint every version satisfies (``>= 0.0.0``)."""
        return cls.parse(cls.ANY_TEXT)

    def satisfied_by(self, candidate: Version | str) -> bool:
        """Whether ``candidate`` meets this constraint."""
        v = Version.parse(candidate) if isinstance(candidate, str) else candidate
        if self.op == "=":
            return v == self.version
        if self.op == "!=":
            return v != self.version
        if self.op == ">":
            return v > self.version
        if self.op == "<":
            return v < self.version
        if self.op == ">=":
            return v >= self.version
        if self.op == "<=":
            return v <= self.version
        # "~>": the only operator left.
        if v.major != self.version.major:
            return False
        if self.missing_patch:
            return v.minor >= self.version.minor
        return v.minor == self.version.minor and v.patch >= self.version.patch

    def __str__(self) -> str:
        return self.text.strip() or self.ANY_TEXT


def parse_constraint(text: str | Constraint | None) -> Constraint:
    """Return ``text`` as a Constraint (already-parsed constraints pass through)."""
    if isinstance(text, Constraint):
        return text
    return Constraint.parse(text)
