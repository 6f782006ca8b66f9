"""One manual page as Markdown: mandoc renders it, this module writes the Markdown.

`mandoc -T markdown` handles only mdoc(7) input (10 of the ~1,900 pages here; the Linux man-pages and the
Chinese pages are man(7)) and writes every non-ASCII character as an HTML entity, so Chinese text would not be
text at all. mandoc's HTML output handles both macro sets and tbl(7), so the page is rendered with
`mandoc -T html -O fragment` and its few element kinds are written as Markdown here: sections become `##`,
subsections `###`, bold and italic stay, tagged lists (options) become list items, tables stay tables and
preformatted text becomes a code block. The page's name and section head the file as its title (`# ls(1)`).
"""

from __future__ import annotations

import gzip
import re
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

# Elements that end a line of text and start a new block.
_BLOCKS = {"p", "div", "section", "dl", "dt", "dd", "ul", "ol", "li", "table", "tr", "pre", "h1", "h2", "h3"}
_VOID = {"br", "hr", "img", "wbr"}


@dataclass
class Node:
    """An HTML element (or text, when `tag` is empty) from mandoc's output."""

    tag: str
    classes: tuple[str, ...] = ()
    text: str = ""
    children: list[Node] = field(default_factory=list)


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("root")
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = tuple((dict(attrs).get("class") or "").split())
        node = Node(tag, classes)
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(Node("", text=data))


def _inline(node: Node, pre: bool = False) -> str:
    """The text of `node` with bold and italic marks; whitespace collapsed unless inside <pre>."""
    if not node.tag:
        return node.text if pre else re.sub(r"\s+", " ", node.text)
    if node.tag == "br":
        return "\n"
    inner = "".join(_inline(child, pre) for child in node.children)
    if pre or not inner.strip():
        return inner
    mark = {"b": "**", "strong": "**", "i": "*", "em": "*"}.get(node.tag)
    if mark:
        lead, core, trail = re.match(r"(\s*)(.*?)(\s*)$", inner, re.DOTALL).groups()  # type: ignore[union-attr]
        return f"{lead}{mark}{core}{mark}{trail}"
    return inner


def _lines(text: str) -> str:
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _blocks(node: Node) -> list[str]:
    """Markdown blocks (paragraphs, headings, lists, tables, code) for the children of `node`."""
    blocks: list[str] = []
    run: list[str] = []

    def flush() -> None:
        text = _lines("".join(run))
        if text:
            blocks.append(text)
        run.clear()

    for child in node.children:
        if not child.tag or child.tag not in _BLOCKS:
            run.append(_inline(child))
            continue
        flush()
        blocks.extend(_block(child))
    flush()
    return blocks


def _block(node: Node) -> list[str]:
    if node.tag == "table" and ("head" in node.classes or "foot" in node.classes):
        return []  # the page header and footer lines repeat the title and the date
    if node.tag == "h1":
        return [f"## {_lines(_inline(node))}"]
    if node.tag in ("h2", "h3"):
        return [f"### {_lines(_inline(node))}"]
    if node.tag == "pre":
        code = "".join(_inline(child, pre=True) for child in node.children)
        code = re.sub(r"\n(?:[ \t]*\n)+", "\n", code).strip("\n")  # mandoc ends each line with <br/> too
        return [f"```\n{code}\n```"] if code.strip() else []
    if node.tag == "dl":
        return _definition_list(node)
    if node.tag in ("ul", "ol"):
        items = [child for child in node.children if child.tag == "li"]
        return [_item("-" if node.tag == "ul" else f"{n}.", _blocks(li)) for n, li in enumerate(items, 1)]
    if node.tag == "table":
        return _table(node)
    return _blocks(node)


def _item(marker: str, blocks: list[str]) -> str:
    """A list item holding `blocks`, continuation lines indented under the marker."""
    pad = " " * (len(marker) + 1)
    lines = "\n\n".join(blocks).splitlines() or [""]
    return "\n".join([f"{marker} {lines[0]}", *(pad + line if line else "" for line in lines[1:])]).rstrip()


def _definition_list(node: Node) -> list[str]:
    items: list[str] = []
    term: str | None = None
    for child in node.children:
        if child.tag == "dt":
            if term is not None:
                items.append(_item("-", [term]))
            term = _lines(_inline(child)).replace("\n", " ")
        elif child.tag == "dd":
            items.append(_item("-", [term or "", *_blocks(child)] if term else _blocks(child)))
            term = None
    if term is not None:
        items.append(_item("-", [term]))
    return items


def _table(node: Node) -> list[str]:
    rows: list[list[str]] = []

    def collect(parent: Node) -> None:
        for child in parent.children:
            if child.tag == "tr":
                cells = [c for c in child.children if c.tag in ("td", "th")]
                rows.append([" ".join(_lines(_inline(c)).split()).replace("|", "\\|") for c in cells])
            elif child.tag in ("tbody", "thead", "tfoot"):
                collect(child)

    collect(node)
    rows = [row for row in rows if any(row)]
    if not rows:
        return []
    width = max(len(row) for row in rows)
    rows = [row + [""] * (width - len(row)) for row in rows]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * width]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return ["\n".join(lines)]


def html_to_markdown(html: str, title: str) -> str:
    """Markdown for one page rendered by `mandoc -T html -O fragment`, headed by `title`."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return f"# {title}\n\n" + "\n\n".join(_blocks(builder.root)) + "\n"


def is_link_page(path: Path) -> bool:
    """True for a page that only points at another (`.so other.3`) or is a symlink to one."""
    if path.is_symlink():
        return True
    text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace") if path.suffix == ".gz" else path.read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(('.\\"', "'\\\""))]
    return len(lines) <= 2 and any(line.startswith(".so ") for line in lines)


def page_title(path: Path) -> str:
    """`ls(1)` for `.../man1/ls.1.gz`."""
    name = path.name.removesuffix(".gz")
    stem, _, section = name.rpartition(".")
    return f"{stem}({section})"


def convert(path: Path) -> str:
    """The Markdown of the manual page at `path` (compressed or not)."""
    result = subprocess.run(
        ["mandoc", "-K", "utf-8", "-T", "html", "-O", "fragment", str(path)],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if result.returncode > 3:  # 2-3 are warnings and errors mandoc recovered from; 4 and above mean no output
        raise RuntimeError(f"mandoc failed on {path}: {result.stderr.decode(errors='replace').strip()}")
    return html_to_markdown(result.stdout.decode("utf-8"), page_title(path))
