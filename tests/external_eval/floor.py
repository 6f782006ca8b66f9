"""The floor: plain SQLite FTS5 BM25 over the same files, the query's words joined with OR, the title weighted 5.

Same tokenizer as SAGE's index (Porter stemming, case and accent folding), so the floor differs from SAGE only in
what SAGE adds: field weights beyond the title, CJK bigrams, typo correction, re-scoring.
"""

from __future__ import annotations

import re
import sqlite3

TITLE_WEIGHT = 5.0
_WORD = re.compile(r"[^\W_]+")  # what unicode61 calls a token


class Floor:
    """An in-memory FTS5 table of (id, title, body) answering OR queries by BM25."""

    def __init__(self, documents: list[tuple[str, str, str]]) -> None:
        self.conn = sqlite3.connect(":memory:")
        self.conn.execute(
            "CREATE VIRTUAL TABLE docs USING fts5 (id UNINDEXED, title, body, "
            "tokenize = 'porter unicode61 remove_diacritics 2')"
        )
        self.conn.executemany("INSERT INTO docs (id, title, body) VALUES (?, ?, ?)", documents)
        self.conn.commit()

    def search(self, query: str, limit: int) -> list[tuple[str, float]]:
        """The best `limit` ids for `query` with their BM25 scores (higher is better)."""
        words = dict.fromkeys(word.lower() for word in _WORD.findall(query))
        if not words:
            return []
        match = " OR ".join(f'"{word}"' for word in words)
        rows = self.conn.execute(
            f"SELECT id, -bm25(docs, 0, {TITLE_WEIGHT}, 1.0) AS score FROM docs WHERE docs MATCH ? "
            "ORDER BY bm25(docs, 0, ?, 1.0) LIMIT ?",
            (match, TITLE_WEIGHT, limit),
        ).fetchall()
        return [(row[0], float(row[1])) for row in rows]

    def close(self) -> None:
        """Free the table."""
        self.conn.close()
