"""Markdown documents: YAML frontmatter, titles, and sections split on headings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from markdown_it import MarkdownIt

_FRONTMATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*(?:\r?\n|\Z)", re.DOTALL | re.MULTILINE)
# Sections are cut at these heading levels; deeper headings stay inside their section.
SECTION_LEVEL = 2
# libyaml's parser is ~20x faster than the pure-Python one (half the cost of importing a folder otherwise).
YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class FrontmatterError(ValueError):
    """The frontmatter block is not valid YAML or not a mapping."""


@dataclass(frozen=True)
class Section:
    """A slice of a document's body under one heading (the text before the first heading has heading '')."""

    heading: str
    level: int
    start: int
    end: int


# Frontmatter of plain `key: word words` and `key: [a, b]` lines (most of it) is read without YAML: even libyaml
# spends ~0.15 ms a file building objects in Python. Anything else (quotes, colons, numbers, booleans, nesting)
# goes to YAML, so the result is always what YAML would say.
_PLAIN = r"[^\s:#'\"\[\]{},&*!|>%@`-][^:#'\"\[\]{},&*!|>%@`]*"
_SIMPLE_LINE = re.compile(
    rf"^([A-Za-z_][\w-]*):[ \t]+(?:({_PLAIN})|\[[ \t]*((?:{_PLAIN})(?:,[ \t]*{_PLAIN})*)?[ \t]*\])[ \t]*$"
)
_YAML_SPECIAL = re.compile(r"^(?:true|false|yes|no|on|off|null|~|[-+.\d].*)$", re.IGNORECASE)


def _simple_frontmatter(block: str) -> dict[str, Any] | None:
    data: dict[str, Any] = {}
    for line in block.splitlines():
        match = _SIMPLE_LINE.match(line)
        if match is None:
            return None
        key, scalar, items = match.groups()
        values = [scalar.strip()] if scalar is not None else [v.strip() for v in (items or "").split(",") if v.strip()]
        if key in data or any(_YAML_SPECIAL.match(v) for v in values):
            return None
        data[key] = values[0] if scalar is not None else values
    return data


def split_frontmatter(text: str) -> tuple[dict[str, Any], str]:
    """Return (frontmatter mapping, body). A document without frontmatter gets an empty mapping."""
    match = _FRONTMATTER.match(text)
    if not match:
        return {}, text
    simple = _simple_frontmatter(match.group(1))
    if simple is not None:
        return simple, text[match.end() :]
    try:
        data = yaml.load(match.group(1), Loader=YamlLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 2}" if mark else ""
        raise FrontmatterError(f"invalid YAML frontmatter{where}: {getattr(exc, 'problem', None) or exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FrontmatterError(f"frontmatter must be a mapping of fields, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}, text[match.end() :]


# Headings are found by CommonMark's rules. Most documents need only a fast line scan: their headings and fences
# start at column 0 and they hold none of the constructs that make a line's meaning depend on the lines around it
# (list items, block quotes, HTML blocks, setext underlines). A document with one of those goes to markdown-it-py, a
# CommonMark parser ~10x slower than the scan (0.3 ms for a 600-word document), imported only then. Both give the
# same answer: tests/test_markdown.py checks the scan against the parser.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_ATX = re.compile(r"(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
_ATX_CLOSING = re.compile(r"(?:^|[ \t]+)#+$")
# An opening fence: three or more backticks or tildes; a backtick fence's info string holds no backtick.
_OPENING_FENCE = re.compile(r"(`{3,})[^`]*$|(~{3,})")
_HTML_START = re.compile(r"<[A-Za-z/!?]")
_UNDERLINE = re.compile(r"(?:=+|-+)[ \t]*$")
_CONTAINER = re.compile(r"(?:>|[-+*](?:[ \t]|$)|\d{1,9}[.)](?:[ \t]|$))")


def _line_starts(body: str) -> list[int]:
    """The offset of each line, split where CommonMark splits lines (\\n, \\r\\n or \\r, not str.splitlines' rules)."""
    return [0, *(match.end() for match in _LINE_BREAK.finditer(body))]


def _lines(body: str) -> list[tuple[int, str]]:
    """(offset, text without its ending) of each line."""
    if "\r" in body:
        return list(zip(_line_starts(body), _LINE_BREAK.split(body), strict=True))
    lines = body.split("\n")
    starts = [0] * len(lines)
    for i in range(1, len(lines)):
        starts[i] = starts[i - 1] + len(lines[i - 1]) + 1
    return list(zip(starts, lines, strict=True))


def _atx_text(line: str) -> tuple[int, str] | None:
    match = _ATX.match(line)
    if match is None:
        return None
    return len(match.group(1)), _ATX_CLOSING.sub("", (match.group(2) or "").strip()).strip()


def _needs_parser(text: str, previous: str) -> bool:
    """Whether this line (outside a fence) can mean something only the lines around it decide."""
    stripped = text.lstrip(" ")
    if not stripped:
        return False
    if len(text) - len(stripped) > 0:
        # An indented heading or fence belongs to a list item or not, depending on the lines above.
        return len(text) - len(stripped) <= 3 and (stripped[0] in "#`~<=-" or "```" in text or "~~~" in text)
    if text[0] in "=-" and previous.strip() and _UNDERLINE.match(text):
        return True  # a setext heading's underline, or a thematic break
    if _CONTAINER.match(text):
        return "```" in text or "~~~" in text  # a fence inside a list item or block quote
    return text[0] == "<" and _HTML_START.match(text) is not None  # an HTML block: its lines are not Markdown


def _scan_headings(body: str) -> list[tuple[int, int, str]] | None:
    """The fast path: top-level headings when every heading and fence starts at column 0; None when the document
    needs the parser."""
    found: list[tuple[int, int, str]] = []
    fence: str | None = None  # the opening fence's marker while inside a fenced code block
    previous = ""
    for line_start, text in _lines(body):
        if fence is not None:
            # A closing fence uses the opening's character, is at least as long, and has no info string.
            if text.startswith(fence) and not text.lstrip(fence[0]).strip(" \t"):
                fence = None
            elif text[:1] == " " and text.lstrip(" ")[:3] in ("```", "~~~"):
                return None  # an indented closing fence
            continue
        first = text[:1]
        if first == "#":
            heading = _atx_text(text)
            if heading is not None and heading[1]:
                found.append((line_start, heading[0], heading[1]))
        elif first in ("`", "~") and (opening := _OPENING_FENCE.match(text)) is not None:
            fence = opening.group(1) or opening.group(2)
        elif first and _needs_parser(text, previous):
            return None
        previous = text
    return found


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    # Imported here: 0.1 s, paid only when a document needs the parser. Inline parsing is off: headings are kept as
    # written, markup included, as the scan keeps them.
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").disable(["inline", "text_join"], ignoreInvalid=True)


def _parse_headings(body: str) -> list[tuple[int, int, str]]:
    """The full CommonMark parse: top-level headings (ATX and setext), not those inside lists or quotes."""
    tokens = _parser().parse(body)
    starts = _line_starts(body)
    found: list[tuple[int, int, str]] = []
    for token, following in zip(tokens, tokens[1:], strict=False):
        if token.type == "heading_open" and token.level == 0 and token.map is not None:
            text = following.content.strip()
            if text:
                found.append((starts[token.map[0]], int(token.tag[1]), text))
    return found


@lru_cache(maxsize=16)
def _headings_cached(body: str) -> tuple[tuple[int, int, str], ...]:
    headings = _scan_headings(body)
    return tuple(_parse_headings(body) if headings is None else headings)


def _headings(body: str) -> list[tuple[int, int, str]]:
    """(offset, level, text) of every top-level heading with text, by CommonMark's rules (fenced, indented and
    HTML blocks hold no headings; a closing fence is at least as long as its opening and has no info string)."""
    return list(_headings_cached(body))


def headings(body: str) -> list[tuple[int, int, str]]:
    """(offset, level, text) of every heading, for callers that rewrite them (context packing nests them)."""
    return _headings(body)


def first_heading(body: str) -> str | None:
    """The text of the first heading, used as a title when frontmatter has none."""
    headings = _headings(body)
    return headings[0][2] if headings else None


def heading_texts(body: str) -> list[str]:
    """All heading texts, for the index's headings column."""
    return [text for _, _, text in _headings(body)]


def sections(body: str) -> list[Section]:
    """Cut `body` at level-1 and level-2 headings. Empty slices are dropped."""
    cuts = [(offset, level, text) for offset, level, text in _headings(body) if level <= SECTION_LEVEL]
    result: list[Section] = []
    starts = [(0, 0, "")] + cuts
    for i, (start, level, heading) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(body)
        if body[start:end].strip():
            result.append(Section(heading=heading, level=level, start=start, end=end))
    return result
