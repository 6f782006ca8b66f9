"""Text helpers shared by the index and the query side: token estimates and CJK bigrams."""

from __future__ import annotations

import math
import re

# Han (with extension A and compatibility ideographs), kana, Hangul and half-width katakana.
CJK_CLASS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\u1100-\u11ff\u3130-\u318f\uf900-\ufaff\uff66-\uff9f"
CJK_RUN = re.compile(f"[{CJK_CLASS}]+")

# Calibrated against the GPT-family BPE vocabularies (cl100k/o200k), which average ~4 ASCII characters a token
# for English prose and ~3 for code, and 0.7-1.3 tokens a CJK character. We divide ASCII by 3.5 and count
# 1.2 a non-ASCII character so the estimate errs high: a budget computed with it is not overrun in practice.
ASCII_CHARS_PER_TOKEN = 3.5
NON_ASCII_TOKENS_PER_CHAR = 1.2


def estimate_tokens(text: str) -> int:
    """Estimate how many LLM tokens `text` costs (conservative; see the constants above)."""
    if not text:
        return 0
    non_ascii = len(text) - len(text.encode("ascii", "ignore"))
    ascii_chars = len(text) - non_ascii
    return math.ceil(ascii_chars / ASCII_CHARS_PER_TOKEN + non_ascii * NON_ASCII_TOKENS_PER_CHAR)


def has_cjk(text: str) -> bool:
    """True when `text` has any Chinese, Japanese or Korean character."""
    return CJK_RUN.search(text) is not None


def bigrams(run: str) -> list[str]:
    """Overlapping two-character pieces of one CJK run ('中文搜索' -> 中文 文搜 搜索)."""
    if len(run) < 2:
        return [run] if run else []
    return [run[i : i + 2] for i in range(len(run) - 1)]


def cjk_index_text(*texts: str) -> str:
    """The CJK bigrams of `texts`, space-separated, for the index's `cjk` column.

    FTS5's unicode61 tokenizer keeps a whole CJK run as one token, so a word inside a sentence could never
    match; indexing bigrams makes any two or more consecutive characters findable as a phrase.
    """
    pieces: list[str] = []
    for text in texts:
        if text.isascii():  # most text: nothing to scan for
            continue
        for match in CJK_RUN.finditer(text):
            pieces.extend(bigrams(match.group()))
    return " ".join(pieces)
