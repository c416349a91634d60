"""Cookbook metadata, read from metadata.json or statically from metadata.rb (no Ruby).

``metadata.rb`` is Ruby, but in practice it is a list of DSL calls with literal arguments. This
module tokenizes it and interprets only that subset: calls such as ``depends 'apt', '>= 1.9'``
(with or without parentheses), literal strings with their escapes, heredocs, comments, and the
``%w(ubuntu debian).each do |os| supports os end`` loop idiom. What it cannot read statically is
ignored when harmless (``long_description IO.read(...)``, ``attribute`` hashes, unknown calls) and
refused with ``MetadataError(code="metadata_unreadable")`` naming the file and line when it
matters (the cookbook's name, version, dependencies, supported platforms, Chef versions).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chef_bridge.versions import Constraint, CookbookError, Version, VersionError

log = logging.getLogger(__name__)

METADATA_JSON = "metadata.json"
METADATA_RB = "metadata.rb"


class MetadataError(CookbookError):
    """Metadata that is missing, malformed, or cannot be read without running Ruby."""

    code = "metadata_invalid"


@dataclass(frozen=True)
class CookbookMetadata:
    """What a cookbook declares about itself; ``dependencies`` maps cookbook name to constraint."""

    name: str
    version: Version
    dependencies: dict[str, Constraint] = field(default_factory=dict, hash=False)
    # Platform name -> constraint on the platform version ("ubuntu" -> ">= 18.04").
    supports: dict[str, Constraint] = field(default_factory=dict, hash=False)
    # Each entry is one ``chef_version`` line: RubyGems requirements joined by ", " that must all
    # hold; the entries are alternatives (Chef accepts the run if any entry matches).
    chef_version: tuple[str, ...] = ()
    description: str = ""
    source_file: str = ""
    maintainer: str = ""
    license: str = ""
    source_url: str = ""
    issues_url: str = ""
    recipes: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    # True when metadata has no ``name`` and the directory name was used instead. Chef only
    # tolerates that for old cookbooks (Chef 12+ needs a name), so callers may want to warn.
    name_from_directory: bool = False

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def read_metadata(cookbook_dir: Path) -> CookbookMetadata:
    """Read a cookbook's metadata, preferring metadata.json over metadata.rb."""
    cookbook_dir = Path(cookbook_dir)
    json_path = cookbook_dir / METADATA_JSON
    rb_path = cookbook_dir / METADATA_RB
    if json_path.is_file():
        return parse_metadata_json(_read_text(json_path), str(json_path), cookbook_dir.name)
    if rb_path.is_file():
        return parse_metadata_rb(_read_text(rb_path), str(rb_path), cookbook_dir.name)
    raise MetadataError(
        f"{cookbook_dir}: no metadata.json or metadata.rb",
        code="metadata_missing",
        details={"cookbook_dir": str(cookbook_dir)},
    )


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: some editors on Windows save metadata.rb with a byte order mark.
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path}: cannot read: {exc}", details={"file": str(path)}) from exc


# ---------------------------------------------------------------------------------------------
# metadata.json


def parse_metadata_json(text: str, source_file: str, default_name: str) -> CookbookMetadata:
    """Parse the contents of a metadata.json (as written by ``knife`` or the Supermarket)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(
            f"{source_file}:{exc.lineno}: invalid JSON: {exc.msg}",
            details={"file": source_file, "line": exc.lineno},
        ) from exc
    if not isinstance(data, dict):
        raise MetadataError(f"{source_file}: expected a JSON object", details={"file": source_file})

    def fail(key: str, problem: str) -> MetadataError:
        return MetadataError(
            f"{source_file}: {key}: {problem}", details={"file": source_file, "key": key}
        )

    def text_field(key: str) -> str:
        value = data.get(key)
        return value if isinstance(value, str) else ""

    name = data.get("name")
    name_from_directory = not name
    if name_from_directory:
        name = default_name
    if not isinstance(name, str):
        raise fail("name", f"expected a string, not {name!r}")

    raw_version = data.get("version") or "0.0.0"
    try:
        version = Version.parse(raw_version)
    except VersionError as exc:
        raise fail("version", str(exc)) from exc

    def constraints(key: str, platform: bool) -> dict[str, Constraint]:
        raw = data.get(key) or {}
        if not isinstance(raw, dict):
            raise fail(key, "expected an object")
        parsed: dict[str, Constraint] = {}
        for other, spec in raw.items():
            # Very old metadata stored constraints as arrays; Chef unwraps zero or one element.
            if isinstance(spec, list):
                if len(spec) > 1:
                    raise fail(key, f"{other}: only one version constraint is allowed: {spec}")
                spec = spec[0] if spec else None
            try:
                parsed[other] = Constraint.parse(spec, platform=platform)
            except VersionError as exc:
                raise fail(key, f"{other}: {exc}") from exc
        return parsed

    dependencies = constraints("dependencies", platform=False)
    _refuse_self_dependency(name, dependencies, source_file, None)
    chef_versions = data.get("chef_versions") or []
    if not isinstance(chef_versions, list):
        raise fail("chef_versions", "expected a list of lists")
    chef_version = tuple(
        ", ".join(str(r) for r in entry) if isinstance(entry, list) else str(entry)
        for entry in chef_versions
    )
    recipes = data.get("recipes") or {}
    return CookbookMetadata(
        name=name,
        version=version,
        dependencies=dependencies,
        supports=constraints("platforms", platform=True),
        chef_version=chef_version,
        description=text_field("description"),
        source_file=source_file,
        maintainer=text_field("maintainer"),
        license=text_field("license"),
        source_url=text_field("source_url"),
        issues_url=text_field("issues_url"),
        recipes={str(k): str(v) for k, v in recipes.items()} if isinstance(recipes, dict) else {},
        name_from_directory=name_from_directory,
    )


def _refuse_self_dependency(
    name: str, dependencies: dict[str, Constraint], source_file: str, line: int | None
) -> None:
    # Chef raises on a cookbook that depends on itself; so do we, rather than loop later.
    if name in dependencies:
        where = f"{source_file}:{line}" if line else source_file
        raise MetadataError(
            f"{where}: cookbook {name} depends on itself",
            details={"file": source_file, "line": line, "cookbook": name},
        )


# ---------------------------------------------------------------------------------------------
# metadata.rb: tokenizer

# Token kinds.
STR = "str"  # a string literal; ``dynamic`` when it interpolates #{...}
WORDS = "words"  # %w(...) / %i(...): value is the list of words
IDENT = "ident"
CONST = "const"
SYMBOL = "symbol"
LABEL = "label"  # ``key:`` in a hash argument
NUMBER = "number"
OP = "op"
NL = "nl"

_OPENERS = {"(": ")", "[": "]", "{": "}", "<": ">"}
_SIMPLE_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "0": "\0",
    "s": " ",
    "e": "\x1b",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
}
_BLOCK_KEYWORDS = frozenset(
    ("if", "unless", "while", "until", "case", "begin", "def", "class", "module", "for")
)
_MODIFIER_KEYWORDS = {"if", "unless", "while", "until", "rescue"}
_CONTINUATION_OPS = {",", "=>", ".", "&.", "+", "-", "*", "/", "||", "&&", "="}
_MULTI_CHAR_OPS = ("**", "=>", "==", "!=", ">=", "<=", "&&", "||", "::", "&.", "<<", "+=", "-=")


@dataclass
class Token:
    """One lexical token of metadata.rb."""

    kind: str
    value: Any
    line: int
    dynamic: bool = False


class _Lexer:
    def __init__(self, text: str, source_file: str):
        self.text = text
        self.source_file = source_file
        self.pos = 0
        self.line = 1
        self.tokens: list[Token] = []
        self.pending_heredocs: list[tuple[Token, str, bool, bool]] = []

    def error(self, problem: str, line: int | None = None) -> MetadataError:
        line = line or self.line
        return MetadataError(
            f"{self.source_file}:{line}: {problem}",
            code="metadata_unreadable",
            details={"file": self.source_file, "line": line},
        )

    def run(self) -> list[Token]:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            at_line_start = self.pos == 0 or text[self.pos - 1] == "\n"
            if at_line_start and text.startswith("=begin", self.pos):
                self._skip_block_comment()
            elif at_line_start and text.startswith("__END__", self.pos):
                break
            elif ch == "\n":
                self._newline()
            elif ch in " \t\r\f":
                self.pos += 1
            elif ch == "\\" and text.startswith("\\\n", self.pos):
                # An explicit line continuation.
                self.pos += 2
                self.line += 1
            elif ch == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end == -1 else end
            elif ch in "'\"":
                self.pos += 1
                self._string(ch, ch, interpolates=ch == '"')
            elif ch == "%" and self._percent_literal():
                pass
            elif ch == "<" and self._heredoc():
                pass
            elif ch == ":" and self._symbol():
                pass
            elif ch.isdigit():
                self._number()
            elif ch.isalpha() or ch == "_":
                self._word()
            else:
                self._operator()
        if self.pending_heredocs:
            raise self.error("unterminated heredoc", self.pending_heredocs[0][0].line)
        self.tokens.append(Token(NL, "\n", self.line))
        return self.tokens

    def _emit(self, kind: str, value: Any, line: int | None = None, dynamic: bool = False) -> Token:
        token = Token(kind, value, line or self.line, dynamic)
        self.tokens.append(token)
        return token

    def _newline(self) -> None:
        self._emit(NL, "\n")
        self.pos += 1
        self.line += 1
        for token, terminator, squiggly_or_dash, raw in self.pending_heredocs:
            self._heredoc_body(token, terminator, squiggly_or_dash, raw)
        self.pending_heredocs = []

    def _skip_block_comment(self) -> None:
        start_line = self.line
        while self.pos < len(self.text):
            end = self.text.find("\n", self.pos)
            line_text = self.text[self.pos : len(self.text) if end == -1 else end]
            self.pos = len(self.text) if end == -1 else end + 1
            self.line += 1
            if line_text.startswith("=end"):
                return
        raise self.error("unterminated =begin comment", start_line)

    def _string(self, opener: str, closer: str, interpolates: bool) -> None:
        """Read a string body up to ``closer``; ``self.pos`` is just after the opening quote."""
        line = self.line
        text = self.text
        out: list[str] = []
        dynamic = False
        depth = 0
        while True:
            if self.pos >= len(text):
                raise self.error("unterminated string", line)
            ch = text[self.pos]
            if ch == "\\":
                nxt = text[self.pos + 1 : self.pos + 2]
                self.pos += 2
                if nxt == "\n":
                    self.line += 1
                    if interpolates:
                        continue  # "\<newline>" joins lines inside double quotes
                    out.append("\\\n")
                elif not interpolates:
                    # Single quotes only know \\ and \' (and the delimiters of %q).
                    out.append(nxt if nxt in ("\\", closer, opener) else "\\" + nxt)
                elif nxt == "u":
                    out.append(self._unicode_escape())
                else:
                    out.append(_SIMPLE_ESCAPES.get(nxt, nxt))
                continue
            if interpolates and text.startswith("#{", self.pos):
                dynamic = True
                self._skip_interpolation()
                continue
            if ch == "\n":
                self.line += 1
            if opener != closer and ch == opener:
                depth += 1
            elif ch == closer:
                if depth == 0:
                    self.pos += 1
                    break
                depth -= 1
            out.append(ch)
            self.pos += 1
        self._emit(STR, "".join(out), line, dynamic)

    def _unicode_escape(self) -> str:
        """Decode ``\\uXXXX`` or ``\\u{X...}``; ``self.pos`` is just after the ``u``."""
        text = self.text
        if text.startswith("{", self.pos):
            end = text.find("}", self.pos)
            digits = text[self.pos + 1 : end] if end != -1 else ""
            self.pos = end + 1 if end != -1 else self.pos
            try:
                return "".join(chr(int(d, 16)) for d in digits.split())
            except ValueError as exc:
                raise self.error("invalid \\u{...} escape") from exc
        digits = text[self.pos : self.pos + 4]
        try:
            value = chr(int(digits, 16))
        except ValueError as exc:
            raise self.error("invalid \\u escape") from exc
        self.pos += 4
        return value

    def _skip_interpolation(self) -> None:
        depth = 0
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return
            elif ch == "\n":
                self.line += 1
        raise self.error("unterminated #{...} in a string")

    def _percent_literal(self) -> bool:
        text = self.text
        rest = text[self.pos + 1 : self.pos + 3]
        if rest[:1] in ("w", "W", "i", "I", "q", "Q") and rest[1:2] and not rest[1].isalnum():
            kind, opener = rest[0], rest[1]
            self.pos += 3
        elif rest[:1] in ("(", "[", "{", "<", "|", "!", "/"):
            kind, opener = "Q", rest[0]
            self.pos += 2
        else:
            return False
        closer = _OPENERS.get(opener, opener)
        if kind in ("q", "Q"):
            self._string(opener, closer, interpolates=kind == "Q")
            return True
        line = self.line
        end = text.find(closer, self.pos)
        if end == -1:
            raise self.error("unterminated %w() list", line)
        body = text[self.pos : end]
        self.line += body.count("\n")
        self.pos = end + 1
        dynamic = kind in ("W", "I") and "#{" in body
        self._emit(WORDS, body.split(), line, dynamic)
        return True

    def _heredoc(self) -> bool:
        text = self.text
        if not text.startswith("<<", self.pos):
            return False
        i = self.pos + 2
        indent = False
        if i < len(text) and text[i] in "-~":
            indent = True
            i += 1
        quote = text[i] if i < len(text) and text[i] in "'\"" else ""
        if quote:
            i += 1
        start = i
        while i < len(text) and (text[i].isalnum() or text[i] == "_"):
            i += 1
        if i == start or not text[start].isalpha() and text[start] != "_":
            return False
        terminator = text[start:i]
        if quote:
            if i >= len(text) or text[i] != quote:
                return False
            i += 1
        self.pos = i
        token = self._emit(STR, "")
        self.pending_heredocs.append((token, terminator, indent, quote == "'"))
        return True

    def _heredoc_body(self, token: Token, terminator: str, indent: bool, raw: bool) -> None:
        text = self.text
        lines: list[str] = []
        while self.pos < len(text):
            end = text.find("\n", self.pos)
            line_text = text[self.pos : len(text) if end == -1 else end]
            self.pos = len(text) if end == -1 else end + 1
            self.line += 1
            check = line_text.strip() if indent else line_text.rstrip("\r")
            if check == terminator:
                token.value = "\n".join(lines) + ("\n" if lines else "")
                token.dynamic = not raw and "#{" in token.value
                return
            lines.append(line_text)
        raise self.error(f"heredoc not terminated by {terminator}", token.line)

    def _symbol(self) -> bool:
        text = self.text
        nxt = text[self.pos + 1 : self.pos + 2]
        if nxt == ":":
            return False  # "::" is an operator
        if nxt in ("'", '"'):
            self.pos += 2
            self._string(nxt, nxt, interpolates=nxt == '"')
            self.tokens[-1].kind = SYMBOL
            return True
        if not (nxt.isalpha() or nxt == "_"):
            return False
        i = self.pos + 1
        while i < len(text) and (text[i].isalnum() or text[i] in "_?!"):
            i += 1
        self._emit(SYMBOL, text[self.pos + 1 : i])
        self.pos = i
        return True

    def _number(self) -> None:
        text = self.text
        i = self.pos
        while i < len(text) and (text[i].isalnum() or text[i] == "_" or text[i] == "."):
            # "1.each" is not a number followed by ".each" in metadata; keep it simple.
            i += 1
        self._emit(NUMBER, text[self.pos : i])
        self.pos = i

    def _word(self) -> None:
        text = self.text
        i = self.pos
        while i < len(text) and (text[i].isalnum() or text[i] == "_"):
            i += 1
        if i < len(text) and text[i] in "?!" and text[i + 1 : i + 2] != "=":
            i += 1
        word = text[self.pos : i]
        # ``key: value`` (but not ``Foo::Bar``) is a hash label.
        if text[i : i + 1] == ":" and text[i + 1 : i + 2] != ":":
            self._emit(LABEL, word)
            self.pos = i + 1
            return
        self._emit(CONST if word[0].isupper() else IDENT, word)
        self.pos = i

    def _operator(self) -> None:
        for op in _MULTI_CHAR_OPS:
            if self.text.startswith(op, self.pos):
                self._emit(OP, op)
                self.pos += len(op)
                return
        self._emit(OP, self.text[self.pos])
        self.pos += 1


def tokenize(text: str, source_file: str = METADATA_RB) -> list[Token]:
    """Split metadata.rb source into tokens (newlines kept: they end statements)."""
    return _Lexer(text, source_file).run()


# ---------------------------------------------------------------------------------------------
# metadata.rb: statements


def _is_block_open(tokens: Sequence[Token], i: int) -> bool:
    token = tokens[i]
    if token.kind != IDENT:
        return False
    if token.value == "do":
        return True
    if token.value in _BLOCK_KEYWORDS:
        # ``depends 'x' if foo`` is a modifier, not a block: only a keyword that starts a
        # statement (or follows an assignment) opens one.
        prev = tokens[i - 1] if i > 0 else None
        return prev is None or prev.kind == NL or (prev.kind == OP and prev.value in ("=", ";"))
    return False


def split_statements(tokens: Sequence[Token]) -> Iterator[list[Token]]:
    """Group tokens into top-level statements; blocks and brackets keep a statement open."""
    current: list[Token] = []
    depth = 0
    for i, token in enumerate(tokens):
        if token.kind == OP and token.value in ("(", "[", "{"):
            depth += 1
        elif token.kind == OP and token.value in (")", "]", "}"):
            depth -= 1
        elif _is_block_open(tokens, i):
            depth += 1
        elif token.kind == IDENT and token.value == "end":
            depth -= 1
        if (token.kind == NL or (token.kind == OP and token.value == ";")) and depth <= 0:
            if current and not _continues(current, tokens, i):
                yield current
                current = []
            continue
        current.append(token)
    if current:
        yield current


def _continues(current: list[Token], tokens: Sequence[Token], i: int) -> bool:
    last = current[-1]
    if last.kind == OP and last.value in _CONTINUATION_OPS and tokens[i].kind == NL:
        return True
    # A method chain may continue on the next line with a leading dot.
    for nxt in tokens[i + 1 :]:
        if nxt.kind == NL:
            continue
        return nxt.kind == OP and nxt.value in (".", "&.")
    return False


# Calls whose arguments must be read exactly; anything dynamic in them is an error.
_DECLARATIONS = {"name", "version", "depends", "supports", "chef_version"}


class _Unreadable:
    """An argument that only Ruby could evaluate."""

    def __init__(self, tokens: Sequence[Token]):
        self.tokens = tokens


class _Hash:
    """Keyword or hash arguments (``:display_name => 'x'``), which nothing here needs."""


Arg = str | list[str] | _Hash | _Unreadable


@dataclass
class _Reader:
    source_file: str
    lines: list[str]
    name: str | None = None
    name_line: int | None = None
    version: Version | None = None
    dependencies: dict[str, Constraint] = field(default_factory=dict)
    dependency_lines: dict[str, int] = field(default_factory=dict)
    supports: dict[str, Constraint] = field(default_factory=dict)
    chef_version: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    recipes: dict[str, str] = field(default_factory=dict)

    def unreadable(self, line: int, why: str) -> MetadataError:
        source = self.lines[line - 1].strip() if 0 < line <= len(self.lines) else ""
        return MetadataError(
            f"{self.source_file}:{line}: {why}: `{source}` cannot be read without running Ruby",
            code="metadata_unreadable",
            details={"file": self.source_file, "line": line, "source": source},
        )

    def invalid(self, line: int, problem: str) -> MetadataError:
        return MetadataError(
            f"{self.source_file}:{line}: {problem}",
            details={"file": self.source_file, "line": line},
        )

    def run(self, tokens: Sequence[Token], env: dict[str, str]) -> None:
        for statement in split_statements(tokens):
            self.statement(statement, env)

    def statement(self, tokens: list[Token], env: dict[str, str]) -> None:
        first = tokens[0]
        if self._loop(tokens, env):
            return
        if first.kind == IDENT and not _is_block_open(tokens, 0):
            if len(tokens) > 1 and tokens[1].kind == OP and tokens[1].value in ("=", "+=", "||"):
                self._assignment(tokens, env)
                return
            self.call(first.value, tokens[1:], first.line, env)
            return
        # Anything else (a conditional, a constant, a method chain): harmless unless it hides a
        # declaration, which we could not evaluate without knowing the condition.
        self._refuse_hidden_declarations(tokens)

    def _refuse_hidden_declarations(self, tokens: Sequence[Token]) -> None:
        for i, token in enumerate(tokens):
            if token.kind != IDENT or token.value not in _DECLARATIONS:
                continue
            prev = tokens[i - 1] if i > 0 else None
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            in_command_position = (
                prev is None
                or prev.kind == NL
                or (prev.kind == IDENT and prev.value in ("then", "else", "do", "begin"))
                or (prev.kind == OP and prev.value in (";", "{", "|"))
            )
            is_assignment = nxt is not None and nxt.kind == OP and nxt.value == "="
            if in_command_position and not is_assignment:
                raise self.unreadable(token.line, f"'{token.value}' inside Ruby control flow")

    def _assignment(self, tokens: list[Token], env: dict[str, str]) -> None:
        # ``os_list = 'ubuntu'`` binds a literal; anything else binds nothing, so using the
        # variable later in a declaration is reported as unreadable.
        target = tokens[0].value
        value = tokens[2:]
        env.pop(target, None)
        if (
            tokens[1].value == "="
            and len(value) == 1
            and value[0].kind == STR
            and not value[0].dynamic
        ):
            env[target] = value[0].value
        self._refuse_hidden_declarations(value)

    def _loop(self, tokens: list[Token], env: dict[str, str]) -> bool:
        """Expand ``%w(a b).each do |x| ... end`` and ``['a', 'b'].each { |x| ... }``."""
        items, i = self._literal_list(tokens, 0, env)
        if items is None:
            return False
        if not (
            i + 3 < len(tokens)
            and tokens[i].kind == OP
            and tokens[i].value == "."
            and tokens[i + 1].kind == IDENT
            and tokens[i + 1].value == "each"
        ):
            self._refuse_hidden_declarations(tokens)
            return True
        opener = tokens[i + 2]
        closer_value = "end" if opener.value == "do" else "}"
        closer = tokens[-1]
        has_param = (
            i + 5 < len(tokens)
            and tokens[i + 3].kind == OP
            and tokens[i + 3].value == "|"
            and tokens[i + 4].kind == IDENT
            and tokens[i + 5].kind == OP
            and tokens[i + 5].value == "|"
        )
        if opener.value not in ("do", "{") or closer.value != closer_value or not has_param:
            self._refuse_hidden_declarations(tokens)
            return True
        variable = tokens[i + 4].value
        body = [*tokens[i + 6 : -1], Token(NL, "\n", closer.line)]
        for item in items:
            self.run(body, {**env, variable: item})
        return True

    def _literal_list(
        self, tokens: Sequence[Token], i: int, env: dict[str, str]
    ) -> tuple[list[str] | None, int]:
        token = tokens[i]
        if token.kind == WORDS and not token.dynamic:
            return list(token.value), i + 1
        if not (token.kind == OP and token.value == "["):
            return None, i
        items: list[str] = []
        j = i + 1
        while j < len(tokens):
            t = tokens[j]
            if t.kind == OP and t.value == "]":
                return items, j + 1
            if t.kind == STR and not t.dynamic:
                items.append(t.value)
            elif not (t.kind == OP and t.value == "," or t.kind == NL):
                return None, i
            j += 1
        return None, i

    def arguments(self, tokens: list[Token], env: dict[str, str]) -> list[Arg]:
        """Split call arguments on top-level commas and evaluate the literal ones."""
        tokens = [t for t in tokens if t.kind != NL]
        if tokens and tokens[0].kind == OP and tokens[0].value == "(":
            if _matching_close(tokens, 0) == len(tokens) - 1:
                tokens = tokens[1:-1]
        groups: list[list[Token]] = [[]]
        depth = 0
        for token in tokens:
            if token.kind == OP and token.value in ("(", "[", "{"):
                depth += 1
            elif token.kind == OP and token.value in (")", "]", "}"):
                depth -= 1
            if depth == 0 and token.kind == OP and token.value == ",":
                groups.append([])
            else:
                groups[-1].append(token)
        if groups == [[]]:
            return []
        return [self._argument(group, env) for group in groups]

    def _argument(self, group: list[Token], env: dict[str, str]) -> Arg:
        if not group:
            return _Unreadable(group)
        if group[0].kind == LABEL or any(t.kind == OP and t.value == "=>" for t in group):
            return _Hash()
        if all(t.kind == STR for t in group):
            # Adjacent literals concatenate in Ruby: 'a' 'b' == 'ab'.
            if any(t.dynamic for t in group):
                return _Unreadable(group)
            return "".join(t.value for t in group)
        if len(group) == 1 and group[0].kind == SYMBOL and not group[0].dynamic:
            return str(group[0].value)
        if len(group) == 1 and group[0].kind == IDENT and group[0].value in env:
            return env[group[0].value]
        items, end = self._literal_list(group, 0, env)
        if items is not None and end == len(group):
            return items
        return _Unreadable(group)

    def call(self, method: str, rest: list[Token], line: int, env: dict[str, str]) -> None:
        at = next(
            (i for i, t in enumerate(rest) if t.kind == IDENT and t.value in _MODIFIER_KEYWORDS),
            None,
        )
        modifier = rest[at] if at is not None else None
        if at is not None and _is_respond_to_guard(rest[at:]):
            # ``chef_version '>= 12' if respond_to?(:chef_version)`` kept metadata loadable on
            # old Chef; every Chef we drive responds to these methods, so the guard is true.
            rest, modifier = rest[:at], None
        if method not in _DECLARATIONS:
            if modifier is None and any(_is_block_open(rest, i) for i in range(len(rest))):
                self._refuse_hidden_declarations(rest)
            self._harmless(method, self.arguments(rest, env) if modifier is None else [])
            return
        if modifier is not None:
            raise self.unreadable(line, f"'{method}' with a '{modifier.value}' modifier")
        args = self.arguments(rest, env)
        strings: list[str] = []
        for arg in args:
            if isinstance(arg, _Unreadable):
                where = arg.tokens[0].line if arg.tokens else line
                raise self.unreadable(where, f"'{method}' with a computed argument")
            if not isinstance(arg, str):
                raise self.unreadable(line, f"'{method}' with an unexpected argument")
            strings.append(arg)
        getattr(self, f"_declare_{method}")(strings, line)

    def _declare_name(self, args: list[str], line: int) -> None:
        if len(args) != 1 or not args[0]:
            raise self.invalid(line, "name takes one non-empty string")
        self.name, self.name_line = args[0], line

    def _declare_version(self, args: list[str], line: int) -> None:
        if len(args) != 1:
            raise self.invalid(line, "version takes one string")
        try:
            self.version = Version.parse(args[0])
        except VersionError as exc:
            raise self.invalid(line, str(exc)) from exc

    def _declare_depends(self, args: list[str], line: int) -> None:
        if not 1 <= len(args) <= 2:
            # Chef refuses more than one constraint per dependency.
            raise self.invalid(line, "depends takes a cookbook name and at most one constraint")
        try:
            constraint = Constraint.parse(args[1] if len(args) == 2 else None)
        except VersionError as exc:
            raise self.invalid(line, f"depends '{args[0]}': {exc}") from exc
        # A repeated ``depends`` replaces the earlier one, as in Chef.
        self.dependencies[args[0]] = constraint
        self.dependency_lines[args[0]] = line

    def _declare_supports(self, args: list[str], line: int) -> None:
        if not 1 <= len(args) <= 2:
            raise self.invalid(line, "supports takes a platform and at most one constraint")
        try:
            constraint = Constraint.parse(args[1] if len(args) == 2 else None, platform=True)
        except VersionError as exc:
            raise self.invalid(line, f"supports '{args[0]}': {exc}") from exc
        self.supports[args[0]] = constraint

    def _declare_chef_version(self, args: list[str], line: int) -> None:
        if not args:
            raise self.invalid(line, "chef_version takes at least one requirement")
        self.chef_version.append(", ".join(args))

    def _harmless(self, method: str, args: list[Arg]) -> None:
        if method in ("description", "maintainer", "license", "source_url", "issues_url"):
            if len(args) == 1 and isinstance(args[0], str):
                self.texts[method] = args[0]
            else:
                log.debug("metadata %s: ignoring computed %s", self.source_file, method)
        elif method == "recipe" and args and isinstance(args[0], str):
            description = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            self.recipes[args[0]] = description
        # Everything else (long_description, attribute, provides, gem, privacy, ohai_version,
        # grouping, recommends, suggests, ...) changes nothing we decide.

    def result(self, default_name: str) -> CookbookMetadata:
        name = self.name or default_name
        if self.name is None:
            log.info(
                "metadata %s: no name, using the directory name %s (old-style cookbook)",
                self.source_file,
                default_name,
            )
        line = self.dependency_lines.get(name)
        _refuse_self_dependency(name, self.dependencies, self.source_file, line)
        return CookbookMetadata(
            name=name,
            version=self.version or Version(0, 0, 0),
            dependencies=dict(self.dependencies),
            supports=dict(self.supports),
            chef_version=tuple(self.chef_version),
            description=self.texts.get("description", ""),
            source_file=self.source_file,
            maintainer=self.texts.get("maintainer", ""),
            license=self.texts.get("license", ""),
            source_url=self.texts.get("source_url", ""),
            issues_url=self.texts.get("issues_url", ""),
            recipes=dict(self.recipes),
            name_from_directory=self.name is None,
        )


def _is_respond_to_guard(tokens: Sequence[Token]) -> bool:
    """Whether ``tokens`` is exactly ``if respond_to?(:sym)`` or ``if respond_to? :sym``."""
    shape = [(t.kind, t.value if t.kind != SYMBOL else ":") for t in tokens if t.kind != NL]
    guard = [(IDENT, "if"), (IDENT, "respond_to?")]
    return shape in (
        [*guard, (OP, "("), (SYMBOL, ":"), (OP, ")")],
        [*guard, (SYMBOL, ":")],
    )


def _matching_close(tokens: Sequence[Token], i: int) -> int:
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j].kind == OP and tokens[j].value in ("(", "[", "{"):
            depth += 1
        elif tokens[j].kind == OP and tokens[j].value in (")", "]", "}"):
            depth -= 1
            if depth == 0:
                return j
    return -1


def parse_metadata_rb(text: str, source_file: str, default_name: str) -> CookbookMetadata:
    """Read metadata.rb source statically; ``default_name`` is used when it has no ``name``."""
    reader = _Reader(source_file=source_file, lines=text.splitlines())
    reader.run(tokenize(text, source_file), {})
    return reader.result(default_name)
