"""The SQLite store's full-text reads (FTS5): what search ranking and context packing ask of the index. The
statements moved here from search.py and context.py unchanged; the ranking around them stayed there."""

from __future__ import annotations

import json
import weakref

import aiosqlite

from sage_server.search import CLOSE_FIELDS, COUNT_UP_TO, DOC_WEIGHTS, FIELDS, SNIPPET_SCAN_CHARS, TOKENIZER
from sage_server.store.records import Body, Essential, SearchRow, SectionText


def filter_sql(layers: list[str] | None, tags: list[str] | None, alias: str = "d") -> tuple[str, list[object]]:
    """SQL conditions (and parameters) for layer and tag filters; every given tag must be present."""
    sql = ""
    params: list[object] = []
    if layers:
        sql += f" AND {alias}.layer IN ({','.join('?' * len(layers))})"
        params += layers
    for tag in tags or []:
        sql += f" AND EXISTS (SELECT 1 FROM json_each({alias}.tags) WHERE value = ?)"
        params.append(tag)
    return sql, params


_prepared: weakref.WeakSet[aiosqlite.Connection] = weakref.WeakSet()


def rank_documents_sql(
    fts: str, layers: list[str] | None, tags: list[str] | None, limit: int, offset: int
) -> tuple[str, list[object]]:
    """The statement (and parameters) of `rank_documents`; `make bench` runs it raw as the floor."""
    weights = ", ".join(str(w) for w in DOC_WEIGHTS)
    # Columns stored before the body only: reading one after it walks the body's overflow pages (see `bodies`).
    columns = "d.key, d.id, d.title, d.layer, d.tags, d.triggers, d.summary"
    if not layers and not tags:
        sql = (
            f"SELECT {columns}, r.score FROM (SELECT rowid, bm25(docs_fts, {weights}) AS score FROM docs_fts "
            f"WHERE docs_fts MATCH ? ORDER BY score LIMIT ? OFFSET ?) r "
            f"JOIN documents d ON d.key = r.rowid ORDER BY r.score"
        )
        params: list[object] = [fts, limit, offset]
    else:
        where, filters = filter_sql(layers, tags)
        sql = (
            f"SELECT {columns}, bm25(docs_fts, {weights}) AS score FROM docs_fts "
            f"JOIN documents d ON d.key = docs_fts.rowid WHERE docs_fts MATCH ?{where} "
            f"ORDER BY score LIMIT ? OFFSET ?"
        )
        params = [fts, *filters, limit, offset]
    return sql, params


def _search_row(row: aiosqlite.Row) -> SearchRow:
    return SearchRow(
        key=row["key"],
        id=row["id"],
        title=row["title"],
        layer=row["layer"],
        tags=json.loads(row["tags"]),
        triggers=json.loads(row["triggers"]),
        summary=row["summary"],
        score=row["score"],
    )


class SqliteSearch:
    """The index's reads on one SQLite connection (a mixin of the reader)."""

    conn: aiosqlite.Connection

    async def stems(self, texts: list[str]) -> list[list[str]]:
        conn = self.conn
        if conn not in _prepared:
            # A scratch full-text table in the connection's own temp schema (allowed on read-only connections) runs
            # the index's own tokenizer, so a query word is seen exactly as the index stored it.
            await conn.execute(
                f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.sage_words USING fts5 (w, tokenize = '{TOKENIZER}')"
            )
            await conn.execute(
                "CREATE VIRTUAL TABLE IF NOT EXISTS temp.sage_stems USING fts5vocab (temp, sage_words, 'instance')"
            )
            _prepared.add(conn)
        values = ", ".join("(?, ?)" for _ in texts)
        await conn.execute(
            f"INSERT OR REPLACE INTO temp.sage_words (rowid, w) VALUES {values}",
            [value for pair in enumerate(texts) for value in pair],
        )
        found: list[list[str]] = [[] for _ in texts]
        async with conn.execute(
            "SELECT doc, term FROM temp.sage_stems WHERE doc < ? ORDER BY doc, offset", (len(texts),)
        ) as cursor:
            for number, stem in await cursor.fetchall():
                found[number].append(stem)
        return found

    async def document_counts(self, expressions: list[str], documents: int) -> list[int]:
        # Counting every match walks a common word's whole list of documents (milliseconds at 10,000 documents,
        # 2-5 at 100k). FTS5 returns matches in key order, so the key of the COUNT_UP_TO-th match tells what share
        # of the keys holds that many matches, and the count is scaled up from there. Whether a word weighs anything
        # in BM25 turns on half the documents (search.Plan.fts_weighing), so an estimate that high is counted after
        # all: a word clustered in the documents imported first looks common from its first matches.
        unique = list(dict.fromkeys(expressions))
        counts: dict[str, int] = {}
        for expression, count, last in await self._counts(unique, COUNT_UP_TO):
            counts[expression] = count if count < COUNT_UP_TO else min(documents, round(count * documents / last))
        common = [expression for expression, count in counts.items() if count >= COUNT_UP_TO and 2 * count >= documents]
        if common:
            counts |= {expression: count for expression, count, _ in await self._counts(common, None)}
        return [counts[expression] for expression in expressions]

    async def _counts(self, expressions: list[str], up_to: int | None) -> list[tuple[str, int, int]]:
        """(expression, matches counted up to `up_to` or all, the key of the last one) for each expression."""
        limit = "" if up_to is None else f" LIMIT {up_to}"
        part = "SELECT {n}, count(*), coalesce(max(rowid), 0) FROM " + (
            f"(SELECT rowid FROM docs_fts WHERE docs_fts MATCH ?{limit})"
        )
        sql = " UNION ALL ".join(part.format(n=n) for n in range(len(expressions)))
        async with self.conn.execute(sql, expressions) as cursor:
            return [(expressions[number], count, last) for number, count, last in await cursor.fetchall()]

    async def document_count(self) -> int:
        # The largest key bounds the number of documents at the cost of one index probe (count(*) reads every row).
        async with self.conn.execute("SELECT coalesce(max(key), 1) FROM documents") as cursor:
            row = await cursor.fetchone()
        return max(1, int(row[0]) if row else 1)

    async def rank_documents(
        self, fts: str, layers: list[str] | None, tags: list[str] | None, limit: int, offset: int
    ) -> list[SearchRow]:
        # Only live documents are indexed, so without filters the ranking runs on the index alone and only the page's
        # rows are joined: joining first made SQLite decode every matching row into the sort (2-3x slower at 100k).
        sql, params = rank_documents_sql(fts, layers, tags, limit, offset)
        async with self.conn.execute(sql, params) as cursor:
            return [_search_row(row) for row in await cursor.fetchall()]

    async def rank_close_together(
        self, groups: list[list[str]], distance: int, layers: list[str] | None, tags: list[str] | None, limit: int
    ) -> list[SearchRow]:
        # FTS5's NEAR reads the position lists of the documents holding every phrase. (Scoring them by the all-terms
        # query instead, with `rowid IN (...)`, ran that query once per row: a second per row for a common prefix.)
        near = " OR ".join(f"NEAR({' '.join(group)}, {distance})" for group in groups)
        return await self.rank_documents(f"{{{' '.join(CLOSE_FIELDS)}}} : ({near})", layers, tags, limit, 0)

    async def bodies(self, keys: list[int]) -> dict[int, Body]:
        if not keys:
            return {}
        async with self.conn.execute(
            "SELECT key, substr(body, 1, ?), tokens, revision, alt_titles || char(10) || alt_summaries FROM documents "
            f"WHERE key IN ({','.join('?' * len(keys))})",
            [SNIPPET_SCAN_CHARS, *keys],
        ) as cursor:
            return {row[0]: Body(row[1], row[2], row[3], row[4]) for row in await cursor.fetchall()}

    async def field_scores(self, fts: str, keys: list[int]) -> dict[int, dict[str, float]]:
        columns = []
        for number, name in enumerate(FIELDS):
            weights = ", ".join(str(DOC_WEIGHTS[i] if i == number else 0.0) for i in range(len(FIELDS)))
            columns.append(f"-bm25(docs_fts, {weights}) AS {name}")
        async with self.conn.execute(
            f"SELECT rowid, {', '.join(columns)} FROM docs_fts WHERE docs_fts MATCH ? "
            f"AND rowid IN ({','.join('?' * len(keys))})",
            [fts, *keys],
        ) as cursor:
            return {
                row[0]: {name: round(row[i + 1], 4) for i, name in enumerate(FIELDS) if row[i + 1]}
                for row in await cursor.fetchall()
            }

    async def vocabulary_near(self, starts: list[str], max_length: int) -> list[tuple[str, int]]:
        async with self.conn.execute(
            "SELECT v.term, v.doc FROM json_each(?) p CROSS JOIN docs_vocab v "
            "WHERE v.term >= p.value AND v.term < p.value || char(1114111) AND length(v.term) <= ?",
            (json.dumps(starts), max_length),
        ) as cursor:
            return [(row[0], row[1]) for row in await cursor.fetchall()]

    async def count_matches(self, fts: str, up_to: int) -> int:
        async with self.conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM docs_fts WHERE docs_fts MATCH ? LIMIT ?)", (fts, up_to)
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def essentials(self, layer: str) -> list[Essential]:
        async with self.conn.execute(
            "SELECT id, title, summary FROM documents WHERE layer = ? AND deleted_at IS NULL ORDER BY id", (layer,)
        ) as cursor:
            return [Essential(r["id"], r["title"], r["summary"]) for r in await cursor.fetchall()]

    async def sections_of(self, keys: list[int]) -> list[SectionText]:
        async with self.conn.execute(
            "SELECT s.doc_key, s.ord, s.heading, substr(d.body, s.start + 1, s.length) AS text "
            f"FROM sections s JOIN documents d ON d.key = s.doc_key WHERE s.doc_key IN ({','.join('?' * len(keys))}) "
            "ORDER BY s.doc_key, s.ord",
            keys,
        ) as cursor:
            return [SectionText(r["doc_key"], r["ord"], r["heading"], r["text"]) for r in await cursor.fetchall()]
