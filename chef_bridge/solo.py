"""``solo.rb`` for a chef-solo run in local mode, and a static reader for it.

The run directory (``base_dir``) holds the unpacked bundle (``cookbooks/``, ``roles/``,
``environments/``, ``data_bags/``) plus what chef writes during the run (``nodes/``, ``cache/``,
``backup/``). Every string is rendered as a Ruby single-quoted literal, in which only ``\\\\``
and ``\\'`` are escapes and nothing is interpolated, and control characters are refused: a node
name or a path can therefore never become Ruby code.

This module depends on the standard library only, so that the node agent can embed it.
"""

from __future__ import annotations

import re

from chef_bridge.errors import ChefBridgeError

LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")
# Relative to base_dir; the bundle's own layout (chef_bridge.bundle) for the first four.
LAYOUT = {
    "cookbook_path": "cookbooks",
    "role_path": "roles",
    "data_bag_path": "data_bags",
    "environment_path": "environments",
    "node_path": "nodes",
    "file_cache_path": "cache",
    "file_backup_path": "backup",
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KEY = re.compile(r"[a-z_][a-z0-9_]*")
_WORD = re.compile(r":?[A-Za-z_][A-Za-z0-9_]*")

SoloValue = str | bool | None | list[str]


class SoloError(ChefBridgeError):
    """A value that cannot go into solo.rb, or a line the reader does not understand."""

    code: str = "solo_error"


def ruby_string(value: str) -> str:
    """``value`` as a Ruby single-quoted string literal; control characters are refused."""
    if _CONTROL.search(value):
        raise SoloError(f"{value!r} contains a control character", "solo_invalid_value")
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _join(base_dir: str, rel: str) -> str:
    return f"{base_dir.rstrip('/')}/{rel}"


def render_solo_rb(
    base_dir: str,
    node_name: str,
    *,
    log_location: str | None = None,
    log_level: str = "info",
    json_attribs: str | None = None,
) -> str:
    """The solo.rb for a local-mode chef-solo run in ``base_dir`` as ``node_name``; the log
    goes to ``log_location`` (a file path) or, when None, to standard output."""
    if not base_dir or not node_name:
        raise SoloError("base_dir and node_name must not be empty", "solo_invalid_value")
    if log_level not in LOG_LEVELS:
        raise SoloError(
            f"log level {log_level!r} is not one of {', '.join(LOG_LEVELS)}",
            "solo_invalid_log_level",
        )
    lines = [
        "# Written by Scalarium for chef-solo in local mode; regenerated before every run.",
        f"node_name {ruby_string(node_name)}",
        "local_mode true",
        f"cookbook_path [{ruby_string(_join(base_dir, LAYOUT['cookbook_path']))}]",
    ]
    for key in ("role_path", "data_bag_path", "environment_path", "node_path"):
        lines.append(f"{key} {ruby_string(_join(base_dir, LAYOUT[key]))}")
    lines += [
        f"file_cache_path {ruby_string(_join(base_dir, LAYOUT['file_cache_path']))}",
        f"file_backup_path {ruby_string(_join(base_dir, LAYOUT['file_backup_path']))}",
    ]
    if json_attribs is not None:
        lines.append(f"json_attribs {ruby_string(json_attribs)}")
    lines.append(
        "log_location STDOUT"
        if log_location is None
        else f"log_location {ruby_string(log_location)}"
    )
    lines += [
        f"log_level :{log_level}",
        # Remote files and packages fetched by recipes are verified, whatever chef's default.
        "ssl_verify_mode :verify_peer",
        "verify_api_cert true",
    ]
    return "\n".join(lines) + "\n"


def parse_solo_rb(text: str) -> dict[str, SoloValue]:
    """Read back ``key 'value'`` / ``key "value"`` / ``key ['a', 'b']`` / ``key true`` /
    ``key :symbol`` / ``key CONSTANT`` lines without running Ruby; anything else is refused."""
    settings: dict[str, SoloValue] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            key, value = _parse_line(stripped)
        except SoloError as exc:
            raise SoloError(
                f"solo.rb line {number}: {exc}", "solo_parse_error", {"line": number}
            ) from exc
        settings[key] = value
    return settings


def _parse_line(line: str) -> tuple[str, SoloValue]:
    match = _KEY.match(line)
    if match is None or match.end() == len(line) or not line[match.end()].isspace():
        raise SoloError(f"expected 'key value', got {line!r}")
    key = match.group()
    rest = line[match.end() :].strip()
    value, end = _parse_value(rest, 0)
    tail = rest[end:].strip()
    if tail and not tail.startswith("#"):
        raise SoloError(f"unexpected {tail!r} after the value of {key}")
    return key, value


def _parse_value(text: str, pos: int) -> tuple[SoloValue, int]:
    if text.startswith(("'", '"'), pos):
        return _parse_string(text, pos)
    if text.startswith("[", pos):
        items: list[str] = []
        pos += 1
        while True:
            pos = _skip_spaces(text, pos)
            if text.startswith("]", pos):
                return items, pos + 1
            item, pos = _parse_string(text, pos)
            items.append(item)
            pos = _skip_spaces(text, pos)
            if text.startswith(",", pos):
                pos += 1
            elif not text.startswith("]", pos):
                raise SoloError("expected ',' or ']' in an array")
    match = _WORD.match(text, pos)
    if match is None:
        raise SoloError(f"unsupported value {text[pos:]!r}")
    word = match.group()
    literals: dict[str, SoloValue] = {"true": True, "false": False, "nil": None}
    return literals.get(word, word), match.end()


def _skip_spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


_DOUBLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "e": "\x1b", "s": " "}


def _parse_string(text: str, pos: int) -> tuple[str, int]:
    """A Ruby string literal at ``pos``; double-quoted ones must not interpolate."""
    if not text.startswith(("'", '"'), pos):
        raise SoloError(f"expected a string at {text[pos:]!r}")
    quote = text[pos]
    out: list[str] = []
    i = pos + 1
    while i < len(text):
        ch = text[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if quote == "'":
                # Ruby: only \\ and \' are escapes in single quotes; a lone backslash stays.
                out.append(nxt if nxt in "\\'" else "\\" + nxt)
            else:
                out.append(_DOUBLE_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        if quote == '"' and ch == "#" and text.startswith(("#{", "#$", "#@"), i):
            raise SoloError("string interpolation is not allowed")
        out.append(ch)
        i += 1
    raise SoloError("unterminated string")
