"""Markdown documents: YAML frontmatter, titles, and sections split on headings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

_FRONTMATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*(?:\r?\n|\Z)", re.DOTALL | re.MULTILINE)
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})")
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


def _headings(body: str) -> list[tuple[int, int, str]]:
    """(offset, level, text) of every ATX heading outside fenced code blocks."""
    found: list[tuple[int, int, str]] = []
    fence: str | None = None
    offset = 0
    for line in body.splitlines(keepends=True):
        fence_match = _FENCE.match(line)
        if fence_match:
            marker = fence_match.group(1)
            if fence is None:
                fence = marker[0] * 3
            elif marker.startswith(fence):
                fence = None
        elif fence is None:
            heading = _HEADING.match(line.rstrip("\r\n"))
            if heading:
                found.append((offset, len(heading.group(1)), heading.group(2).strip()))
        offset += len(line)
    return found


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
