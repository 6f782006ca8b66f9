"""Full-text search: any user text becomes a safe FTS5 query, ranked by BM25 with field weights."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass, field

import aiosqlite

from sage_server.errors import InvalidInput
from sage_server.models import SearchHit
from sage_server.text import CJK_CLASS, bigrams, has_cjk

# Column weights for bm25(), in docs_fts column order: title, tags, triggers, summary, headings, body, cjk.
DOC_WEIGHTS = (10.0, 5.0, 6.0, 4.0, 3.0, 1.0, 4.0)
MAX_TERMS = 64
# Queries of up to this many terms first ask for documents holding all of them (see rank()).
ALL_TERMS_FIRST = 6
# Re-scoring of the best BM25 candidates (see rank()).
RERANK_WINDOW = 30
COVERAGE_TERMS = 16
COVERAGE_WEIGHT = 0.25
META_WEIGHT = 1.0
TRIGGER_WEIGHT = 1.0
MAX_QUERY_CHARS = 4000

_PHRASE = re.compile(r'"([^"]*)"')
_WORD = re.compile(rf"(?P<cjk>[{CJK_CLASS}]+)|(?P<word>[^\W_{CJK_CLASS}]+)(?P<star>\*)?")
# English function words plus the filler of requests ("please help me make sure..."): they carry no topic.
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are aren't as at be because been before being
    below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during
    each few for from further get got had hadn't has hasn't have haven't having he her here hers herself him
    himself his how i if in into is isn't it it's its itself just let let's like me more most my myself need no
    nor not now of off on once only or other ought our ours ourselves out over own please same she should
    shouldn't so some such sure than that that's the their theirs them themselves then there there's these they
    this those through to too under until up us very want was wasn't we were weren't what what's when where
    which while who whom why will with won't would wouldn't you your yours yourself yourselves""".split()
)


@dataclass
class Term:
    """One piece of a parsed query: a word, a prefix, a phrase, or a run of CJK text."""

    text: str
    kind: str  # word | prefix | phrase | cjk

    def fts(self) -> str:
        if self.kind == "cjk":
            grams = bigrams(self.text)
            if len(self.text) == 1:
                return f'cjk : "{grams[0]}"*'
            # A CJK sentence has no spaces: match it whole, or any of its two-character words.
            phrases = [" ".join(grams), *dict.fromkeys(grams)]
            return "cjk : (" + " OR ".join(f'"{phrase}"' for phrase in phrases) + ")"
        if self.kind == "prefix":
            return f'"{self.text}"*'
        return f'"{self.text}"'


@dataclass
class ParsedQuery:
    """A user query as FTS5 terms joined with OR (BM25 ranks documents that match more terms higher)."""

    terms: list[Term] = field(default_factory=list)
    text: str = ""

    def fts(self) -> str:
        return " OR ".join(term.fts() for term in self.terms)

    def fts_all(self) -> str:
        """The query that needs every term (used first: see `rank`)."""
        return " AND ".join(term.fts() for term in self.terms)


def _words(text: str) -> list[Term]:
    terms: list[Term] = []
    for match in _WORD.finditer(text):
        if match.group("cjk"):
            terms.append(Term(match.group("cjk"), "cjk"))
        else:
            kind = "prefix" if match.group("star") else "word"
            terms.append(Term(match.group("word").lower(), kind))
    return terms


def parse_query(text: str, phrases: bool = True) -> ParsedQuery:
    """Turn any text into a query that cannot be an FTS5 syntax error.

    Words are quoted (so AND, NOT, NEAR, '-' and parentheses are just text), `word*` is a prefix search,
    "double quotes" make a phrase, and CJK runs search the bigram column. Stopwords are dropped unless
    nothing else is left. Returns an empty query when the text has no words at all. With `phrases=False`
    (a task description, where quotes are speech, not syntax) quoted words are plain words.
    """
    text = text[:MAX_QUERY_CHARS]
    terms: list[Term] = []
    last = 0
    for match in _PHRASE.finditer(text) if phrases else ():
        terms += _words(text[last : match.start()])
        inner = _words(match.group(1))
        plain = [t.text for t in inner if t.kind != "cjk"]
        if len(plain) > 1:
            terms.append(Term(" ".join(plain), "phrase"))
        else:
            terms += [t for t in inner if t.kind == "cjk" or len(plain) == 1]
        last = match.end()
    terms += _words(text[last:].replace('"', " "))
    meaningful = [
        t for t in terms if not (t.kind == "word" and (t.text in STOPWORDS or (len(t.text) == 1 and t.text.isalpha())))
    ]
    unique = list({(t.kind, t.text): t for t in (meaningful or terms)}.values())
    return ParsedQuery(unique[:MAX_TERMS], text)


def _normalized(text: str) -> str:
    """Lower-case words with a plural 's' dropped, space-padded, for matching trigger phrases."""
    words = [w[:-1] if len(w) > 3 and w.endswith("s") else w for w in re.findall(r"[^\W_]+", text.lower())]
    return f" {' '.join(words)} "


def trigger_matches(text: str, triggers: list[str], plain: str | None = None) -> int:
    """How many of a document's trigger phrases occur in `text` (whole words; CJK as substrings). `plain` is
    `text` already normalized, for a caller matching one text against many documents."""
    plain = plain if plain is not None else _normalized(text)
    count = 0
    for trigger in triggers:
        if has_cjk(trigger):
            count += trigger in text
        elif _normalized(trigger).strip():
            count += _normalized(trigger) in plain
    return count


def encode_cursor(offset: int, key: str) -> str:
    """An opaque cursor for the next page of the query identified by `key`."""
    raw = json.dumps({"o": offset, "k": key}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, key: str) -> int:
    """The offset inside a cursor made by encode_cursor for the same query; 0 for no cursor."""
    if not cursor:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        offset, owner = int(data["o"]), str(data["k"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput("cursor is not one this server issued", field="cursor") from exc
    if owner != key or offset < 0:
        raise InvalidInput("cursor belongs to a different query or filter; start again without it", field="cursor")
    return offset


def query_key(*parts: object) -> str:
    """A short fingerprint of a query and its filters, carried by its cursors."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


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


async def rank_documents(
    conn: aiosqlite.Connection, fts: str, layers: list[str] | None, tags: list[str] | None, limit: int, offset: int
) -> list[sqlite3.Row]:
    """Live documents matching `fts` by BM25 alone, best first (score: lower is better).

    Only live documents are indexed, so without filters the ranking runs on the index alone and only the page's
    rows are joined: joining first made SQLite decode every matching row into the sort (2-3x slower at 100k).
    """
    weights = ", ".join(str(w) for w in DOC_WEIGHTS)
    columns = "d.key, d.id, d.title, d.layer, d.tags, d.triggers, d.tokens, d.revision, d.summary"
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
    async with conn.execute(sql, params) as cursor:
        return list(await cursor.fetchall())


@dataclass
class Ranked:
    """A ranked document row, its final score (higher is better) and, for the re-scored head, its body's opening."""

    row: sqlite3.Row
    score: float
    body: str | None = None


async def bodies(conn: aiosqlite.Connection, keys: list[int]) -> dict[int, str]:
    """The opening of each document's body, as much as snippets and re-scoring read."""
    if not keys:
        return {}
    async with conn.execute(
        f"SELECT key, substr(body, 1, ?) FROM documents WHERE key IN ({','.join('?' * len(keys))})",
        [SNIPPET_SCAN_CHARS, *keys],
    ) as cursor:
        return {row[0]: row[1] for row in await cursor.fetchall()}


async def rank(
    conn: aiosqlite.Connection,
    query: ParsedQuery,
    layers: list[str] | None,
    tags: list[str] | None,
    limit: int,
    offset: int = 0,
) -> list[Ranked]:
    """Documents for `query`, best first: BM25, then the top RERANK_WINDOW re-scored by term coverage.

    FTS5's BM25 gives a term found in over half the documents an IDF of ~0, so in a small or focused
    knowledge base the words that matter most ('review' in a review guide) count for nothing. Re-scoring
    the head by how many query terms a document holds, how many its title/tags/triggers/summary hold, and
    whether its trigger phrases occur in the query restores them. The coverage is read from the text with
    the snippet patterns: one more MATCH per term would cost more than the ranking itself.
    """
    window = max(RERANK_WINDOW, offset + limit)
    rows: list[sqlite3.Row] = []
    if 1 < len(query.terms) <= ALL_TERMS_FIRST:
        # Documents holding every word are the answer when there are enough of them; asking for them first
        # spares BM25 from scoring every document that holds any word (most of a large knowledge base when the
        # words are common: 200+ ms at 100k documents).
        rows = await rank_documents(conn, query.fts_all(), layers, tags, RERANK_WINDOW, 0)
        if len(rows) >= RERANK_WINDOW and window > RERANK_WINDOW:
            rows = await rank_documents(conn, query.fts_all(), layers, tags, window, 0)
        elif len(rows) < RERANK_WINDOW:
            rows = []
    if not rows:
        rows = await rank_documents(conn, query.fts(), layers, tags, window, 0)
    best = max((-row["score"] for row in rows), default=0.0)
    ranked = [Ranked(row, (-row["score"] / best) if best > 0 else 0.0) for row in rows]
    head = ranked[:RERANK_WINDOW]
    if head and query.terms:
        texts = await bodies(conn, [item.row["key"] for item in head])
        patterns = term_patterns(query)
        meta_patterns = [p for p, t in zip(patterns, query.terms, strict=False) if t.kind != "cjk"]
        plain_query = _normalized(query.text)
        for item in head:
            item.body = texts.get(item.row["key"], "")
            row = item.row
            meta = " ".join((row["title"], row["tags"], row["triggers"], row["summary"]))
            found = sum(1 for p in patterns if p.search(meta) or p.search(item.body))
            in_meta = sum(1 for p in meta_patterns if p.search(meta))
            item.score += COVERAGE_WEIGHT * found / len(patterns)
            item.score += META_WEIGHT * in_meta / max(1, len(meta_patterns))
            triggered = trigger_matches(query.text, json.loads(row["triggers"]), plain_query)
            item.score += TRIGGER_WEIGHT * min(triggered, 2) / 2
        head.sort(key=lambda r: -r.score)
        ranked[:RERANK_WINDOW] = head
    return ranked[offset : offset + limit]


# Snippets scan at most this much of a body: their cost must not grow with the document.
SNIPPET_SCAN_CHARS = 20_000
SNIPPET_WIDTH = 220
_MARKUP = re.compile(r"(?m)^\s*#{1,6}\s+|\*\*|__|`+")


def _term_pieces(term: Term) -> list[str]:
    """Regex pieces that find a query term in raw text: a short stem for a word (the index stems with Porter,
    which a regex cannot), the text itself for prefixes and phrases, and the run and its bigrams for CJK."""
    if term.kind == "cjk":
        return [re.escape(term.text), *(re.escape(g) for g in bigrams(term.text))]
    if term.kind == "word" and len(term.text) > 4:
        return [re.escape(term.text[: max(4, len(term.text) - 2)]) + r"\w*"]
    return [re.escape(term.text) + r"\w*"]


def term_patterns(query: ParsedQuery) -> list[re.Pattern[str]]:
    """One case-insensitive pattern per query term, for finding the terms in raw text."""
    return [re.compile("|".join(_term_pieces(t)), re.IGNORECASE) for t in query.terms[:COVERAGE_TERMS]]


def _patterns(query: ParsedQuery) -> list[str]:
    pieces = {piece for term in query.terms for piece in _term_pieces(term)}
    return sorted(pieces, key=len, reverse=True)  # longest first: a stem must not cut a longer match short


def make_snippet(body: str, query: ParsedQuery, width: int = SNIPPET_WIDTH) -> str | None:
    """The window of `body` that holds the most distinct query words, with each match in **bold**.

    Built here rather than with FTS5's snippet(), whose cost grows with the size of the document and the number
    of matches in it (seconds for a few large documents full of the query's words).
    """
    pieces = _patterns(query)
    if not pieces:
        return None
    finder = re.compile("|".join(pieces), re.IGNORECASE)
    text = body[:SNIPPET_SCAN_CHARS]
    matches = [(m.start(), m.group().lower()) for m in finder.finditer(text)]
    if not matches:
        return None
    best_at, best_score, first = 0, -1, 0
    for last, (start, _) in enumerate(matches):
        while matches[first][0] < start - width:
            first += 1
        score = len({word for _, word in matches[first : last + 1]})
        if score > best_score:
            best_at, best_score = matches[first][0], score
    begin = max(0, best_at - width // 4)
    begin = text.rfind(" ", 0, begin) + 1 if begin else 0
    end = min(len(text), begin + width)
    # Heading marks and emphasis would read as noise (or clash with the ** highlights) in a one-line excerpt.
    plain = _MARKUP.sub(" ", text[begin:end])
    window = finder.sub(lambda m: f"**{m.group()}**", plain)
    return ("…" if begin else "") + " ".join(window.split()) + ("…" if end < len(body) else "")


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


async def _has_match(conn: aiosqlite.Connection, fts: str) -> bool:
    async with conn.execute("SELECT 1 FROM docs_fts WHERE docs_fts MATCH ? LIMIT 1", (fts,)) as cursor:
        return await cursor.fetchone() is not None


async def correct(conn: aiosqlite.Connection, query: ParsedQuery) -> ParsedQuery | None:
    """Replace words that match nothing by the closest indexed term (a typo fix); None if nothing changed.

    The index holds Porter stems ('migrat' for 'migrations'), so a word is also compared by its first
    len(stem) letters, and the fix is searched as a prefix.
    """
    changed = False
    fixed: list[Term] = []
    for term in query.terms:
        if term.kind != "word" or len(term.text) < 4 or not term.text.isascii() or await _has_match(conn, term.fts()):
            fixed.append(term)
            continue
        word = term.text
        low, high = word[0], chr(ord(word[0]) + 1)
        async with conn.execute(
            "SELECT term, doc FROM docs_vocab WHERE term >= ? AND term < ? AND length(term) BETWEEN ? AND ?",
            (low, high, max(3, len(word) - 4), len(word) + 2),
        ) as cursor:
            candidates = await cursor.fetchall()
        limit = 1 if len(word) <= 5 else 2
        best: tuple[int, int, str] | None = None
        for candidate, docs in candidates:
            distance = min(_edit_distance(word, candidate), _edit_distance(word[: len(candidate)], candidate) + 1)
            if distance <= limit and (best is None or (distance, -docs) < best[:2]):
                best = (distance, -docs, candidate)
        if best is None:
            fixed.append(term)
        else:
            fixed.append(Term(best[2], "prefix"))
            changed = True
    return ParsedQuery(fixed) if changed else None


def describe(query: ParsedQuery) -> str:
    """The query as a person would read it (for `corrected_query`)."""
    parts = []
    for term in query.terms:
        if term.kind == "prefix":
            parts.append(term.text + "*")
        elif term.kind == "phrase":
            parts.append(f'"{term.text}"')
        else:
            parts.append(term.text)
    return " ".join(parts)


def to_hit(ranked: Ranked, snippet: str) -> SearchHit:
    """A search hit from a ranked row."""
    row = ranked.row
    return SearchHit(
        id=row["id"],
        title=row["title"],
        layer=row["layer"],
        tags=json.loads(row["tags"]),
        score=round(ranked.score, 4),
        snippet=" ".join(snippet.split()),  # one line: Markdown line breaks mean nothing in an excerpt
        tokens=row["tokens"],
        revision=row["revision"],
    )
