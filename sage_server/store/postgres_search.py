"""The PostgreSQL store's full-text reads: what search ranking and context packing ask of the index, on the tables of
migrations/postgresql/0002_full_text.sql (kept by the triggers of 0004_set_based_index.sql).

Ranking hands the index FTS5 expressions (search.Term.fts, Plan.fts): quoted words and phrases, `"word"*` prefixes,
AND, OR, parentheses and column filters (`cjk : (...)`, `{title tags triggers summary} : ...`). `parse` reads that
small grammar; each quoted phrase becomes a set of (document, field, term frequency) rows read from search_terms,
and AND and OR become INTERSECT and UNION of their documents (ranking decides the same per document, in the
aggregation that scores it: see _scores). Scores are FTS5's bm25() computed the same way:
for each phrase, IDF = ln((N - n + 0.5) / (n + 0.5)) (at least 1e-6) times f (k1 + 1) / (f + k1 (1 - b + b D /
avgD)), with f the phrase's occurrences weighted by field (search.DOC_WEIGHTS), D the document's length in tokens
and k1 = 1.2, b = 0.75; lower (negative) scores are better, as bm25() returns them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import DictRow

from sage_server.errors import InvalidInput
from sage_server.search import DOC_WEIGHTS, FIELDS, SNIPPET_SCAN_CHARS
from sage_server.store.records import Body, SearchRow

K1 = 1.2
B = 0.75
CJK_FIELD = FIELDS.index("cjk")
ALL_FIELDS = frozenset(range(len(FIELDS)))
# The tsvector's weight of each field (the cjk field is not in it: CJK runs are found by pg_trgm).
VECTOR_WEIGHTS = {0: "A", 1: "B", 2: "B", 3: "B", 4: "C", 5: "D"}
LAST_CHARACTER = "\U0010ffff"  # every term starting with a prefix sorts below prefix + this (COLLATE "C")
STEM_MEMORY = 8192

_TOKEN = re.compile(
    r'\s*(?:(?P<quoted>"(?:[^"]|"")*")|(?P<star>\*)|(?P<open>\()|(?P<close>\))|(?P<colon>:)'
    r"|(?P<set>\{[^}]*\})|(?P<bare>[^\s\"()*:{}]+))"
)


@dataclass(frozen=True)
class Phrase:
    """A quoted phrase (or bare word) of the expression, with the fields it may match in."""

    text: str
    prefix: bool
    fields: frozenset[int]


@dataclass(frozen=True)
class Node:
    """AND or OR of sub-expressions."""

    op: str  # "and" | "or"
    parts: tuple[Expression, ...]


Expression = Phrase | Node


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        at = 0
        text = text.rstrip()
        while at < len(text):
            match = _TOKEN.match(text, at)
            if match is None or match.end() == at:
                raise InvalidInput(f"search expression not understood at {text[at : at + 20]!r}", field="query")
            kind = match.lastgroup or ""
            self.tokens.append((kind, match.group(kind)))
            at = match.end()
        self.at = 0

    def peek(self, offset: int = 0) -> tuple[str, str]:
        at = self.at + offset
        return self.tokens[at] if at < len(self.tokens) else ("end", "")

    def take(self) -> tuple[str, str]:
        token = self.peek()
        self.at += 1
        return token

    def expect(self, kind: str) -> None:
        if self.take()[0] != kind:
            raise InvalidInput(f"search expression: expected {kind}", field="query")

    def parse(self) -> Expression:
        expression = self.either()
        if self.peek()[0] != "end":
            raise InvalidInput(f"search expression: unexpected {self.peek()[1]!r}", field="query")
        return expression

    def either(self) -> Expression:
        parts = [self.both()]
        while self.peek() == ("bare", "OR"):
            self.take()
            parts.append(self.both())
        return parts[0] if len(parts) == 1 else Node("or", tuple(parts))

    def both(self) -> Expression:
        parts = [self.one()]
        while True:
            kind, value = self.peek()
            if (kind, value) == ("bare", "AND"):
                self.take()
            elif kind in ("end", "close") or (kind, value) == ("bare", "OR"):
                break
            parts.append(self.one())  # juxtaposed phrases are ANDed, as FTS5 reads them
        return parts[0] if len(parts) == 1 else Node("and", tuple(parts))

    def one(self) -> Expression:
        kind, value = self.peek()
        if value in ("NOT", "NEAR") and kind == "bare":
            raise InvalidInput(f"search expression: {value} is not supported", field="query")
        if kind == "set" or (kind == "bare" and self.peek(1)[0] == "colon"):
            self.take()
            self.expect("colon")
            return _restrict(self.one(), _columns(value.strip("{}").split()))
        if kind == "open":
            self.take()
            inner = self.either()
            self.expect("close")
            return inner
        if kind in ("quoted", "bare"):
            self.take()
            text = value[1:-1].replace('""', '"') if kind == "quoted" else value
            prefix = self.peek()[0] == "star"
            if prefix:
                self.take()
            return Phrase(text, prefix, ALL_FIELDS)
        raise InvalidInput(f"search expression: unexpected {value or 'end'!r}", field="query")


def _columns(names: list[str]) -> frozenset[int]:
    unknown = [name for name in names if name not in FIELDS]
    if unknown or not names:
        raise InvalidInput(f"search expression: no such column {', '.join(unknown) or '{}'}", field="query")
    return frozenset(FIELDS.index(name) for name in names)


def _restrict(expression: Expression, fields: frozenset[int]) -> Expression:
    if isinstance(expression, Phrase):
        return Phrase(expression.text, expression.prefix, expression.fields & fields)
    return Node(expression.op, tuple(_restrict(part, fields) for part in expression.parts))


def parse(fts: str) -> Expression:
    """An FTS5 expression of the kind search.py builds, as a tree of phrases."""
    return _Parser(fts).parse()


def phrases(expression: Expression) -> list[Phrase]:
    """The expression's phrases, in order (each is scored on its own, as FTS5 scores them)."""
    if isinstance(expression, Phrase):
        return [expression]
    return [phrase for part in expression.parts for phrase in phrases(part)]


def _cjk_only(phrase: Phrase) -> bool:
    return phrase.fields == {CJK_FIELD}


class _Statement:
    """SQL text and its parameters, built in order."""

    def __init__(self) -> None:
        self.sql: list[str] = []
        self.params: list[object] = []

    def add(self, sql: str, *params: object) -> None:
        self.sql.append(sql)
        self.params.extend(params)

    def text(self) -> str:
        return "".join(self.sql)


def _phrase_rows(out: _Statement, phrase: Phrase, tokens: list[str]) -> None:
    """A query giving (doc_key, field, tf): the phrase's occurrences in each field of each document holding it."""
    fields = sorted(phrase.fields)
    # No condition on the field when every field counts (most phrases): it was checked on every row read.
    in_fields = "" if phrase.fields == ALL_FIELDS else " AND field = ANY(%s)"
    field_params = [] if phrase.fields == ALL_FIELDS else [fields]
    if not tokens or not fields:
        out.add("SELECT NULL::bigint AS doc_key, NULL::smallint AS field, NULL::integer AS tf WHERE false")
    elif len(tokens) == 1 and phrase.prefix:
        out.add(
            f"SELECT doc_key, field, sum(tf)::integer AS tf FROM search_terms WHERE term >= %s AND term < %s"
            f"{in_fields} GROUP BY doc_key, field",
            tokens[0],
            tokens[0] + LAST_CHARACTER,
            *field_params,
        )
    elif len(tokens) == 1:
        out.add(f"SELECT doc_key, field, tf FROM search_terms WHERE term = %s{in_fields}", tokens[0], *field_params)
    elif _cjk_only(phrase):
        # The bigrams in a row, counted exactly in the space-padded text (found by the trigram index).
        pattern = "".join(f" {token} " for token in tokens)
        out.add(
            f"SELECT doc_key, {CJK_FIELD}::smallint AS field, "
            "((length(cjk) - length(replace(cjk, %s, ''))) / length(%s))::integer AS tf "
            "FROM search_documents WHERE cjk LIKE %s",
            pattern,
            pattern,
            "%" + pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",
        )
    else:
        # Words in a row: the tsvector checks the order; the occurrences are those of its least frequent word.
        weights = "".join(sorted({VECTOR_WEIGHTS[f] for f in fields if f in VECTOR_WEIGHTS}))
        query = " <-> ".join(
            "'" + token.replace("'", "''") + "'" + (f":{weights}" if weights else "") for token in tokens
        )
        out.add(
            "SELECT doc_key, field, min(tf)::integer AS tf FROM search_terms WHERE term = ANY(%s) "
            f"AND doc_key IN (SELECT doc_key FROM search_documents WHERE vector @@ %s::tsquery){in_fields} "
            "GROUP BY doc_key, field HAVING count(*) = %s",
            sorted(set(tokens)),
            query,
            *field_params,
            len(set(tokens)),
        )


def _matching(out: _Statement, expression: Expression, names: dict[int, str]) -> None:
    """A query giving the doc_key of every document matching the expression."""
    if isinstance(expression, Phrase):
        out.add(f"SELECT DISTINCT doc_key FROM {names[id(expression)]}")
        return
    joiner = " UNION " if expression.op == "or" else " INTERSECT "
    for number, part in enumerate(expression.parts):
        out.add(("" if number == 0 else joiner) + "(")
        _matching(out, part, names)
        out.add(")")


def _with(out: _Statement, expression: Expression, stems: dict[str, list[str]], name: str) -> list[str]:
    """`WITH` parts naming each phrase's rows ({name}p0, ...) and the matching documents ({name}m); the phrases'
    names, in order."""
    found = phrases(expression)
    names: dict[int, str] = {}
    for number, phrase in enumerate(found):
        names[id(phrase)] = f"{name}p{number}"
        out.add(f"{names[id(phrase)]} AS MATERIALIZED (")
        _phrase_rows(out, phrase, _tokens(phrase, stems))
        out.add("), ")
    out.add(f"{name}m AS (")
    _matching(out, expression, names)
    out.add(")")
    return [names[id(phrase)] for phrase in found]


def _tokens(phrase: Phrase, stems: dict[str, list[str]]) -> list[str]:
    # The cjk column holds bigrams as written (FTS5 neither stems nor splits them further).
    return phrase.text.lower().split() if _cjk_only(phrase) else stems[phrase.text]


def _weights() -> str:
    return "ARRAY[" + ", ".join(f"{w}::float8" for w in DOC_WEIGHTS) + "]"


def _idfs(out: _Statement, names: list[str]) -> None:
    """`WITH` parts after _with's: BM25's N and average length (`totals`), and each phrase's IDF ({p}i)."""
    out.add(
        ", totals AS (SELECT greatest(documents, 1)::float8 AS n, "
        "greatest(tokens::float8 / greatest(documents, 1), 1e-9) AS avgdl FROM search_totals)"
    )
    for name in names:
        out.add(
            f", {name}i AS (SELECT greatest(ln((totals.n - c + 0.5) / (c + 0.5)), 1e-6) AS idf FROM totals, "
            f"(SELECT count(DISTINCT doc_key) AS c FROM {name}) AS hits)"
        )


def _present(expression: Expression, numbers: dict[int, int]) -> str:
    """The expression as a condition on a document's group of phrase rows (`h.i` numbering the phrases): what
    _matching's UNION and INTERSECT of documents select."""
    if isinstance(expression, Phrase):
        return f"count(*) FILTER (WHERE h.i = {numbers[id(expression)]}) > 0"
    joiner = " OR " if expression.op == "or" else " AND "
    return "(" + joiner.join(_present(part, numbers) for part in expression.parts) + ")"


def _scores(out: _Statement, expression: Expression, names: list[str]) -> None:
    """`WITH` parts after _with's: the IDFs, and the BM25 score of every matching document (`scored`: doc_key,
    score, higher is better).

    One aggregation over every phrase's rows gives each document its weighted frequency per phrase (f0, f1, ...)
    and decides whether it matches. Joining the phrases' documents instead (one LEFT JOIN per phrase) was planned as
    a nested loop whenever a word prefix's rows were underestimated (a range of the index is estimated at one row):
    9,000 x 3,000 rows compared, 7 s for `breaker liosb*` at 10k documents. The frequencies are sums of small
    integers (exact in float8) and the score is the same expression, so the ranking is unchanged."""
    _idfs(out, names)
    weights = _weights()
    rows = " UNION ALL ".join(f"SELECT {n} AS i, doc_key, field, tf FROM {name}" for n, name in enumerate(names))
    sums = "".join(
        f", sum(({weights})[h.field + 1] * h.tf) FILTER (WHERE h.i = {n}) AS f{n}" for n in range(len(names))
    )
    numbers = {id(phrase): n for n, phrase in enumerate(phrases(expression))}
    out.add(
        f", f AS (SELECT h.doc_key{sums} FROM ({rows}) AS h GROUP BY h.doc_key HAVING {_present(expression, numbers)})"
    )
    parts = [
        f"(SELECT idf FROM {name}i) * coalesce(f.f{n}, 0) * {K1 + 1} / (coalesce(f.f{n}, 0) + {K1} * "
        f"(1 - {B} + {B} * sd.length / totals.avgdl))"
        for n, name in enumerate(names)
    ]
    out.add(
        f", scored AS (SELECT f.doc_key, {' + '.join(parts)} AS score FROM f "
        "JOIN search_documents sd ON sd.doc_key = f.doc_key CROSS JOIN totals)"
    )


def filter_sql(layers: list[str] | None, tags: list[str] | None) -> tuple[str, list[object]]:
    """The conditions on documents `d` of a layer filter and of every tag filter, and their parameters."""
    sql = ""
    params: list[object] = []
    if layers:
        sql += " AND d.layer = ANY(%s)"
        params.append(layers)
    for tag in tags or []:
        sql += " AND d.tags::jsonb ? %s"
        params.append(tag)
    return sql, params


_STEMS = (
    "SELECT q.n, v.lexeme FROM unnest(%s::text[]) WITH ORDINALITY AS q (t, n), "
    "unnest(to_tsvector('sage', sage_words(q.t))) AS v, unnest(v.positions) AS p ORDER BY q.n, p"
)
_known_stems: dict[str, list[str]] = {}


class PostgresSearch:
    """The index's reads on one PostgreSQL connection (a mixin of the reader)."""

    conn: AsyncConnection[DictRow]

    async def _all(self, sql: str, params: Any = None) -> list[DictRow]:
        cursor = await self.conn.execute(sql, params)
        return await cursor.fetchall()

    async def stems(self, texts: list[str]) -> list[list[str]]:
        # Every database stems with the same configuration (its migration), so stems are remembered process-wide.
        known = {text: _known_stems[text] for text in texts if text in _known_stems}
        missing = [text for text in dict.fromkeys(texts) if text not in known]
        if missing:
            found: list[list[str]] = [[] for _ in missing]
            for row in await self._all(_STEMS, (missing,)):
                found[row["n"] - 1].append(row["lexeme"])
            if len(_known_stems) + len(missing) > STEM_MEMORY:
                _known_stems.clear()
            known.update(zip(missing, found, strict=True))
            _known_stems.update(zip(missing, found, strict=True))
        return [known[text] for text in texts]

    async def _parsed(self, expressions: list[str]) -> list[tuple[Expression, dict[str, list[str]]]]:
        """Each expression read, with the stems of its phrases (looked up at once)."""
        trees = [parse(fts) for fts in expressions]
        texts = list(dict.fromkeys(p.text for tree in trees for p in phrases(tree) if not _cjk_only(p)))
        stems = dict(zip(texts, await self.stems(texts), strict=True))
        return [(tree, stems) for tree in trees]

    async def _statement(self, fts: str) -> tuple[_Statement, Expression, list[str]]:
        """`WITH` and the parts naming `fts`'s phrases and matching documents (`m`); the expression read, and its
        phrases' names."""
        [(expression, stems)] = await self._parsed([fts])
        out = _Statement()
        out.add("WITH ")
        return out, expression, _with(out, expression, stems, "")

    async def document_counts(self, expressions: list[str], documents: int) -> list[int]:
        # Exact counts: each is one range of the terms' index, a few milliseconds for the commonest word at 10k.
        unique = list(dict.fromkeys(expressions))
        out = _Statement()
        out.add("WITH ")
        for number, (expression, stems) in enumerate(await self._parsed(unique)):
            out.add("" if number == 0 else ", ")
            _with(out, expression, stems, f"e{number}")
        out.add(" " + " UNION ALL ".join(f"SELECT {n} AS n, count(*) AS c FROM e{n}m" for n in range(len(unique))))
        counts = {unique[row["n"]]: int(row["c"]) for row in await self._all(out.text(), out.params)}
        return [counts[fts] for fts in expressions]

    async def document_count(self) -> int:
        rows = await self._all("SELECT documents FROM search_totals")
        return max(1, int(rows[0]["documents"]) if rows else 1)

    async def rank_documents(
        self, fts: str, layers: list[str] | None, tags: list[str] | None, limit: int, offset: int
    ) -> list[SearchRow]:
        sql, params = await self.rank_documents_sql(fts, layers, tags, limit, offset)
        return [_search_row(row) for row in await self._all(sql, params)]

    async def rank_documents_sql(
        self, fts: str, layers: list[str] | None, tags: list[str] | None, limit: int, offset: int
    ) -> tuple[str, list[object]]:
        """The statement (and parameters) of `rank_documents`; `make bench` can run it raw as the floor."""
        out, expression, names = await self._statement(fts)
        _scores(out, expression, names)
        columns = "d.key, d.id, d.title, d.layer, d.tags, d.triggers, d.summary, s.score"
        where, filters = filter_sql(layers, tags)
        if where:
            out.add(
                f" SELECT {columns} FROM scored s JOIN documents d ON d.key = s.doc_key WHERE true{where} "
                "ORDER BY s.score DESC, s.doc_key LIMIT %s OFFSET %s",
                *filters,
                limit,
                offset,
            )
        else:
            out.add(
                f" SELECT {columns} FROM (SELECT * FROM scored ORDER BY score DESC, doc_key LIMIT %s OFFSET %s) s "
                "JOIN documents d ON d.key = s.doc_key ORDER BY s.score DESC, s.doc_key",
                limit,
                offset,
            )
        return out.text(), out.params

    async def rank_close_together(
        self, groups: list[list[str]], distance: int, layers: list[str] | None, tags: list[str] | None, limit: int
    ) -> list[SearchRow]:
        # tsquery has no NEAR (its <N> is an exact distance), so the documents whose headings and body hold a group
        # most densely together are picked by cover density (ts_rank_cd), which `distance` does not bound.
        del distance
        trees = iter(await self._parsed([phrase for group in groups for phrase in group]))
        query = " | ".join("(" + " & ".join(_lexemes(*next(trees)) for _ in group) + ")" for group in groups)
        where, filters = filter_sql(layers, tags)
        rows = await self._all(
            "SELECT d.key, d.id, d.title, d.layer, d.tags, d.triggers, d.summary, c.score FROM "
            "(SELECT doc_key, ts_rank_cd('{1, 1, 0, 0}', vector, %s::tsquery) AS score FROM search_documents "
            "WHERE vector @@ %s::tsquery) c JOIN documents d ON d.key = c.doc_key "
            f"WHERE true{where} ORDER BY c.score DESC, c.doc_key LIMIT %s",
            [query, query, *filters, limit],
        )
        return [_search_row(row) for row in rows]

    async def bodies(self, keys: list[int]) -> dict[int, Body]:
        if not keys:
            return {}
        rows = await self._all(
            "SELECT key, substr(body, 1, %s) AS text, tokens, revision, alt_titles || E'\\n' || alt_summaries AS alt "
            "FROM documents WHERE key = ANY(%s)",
            (SNIPPET_SCAN_CHARS, keys),
        )
        return {row["key"]: Body(row["text"], row["tokens"], row["revision"], row["alt"]) for row in rows}

    async def field_scores(self, fts: str, keys: list[int]) -> dict[int, dict[str, float]]:
        # bm25() counting one field at a time (every other field's weight 0), for every field in one statement.
        if not keys:
            return {}
        out, _, names = await self._statement(fts)
        _idfs(out, names)
        hits = " UNION ALL ".join(f"SELECT {n} AS i, doc_key, field, tf FROM {name}" for n, name in enumerate(names))
        idfs = " UNION ALL ".join(f"SELECT {n} AS i, idf FROM {name}i" for n, name in enumerate(names))
        out.add(
            f", hits AS ({hits}), idfs AS ({idfs}), "
            f"x AS (SELECT h.i, h.doc_key, h.field, ({_weights()})[h.field + 1] * sum(h.tf) AS f FROM hits h "
            "WHERE h.doc_key = ANY(%s) AND h.doc_key IN (SELECT doc_key FROM m) GROUP BY h.i, h.doc_key, h.field) "
            f"SELECT x.doc_key, x.field, sum(idfs.idf * x.f * {K1 + 1} / (x.f + {K1} * "
            f"(1 - {B} + {B} * sd.length / totals.avgdl))) AS score "
            "FROM x JOIN idfs ON idfs.i = x.i JOIN search_documents sd ON sd.doc_key = x.doc_key CROSS JOIN totals "
            "GROUP BY x.doc_key, x.field",
            keys,
        )
        found: dict[int, dict[str, float]] = {}
        for row in await self._all(out.text(), out.params):
            score = round(float(row["score"]), 4)
            if score:
                found.setdefault(row["doc_key"], {})[FIELDS[row["field"]]] = score
        return found

    async def vocabulary_near(self, starts: list[str], max_length: int) -> list[tuple[str, int]]:
        # One range of the terms' index per start, each planned with its own bounds (a join on a list of starts was
        # planned as a scan of the whole index). A vocabulary table counted at write time was slower to keep: an
        # import updated the count of every common word once per document.
        if not starts:
            return []
        ranges = " UNION ALL ".join(
            "SELECT term, doc_key FROM search_terms WHERE term >= %s AND term < %s AND length(term) <= %s"
            for _ in starts
        )
        params = [value for start in starts for value in (start, start + LAST_CHARACTER, max_length)]
        rows = await self._all(
            f"SELECT term, count(DISTINCT doc_key) AS docs FROM ({ranges}) AS found GROUP BY term", params
        )
        return [(row["term"], int(row["docs"])) for row in rows]

    async def count_matches(self, fts: str, up_to: int) -> int:
        out, _, _ = await self._statement(fts)
        out.add(" SELECT count(*) AS c FROM (SELECT 1 FROM m LIMIT %s) AS found", up_to)
        rows = await self._all(out.text(), out.params)
        return int(rows[0]["c"]) if rows else 0


def _search_row(row: DictRow) -> SearchRow:
    return SearchRow(
        key=row["key"],
        id=row["id"],
        title=row["title"],
        layer=row["layer"],
        tags=_json_list(row["tags"]),
        triggers=_json_list(row["triggers"]),
        summary=row["summary"],
        score=-float(row["score"]),
    )


def _lexemes(tree: Expression, stems: dict[str, list[str]]) -> str:
    """A phrase of search.Term.fts as a tsquery on the headings and body (weights C and D): its words in a row."""
    assert isinstance(tree, Phrase)
    tokens = stems[tree.text] or [tree.text.lower()]
    star = "*" if tree.prefix else ""
    return "(" + " <-> ".join("'" + token.replace("'", "''") + f"':{star}CD" for token in tokens) + ")"


def _json_list(value: str) -> list[str]:
    return [str(item) for item in json.loads(value)]
