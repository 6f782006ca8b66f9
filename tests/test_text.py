"""Token estimates, CJK bigrams and Markdown sections."""

from __future__ import annotations

import pytest
import yaml

from sage_server.markdown import FrontmatterError, first_heading, sections, split_frontmatter
from sage_server.text import cjk_index_text, estimate_tokens


def test_estimate_errs_high_for_prose_and_counts_cjk() -> None:
    prose = "The quick brown fox jumps over the lazy dog. " * 20
    # GPT tokenizers give ~10 tokens to this sentence; the estimate must not be lower.
    assert estimate_tokens(prose) >= 200
    assert estimate_tokens("") == 0
    assert estimate_tokens("密钥泄露") >= 4
    assert estimate_tokens("a" * 35) == 10


def test_cjk_bigrams() -> None:
    assert cjk_index_text("用中文搜索 and 한국어") == "用中 中文 文搜 搜索 한국 국어"
    assert cjk_index_text("plain English") == ""


def test_sections_cut_at_headings_outside_code() -> None:
    body = (
        "# Title\n\nIntro.\n\n## One\n\nText.\n\n```python\n# not a heading\n## nor this\n```\n\n"
        "### Sub\n\nMore.\n\n## Two\n\nEnd.\n"
    )
    cut = sections(body)
    assert [(s.heading, s.level) for s in cut] == [("Title", 1), ("One", 2), ("Two", 2)]
    assert "# not a heading" in body[cut[1].start : cut[1].end] and "### Sub" in body[cut[1].start : cut[1].end]
    assert "".join(body[s.start : s.end] for s in cut) == body


def test_frontmatter_and_first_heading() -> None:
    meta, body = split_frontmatter("---\ntitle: T\ntags: [a]\n---\n# Heading\n\nx\n")
    assert meta == {"title": "T", "tags": ["a"]} and body.startswith("# Heading")
    assert split_frontmatter("no frontmatter\n---\n") == ({}, "no frontmatter\n---\n")
    assert first_heading("text\n\n## Second level\n") == "Second level"


def test_plain_frontmatter_reads_exactly_as_yaml_does() -> None:
    cases = [
        "title: Hello world\ntags: [a, b c]\ntriggers: []",
        "title: café 中文",
        "title: a: b",
        "tags: [a, 'b']",
        "id: 12",
        "draft: true",
        "t: - a",
        "t: a # comment",
        "k: [a]\nk: b",
        "t: ~",
        "nested:\n  x: 1",
    ]
    for block in cases:
        try:
            expected = yaml.safe_load(block) or {}
        except yaml.YAMLError:
            with pytest.raises(FrontmatterError):
                split_frontmatter(f"---\n{block}\n---\nbody\n")
            continue
        meta, body = split_frontmatter(f"---\n{block}\n---\nbody\n")
        assert meta == expected and body == "body\n", block
