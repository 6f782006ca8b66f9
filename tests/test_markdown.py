"""Headings and sections follow CommonMark: code blocks hold no headings, however their fences are written."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sage_server.markdown import _parse_headings, _scan_headings, heading_texts, sections, split_frontmatter
from sage_server.resources import knowledge_dir


def cut_at(body: str) -> list[str]:
    """The section headings a document is cut at (the preamble is '')."""
    return [s.heading for s in sections(body)]


def test_a_shorter_fence_does_not_close_a_longer_one() -> None:
    body = (
        "# Guide\n\nIntro.\n\n## Example\n\n"
        "````markdown\n## Install\n\n```bash\n# install the tool\npip install x\n```\n\n## Use it\n````\n\n"
        "## After the example\n\nMore.\n"
    )
    assert cut_at(body) == ["Guide", "Example", "After the example"]
    assert heading_texts(body) == ["Guide", "Example", "After the example"]


def test_a_fence_with_an_info_string_does_not_close_one() -> None:
    body = "## One\n\n```\ncode\n```python\n# still code\n```\n\n## Two\n"
    assert cut_at(body) == ["One", "Two"]


def test_tilde_and_backtick_fences_do_not_close_each_other() -> None:
    body = "## A\n\n~~~\n```\n# in tildes\n```\n~~~\n\n## B\n\n```\n~~~\n# in backticks\n~~~\n```\n\n## C\n"
    assert cut_at(body) == ["A", "B", "C"]


def test_a_backtick_run_with_backticks_after_it_is_inline_code_not_a_fence() -> None:
    body = "## A\n\n```not a fence``` in a sentence\n\n## B\n"
    assert cut_at(body) == ["A", "B"]


def test_an_unclosed_fence_runs_to_the_end() -> None:
    body = "## Before\n\n```\n## inside the open block\n"
    assert cut_at(body) == ["Before"]


def test_indented_code_holds_no_headings_and_up_to_three_spaces_is_still_a_heading() -> None:
    body = "## A\n\n    # a comment in indented code\n\n\t# also code\n\n   ## Indented heading\n\ntext\n"
    assert cut_at(body) == ["A", "Indented heading"]


def test_fences_inside_list_items_and_quotes_hide_their_content() -> None:
    body = "## Steps\n\n1. Run:\n\n   ```bash\n   # not a heading\n   ```\n\n- ```python\n  # nor this\n  ```\n\n"
    body += "> ```\n> # nor this\n> ```\n\n## Next\n"
    assert cut_at(body) == ["Steps", "Next"]


def test_headings_inside_quotes_and_lists_do_not_cut_sections() -> None:
    body = "## Top\n\n> # Quoted\n\n- # In a list\n\n## Next\n"
    assert cut_at(body) == ["Top", "Next"]


def test_atx_closing_sequences_and_setext_headings() -> None:
    body = "# C#\n\n## Title ##\n\nUnderlined\n==========\n\nAlso underlined\n---\n\ntext\n"
    assert heading_texts(body) == ["C#", "Title", "Underlined", "Also underlined"]
    assert cut_at(body) == ["C#", "Title", "Underlined", "Also underlined"]


def test_html_blocks_hold_no_headings() -> None:
    body = "## A\n\n<details>\n# not a heading\n</details>\n\n## B\n"
    assert cut_at(body) == ["A", "B"]


def test_sections_cut_at_the_right_offsets_with_any_line_ending() -> None:
    for newline in ("\n", "\r\n", "\r"):
        body = newline.join(["# T", "", "intro", "```", "# code", "```", "## S", "", "text", ""])
        parts = sections(body)
        assert [p.heading for p in parts] == ["T", "S"]
        assert body[parts[1].start : parts[1].end].startswith("## S")
        assert body[parts[0].start : parts[0].end].endswith("```" + newline)


# Lines whose meaning depends on what surrounds them: the scan must agree with a CommonMark parser on every mix.
TRICKY_LINES = [
    "# Heading",
    "## Section",
    "### Sub",
    "#NotAHeading",
    "# C# ##",
    "```",
    "````",
    "```python",
    "````markdown",
    "~~~",
    "~~~~ yaml",
    "``` a`b",
    "  ```",
    "   ~~~",
    "    ```",
    "  # indented heading",
    "    # indented code",
    "\t# tab code",
    "- item",
    "- ```",
    "1. ```bash",
    "  - nested",
    "> quote",
    "> ```",
    "> # quoted heading",
    "<div>",
    "</div>",
    "<!-- comment -->",
    "---",
    "===",
    "-",
    "***",
    "plain text",
    "more text # with a hash",
    "",
    "",
    "",
]


def test_the_fast_scan_agrees_with_the_commonmark_parser() -> None:
    rng = random.Random(20261127)
    scanned = 0
    for _ in range(3000):
        body = "\n".join(rng.choice(TRICKY_LINES) for _ in range(rng.randint(1, 14))) + "\n"
        fast = _scan_headings(body)
        if fast is not None:
            scanned += 1
            assert fast == _parse_headings(body), body
    assert scanned > 300, scanned  # the scan answers a fair share of these on its own


@pytest.mark.parametrize("path", sorted(knowledge_dir().rglob("*.md")), ids=lambda p: p.stem)
def test_bundled_documents_need_no_parser_and_agree_with_it(path: Path) -> None:
    body = split_frontmatter(path.read_text(encoding="utf-8"))[1]
    assert _scan_headings(body) == _parse_headings(body)
