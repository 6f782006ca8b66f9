"""Search: any user text becomes a safe FTS5 query; BM25 finds candidates, which are re-scored by how much of the
query each holds and how close together.

A search runs in three steps:
1. `plan`: every query term is looked up in the index's vocabulary, with the index's own stemmer, to learn how rare
   it is (its IDF: a word found in most documents tells little).
2. `rank`: SQLite FTS5 ranks documents by BM25 with field weights (documents holding every term are asked for first
   when there are enough of them) and keeps the best CANDIDATES, with the best documents holding every term close
   together (an FTS5 NEAR query: BM25 ignores where the words are).
3. Each candidate is scored from its text: BM25 relative to the best candidate, the share of the query's weight
   (IDF) it holds (coverage), the share found within one short stretch of text (proximity: words typed together
   were usually read together), the shortest stretch holding every term in the query's order (sequence), the share
   in its title, tags, triggers or summary (meta), and whether its trigger phrases occur in the query. The score
   is their weighted sum (at most 1), so it says how well a document answers the query and not only how it
   compares with the others; `field_scores` and the parts are what `sage search --explain` shows.
Words no document holds are read, before a second ranking, as the start of longer words or as typos
(spelling.correct). proximity.py measures where the terms stand in a text.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import TypeVar

from sage_server.errors import InvalidInput
from sage_server.models import QueryTermExplanation, ScoreExplanation, SearchHit
from sage_server.proximity import densest, in_order, pair_proximity, word_starts
from sage_server.store.records import Body as Body
from sage_server.store.records import SearchRow
from sage_server.store.search_index import SearchIndex
from sage_server.text import CJK_CLASS, bigrams, has_cjk

# Index columns in docs_fts order, and their weights for bm25().
FIELDS = ("title", "tags", "triggers", "summary", "headings", "body", "cjk")
DOC_WEIGHTS = (10.0, 5.0, 6.0, 4.0, 3.0, 1.0, 4.0)
# The tokenizer of docs_fts (migrations/0001_initial.sql), used to stem query words as the index did.
TOKENIZER = "porter unicode61 remove_diacritics 2"
MAX_TERMS = 64
MAX_QUERY_CHARS = 4000
# How many of the best BM25 documents are re-scored, and how many holding every term make asking for any unneeded.
CANDIDATES = 60
ENOUGH_HOLDING_ALL = 30
# How many are re-scored when spelling.correct read a word no document holds as a prefix or a typo (or a rare word
# beside a common one): BM25 weighs such a word by a guess (a prefix's combined count, a correction with its
# runner-up), so its order says less and the page meant lies deeper in it. Only queries holding an unknown or rare
# word pay this.
CORRECTED_CANDIDATES = 120
# Queries of up to this many terms first ask for documents holding all of them (see `candidates`).
ALL_TERMS_FIRST = 6
# A second source of candidates for such queries: the best CLOSE_CANDIDATES documents (by BM25) holding every term
# within CLOSE_DISTANCE words of each other in one of CLOSE_FIELDS. When many documents hold every word, the one
# that holds them in one sentence can lie past the CANDIDATES best by BM25 (which ignores where the words are), and
# re-scoring, which would put it first, never sees it.
CLOSE_DISTANCE = 15
CLOSE_CANDIDATES = 30
CLOSE_FIELDS = ("headings", "body")
# Not when the rarest term is in more documents than this: FTS5 then reads as many position lists as the all-terms
# query read rows (40-100 ms at 10k documents), for words too common for their closeness to single a page out.
CLOSE_MAX_DOCUMENTS = 2000
# The parts of a score and their weights; they sum to 1.
WEIGHTS = {"bm25": 0.12, "coverage": 0.12, "proximity": 0.4, "meta": 0.08, "triggers": 0.08, "sequence": 0.2}
META_PROXIMITY = True
META_GAP = 1000
# Words no document holds are read as prefixes or corrected from this length on: shorter ones match too much.
MIN_PREFIX = 4
# A known word of MIN_PREFIX-5 letters is read as a prefix when this many times more documents hold a word that
# starts with it.
SHORT_WORD_RATIO = 3
# A word at most this many documents hold is checked for being a typo of a far more common one (spelling.py).
RARE_DOCUMENTS = 2
# Snippets and re-scoring read at most this much of a body: their cost must not grow with the document.
SNIPPET_SCAN_CHARS = 20_000
# Words whose stems and document counts are remembered between queries (see Vocabulary).
VOCABULARY_MEMORY = 4096
# Document counts are exact up to this many and from half the documents on, estimated in between (see
# document_counts).
COUNT_UP_TO = 500
# Chinese function characters (particles, pronouns, question words): a run's two-character pieces holding one
# count this share in re-scoring. Chinese has no spaces, so these mark where most pieces cross a word boundary.
CJK_FUNCTION = frozenset("的了吗呢吧么什怎哪谁我你他她它们这那个些是在把被给应该时候样要就都也还和与")
CJK_FUNCTION_SHARE = 0.2
T = TypeVar("T")

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


@functools.lru_cache(maxsize=4096)
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


MAX_CURSOR_OFFSET = 10_000_000


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
    if owner != key:
        raise InvalidInput("cursor belongs to a different query or filter; start again without it", field="cursor")
    # Cursors are not signed, so an offset is bounded here: SQLite's OFFSET takes a 64-bit integer, and no page
    # of a real result lies this far down anyway.
    if not 0 <= offset <= MAX_CURSOR_OFFSET:
        raise InvalidInput(f"cursor offset must be between 0 and {MAX_CURSOR_OFFSET}", field="cursor")
    return offset


def query_key(*parts: object) -> str:
    """A short fingerprint of a query and its filters, carried by its cursors."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Unit:
    """A piece of a query term that re-scoring looks for: the word starts that mark it in raw lower-case text and
    what finding it weighs, in the text and in the title, tags, triggers and summary."""

    keys: tuple[str, ...]
    weight: float
    meta_weight: float


@dataclass
class PlannedTerm:
    """A query term as searched, with how rare it is (IDF) and what became of what the user typed."""

    term: Term
    typed: str
    df: int
    idf: float
    keys: tuple[str, ...]  # lower-case starts of the words that stand for the term in raw text
    stem: str = ""
    note: str = ""  # "" | "prefix": read as the start of longer words | "corrected": a typo replaced | "or": see below
    # A far more common word one or two edits away from a word only a document or two hold ('insted'): searched
    # beside it, since such a word is as likely a typo as a rare term.
    alternative: Term | None = None
    # How rare the term is in titles, tags, triggers and summaries (a word in most bodies may be in few titles).
    meta_idf: float | None = None
    # What re-scoring looks for. One unit per term, but a CJK run of three or more characters is looked for as its
    # two-character words (bigrams), so a document holding most of the run, or all of it apart, still counts.
    units: list[Unit] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.units:
            self.units = [Unit(self.keys, self.idf, self.idf if self.meta_idf is None else self.meta_idf)]

    def describe(self) -> str:
        if self.alternative is not None:
            return f"({describe(self.term)} OR {describe(self.alternative)})"
        return describe(self.term)

    def fts(self) -> str:
        if self.alternative is not None:
            return f"({self.term.fts()} OR {self.alternative.fts()})"
        return self.term.fts()

    @property
    def plain(self) -> bool:
        return self.term.kind == "word" and self.term.text.isascii() and self.term.text.isalpha()

    @property
    def unknown(self) -> bool:
        """A plain word no indexed document holds: a typo, or a word cut short."""
        return self.df == 0 and self.plain

    @property
    def rare(self) -> bool:
        """A plain word of 5+ letters that only a document or two hold: perhaps a typo of a common word."""
        return 0 < self.df <= RARE_DOCUMENTS and self.plain and len(self.term.text) >= 5


@dataclass
class Plan:
    """A query ready to rank: its terms with their weights; `corrected` reads the query as searched when any term
    was read as a prefix or corrected."""

    query: ParsedQuery
    terms: list[PlannedTerm]
    documents: int
    corrected: str | None = None

    def fts(self) -> str:
        return " OR ".join(t.fts() for t in self.terms)

    def fts_all(self) -> str:
        """The query that needs every term (asked first: see `rank`)."""
        return " AND ".join(t.fts() for t in self.terms)

    def fts_weighing(self) -> str | None:
        """The any-term query without the terms BM25 weighs at (almost) nothing, or None when there is none to
        leave out or nothing else would be left.

        A term in half the documents or more has ln((N - n + 0.5) / (n + 0.5)) <= 0 as its IDF, which FTS5's bm25()
        (and the PostgreSQL statement, its copy) raises to 1e-6: it adds at most ~2e-6 to a document's score,
        whatever its weight, yet its matches are most of what the any-term query reads and scores (a task sentence
        of common words at 100k documents). Left out, the documents holding a weighing term come in the same order
        to within that floor; those holding only common words, which they rank above, are missing, so the caller
        falls back to the whole query when this one does not fill its window.
        """
        weighing = [t for t in self.terms if not _weightless(t, self.documents)]
        if not weighing or len(weighing) == len(self.terms):
            return None
        return " OR ".join(t.fts() for t in weighing)

    @property
    def searched(self) -> ParsedQuery:
        """The query as searched (prefixes and corrections applied), for snippets and section scores."""
        terms = [t.term for t in self.terms] + [t.alternative for t in self.terms if t.alternative is not None]
        return ParsedQuery(terms, self.query.text)

    @property
    def doubtful(self) -> bool:
        """Some word is unknown to the index or rare enough to be a typo (see spelling.correct)."""
        return any(t.unknown or t.rare for t in self.terms)

    @property
    def units(self) -> list[Unit]:
        """Every term's re-scoring pieces, in query order."""
        return [unit for term in self.terms for unit in term.units]


def _weightless(term: PlannedTerm, documents: int) -> bool:
    """A single phrase (no alternative, no CJK run: those are several) in half the documents or more: see
    Plan.fts_weighing."""
    return term.alternative is None and term.term.kind != "cjk" and 2 * term.df >= documents > 0


def idf(df: int, documents: int) -> float:
    """BM25's inverse document frequency (the form that never goes below zero)."""
    return math.log(1 + (documents - min(df, documents) + 0.5) / (min(df, documents) + 0.5))


def _keys(term: Term, stems: list[str]) -> tuple[str, ...]:
    """What marks `term` in raw lower-case text, as word starts: for a word, the part its stem shares with it
    ('calling'/'call' -> 'call', 'directory'/'directori' -> 'director')."""
    if term.kind == "cjk":
        return (term.text,)
    if term.kind == "word" and stems:
        shared = os.path.commonprefix([term.text, stems[0]])
        return (shared if len(shared) >= 3 else term.text,)
    return (term.text,)


def _index_text(term: Term) -> str:
    """The text whose tokens are the term's entries in the index (CJK is indexed as bigrams)."""
    return " ".join(bigrams(term.text)) if term.kind == "cjk" and len(term.text) > 1 else term.text


class Vocabulary:
    """What `plan` learned of query terms (their stems, how many documents hold them), kept until the index
    changes: the same words come back query after query."""

    def __init__(self, size: int = VOCABULARY_MEMORY) -> None:
        self.size = size
        self.generation: object = None
        self.documents = 0
        # stems; documents holding it, in meta, and (short words) holding a word starting with it
        self.words: dict[str, tuple[list[str], int, int, int]] = {}
        # a word no document holds (or a rare one): the indexed stems it may be a typo of (see spelling.correct)
        self.near: dict[str, list[tuple[float, str, int]]] = {}

    def at(self, generation: object) -> Vocabulary:
        """This memory, emptied if it was filled at another generation of the index (None: always empty it)."""
        if generation is None or generation != self.generation:
            self.generation, self.documents = generation, 0
            self.words.clear()
            self.near.clear()
        return self

    def remember(self, table: dict[str, T], key: str, value: T) -> None:
        if len(table) >= self.size:
            del table[next(iter(table))]  # the oldest entry
        table[key] = value


META_FIELDS = "{title tags triggers summary}"


def _meta_fts(term: Term) -> str:
    """The term searched in the title, tags, triggers and summary only (CJK text has only the one cjk column)."""
    return term.fts() if term.kind == "cjk" else f"{META_FIELDS} : {term.fts()}"


def _short_fts(term: Term) -> str:
    """For a short word (MIN_PREFIX-5 letters), the words starting with it; else the term itself."""
    short = term.kind == "word" and term.text.isascii() and term.text.isalpha() and MIN_PREFIX <= len(term.text) <= 5
    return Term(term.text, "prefix").fts() if short else term.fts()


def _gram_share(gram: str) -> float:
    """How much a two-character piece of a Chinese run counts: little when it holds a function character, as
    most pieces that straddle two words do ('审的' of '评审的时候')."""
    return CJK_FUNCTION_SHARE if any(char in CJK_FUNCTION for char in gram) else 1.0


def _split(term: Term) -> bool:
    """Whether re-scoring looks for a term as its bigrams (a CJK run of three or more characters)."""
    return term.kind == "cjk" and len(term.text) > 2


async def plan(
    index: SearchIndex, query: ParsedQuery, memory: Vocabulary | None = None, generation: object = None
) -> Plan:
    """Look every term up in the index's vocabulary: how many documents hold it, hence its weight (IDF).

    `memory` keeps what was looked up for later queries while the index stays at `generation`.
    """
    known = (memory or Vocabulary()).at(generation)
    if not known.documents:
        known.documents = await index.document_count()
    documents = known.documents
    if not query.terms:
        return Plan(query, [], documents)
    # Read into a local table: another search may empty the memory while this one waits on the database.
    found = {term.fts(): known.words[term.fts()] for term in query.terms if term.fts() in known.words}
    missing = [term for term in query.terms if term.fts() not in found]
    if missing:
        stems = await index.stems([_index_text(term) for term in missing])
        # How many documents hold each term, how many hold it in their title, tags, triggers or summary, and, for a
        # short word, how many hold a word starting with it.
        expressions = [e for term in missing for e in (term.fts(), _meta_fts(term), _short_fts(term))]
        counts = await index.document_counts(expressions, documents)
        for number, (term, tokens) in enumerate(zip(missing, stems, strict=True)):
            found[term.fts()] = (tokens, counts[3 * number], counts[3 * number + 1], counts[3 * number + 2])
            known.remember(known.words, term.fts(), found[term.fts()])
    pieces = {gram: Term(gram, "cjk").fts() for term in query.terms if _split(term) for gram in bigrams(term.text)}
    unknown = [gram for gram, fts in pieces.items() if fts not in found and fts not in known.words]
    if unknown:
        counts = await index.document_counts([pieces[gram] for gram in unknown], documents)
        for gram, count in zip(unknown, counts, strict=True):
            found[pieces[gram]] = ([gram], count, count, 0)
            known.remember(known.words, pieces[gram], found[pieces[gram]])
    found |= {fts: known.words[fts] for fts in pieces.values() if fts not in found and fts in known.words}
    planned = []
    for term in query.terms:
        tokens, df, in_meta, as_prefix = found[term.fts()]
        note = ""
        if df and as_prefix >= SHORT_WORD_RATIO * df:
            # Mostly seen as the start of longer words ('proc' of 'process'): read as such (exact matches included).
            term, df, in_meta, note = Term(term.text, "prefix"), as_prefix, as_prefix, "prefix"
        units: list[Unit] = []
        if _split(term):
            # The run weighs as much as one of its bigrams on average, shared among them by their rarity: a long
            # Chinese sentence must not outweigh the rest of the query by its length.
            grams = [gram for gram in dict.fromkeys(bigrams(term.text)) if pieces[gram] in found]
            rarity = [idf(found[pieces[gram]][1], documents) * _gram_share(gram) / len(grams) for gram in grams]
            units = [Unit((gram,), weight, weight) for gram, weight in zip(grams, rarity, strict=True)]
        planned.append(
            PlannedTerm(
                term,
                term.text,
                df,
                idf(df, documents),
                _keys(term, tokens),
                tokens[0] if tokens else term.text,
                note,
                meta_idf=idf(in_meta, documents),
                units=units,
            )
        )
    return Plan(query, planned, documents)


@dataclass
class Ranked:
    """A ranked document row, its final score (higher is better), the parts of that score (each 0-1) and, for
    the re-scored candidates, the opening of its body."""

    row: SearchRow
    score: float
    body: Body | None = None
    parts: dict[str, float] = field(default_factory=dict)
    found: list[str] = field(default_factory=list)
    around: int | None = None  # where the query's words are densest in `body`, for the snippet


def rescore(plan: Plan, item: Ranked, query_plain: str, proximity: bool = True) -> None:
    """Fill in the parts of a candidate's score (each 0-1; see the module docstring), the terms it holds and where
    its snippet should start. `query_plain` is the query as trigger matching reads it; without `proximity` (its
    weight is 0) that part is not worked out."""
    row, body = item.row, item.body.text if item.body else ""
    alternates = item.body.alternates if item.body else ""
    tags, triggers = json.dumps(row.tags, ensure_ascii=False), json.dumps(row.triggers, ensure_ascii=False)
    meta = " ".join((row.title, tags, triggers, row.summary, alternates)).lower()
    text = body.lower()
    per_unit: list[list[int]] = []
    covered = in_meta = 0.0
    item.found = []
    for term in plan.terms:
        cjk = term.term.kind == "cjk"
        held = False
        for unit in term.units:
            head = [at for key in unit.keys for at in word_starts(meta, key, cjk)]
            starts = sorted(at for key in unit.keys for at in word_starts(text, key, cjk))
            # Proximity reads the meta fields as a first paragraph, far enough from the text not to run into it.
            per_unit.append([at - len(meta) - META_GAP for at in sorted(head)] + starts if META_PROXIMITY else starts)
            if head or starts:
                covered += unit.weight
                held = True
            in_meta += unit.meta_weight if head else 0.0
        if held:
            item.found.append(term.describe())
    units = plan.units
    total = sum(unit.weight for unit in units) or 1.0
    meta_total = sum(unit.meta_weight for unit in units) or 1.0
    weights = [unit.weight for unit in units]
    if not proximity or len(weights) == 1:
        together = covered / total
    else:
        together = pair_proximity(per_unit, weights, len(per_unit) <= ALL_TERMS_FIRST)
    triggered = trigger_matches(plan.query.text, row.triggers, query_plain)
    item.parts = {
        "bm25": item.parts["bm25"],
        "coverage": covered / total,
        "proximity": together,
        "meta": in_meta / meta_total,
        "triggers": min(triggered, 2) / 2,
        "sequence": in_order(per_unit) if proximity else 0.0,
    }
    # Lower-casing keeps offsets for all but a few letters (e.g. 'İ'); where it does not, snippets look again.
    item.around = densest(per_unit, SNIPPET_WIDTH) if len(text) == len(body) else None


def explain_hit(item: Ranked, fields: dict[str, float]) -> ScoreExplanation:
    """Why `item` ranked where it did: its BM25 (whole and per field) and the parts of its score."""
    return ScoreExplanation(
        bm25=round(-item.row.score, 4),
        bm25_fields=fields,
        parts={name: round(value, 4) for name, value in item.parts.items()},
        weights=dict(WEIGHTS),
        matched=item.found,
    )


def explain_terms(plan: Plan) -> list[QueryTermExplanation]:
    """The query's terms as searched, with their weights."""
    return [
        QueryTermExplanation(typed=t.typed, searched=t.describe(), documents=t.df, idf=round(t.idf, 4), note=t.note)
        for t in plan.terms
    ]


def _total(parts: dict[str, float], weights: dict[str, float]) -> float:
    """The weighted sum of a score's parts; a part without a weight counts nothing."""
    return sum(weights.get(name, 0.0) * value for name, value in parts.items())


async def candidates(
    index: SearchIndex, plan: Plan, layers: list[str] | None, tags: list[str] | None, window: int
) -> list[SearchRow]:
    """The best `window` documents by BM25 for `plan`, asking first for those that hold every term.

    When enough documents hold every term they are the answer; asking for them first spares BM25 from scoring
    every document that holds any term (most of a large knowledge base when the words are common: 200+ ms at
    100k documents). When fewer do, they are kept and the best documents holding any term are added, asked for
    without the terms BM25 weighs at nothing when the others fill the window (Plan.fts_weighing).
    """
    rows: list[SearchRow] = []
    if 1 < len(plan.terms) <= ALL_TERMS_FIRST:
        rows = await index.rank_documents(plan.fts_all(), layers, tags, window, 0)
        if len(rows) >= ENOUGH_HOLDING_ALL:
            return rows
    seen = {row.key for row in rows}
    found: list[SearchRow] = []
    if (weighing := plan.fts_weighing()) is not None:
        found = await index.rank_documents(weighing, layers, tags, window, 0)
    if len(found) < window:  # fewer documents hold a weighing term: the rest hold only common ones
        found = await index.rank_documents(plan.fts(), layers, tags, window, 0)
    more = [row for row in found if row.key not in seen]
    return sorted([*rows, *more], key=lambda row: row.score)


def close_groups(plan: Plan) -> list[list[str]]:
    """The query's terms as groups that must stand close together (one per choice of each term's alternative), or
    none when the query has one term, more than ALL_TERMS_FIRST, or a CJK run (its own column: see `Term.fts`)."""
    if not 1 < len(plan.terms) <= ALL_TERMS_FIRST:
        return []
    choices = []
    for term in plan.terms:
        options = [term.term] if term.alternative is None else [term.term, term.alternative]
        if any(option.kind == "cjk" for option in options):
            return []
        choices.append([option.fts() for option in options])
    return [list(group) for group in itertools.product(*choices)]


async def _with_close(
    index: SearchIndex,
    plan: Plan,
    layers: list[str] | None,
    tags: list[str] | None,
    rows: list[SearchRow],
    rescored: int,
    proximity: bool,
) -> tuple[list[SearchRow], int]:
    """`rows` with the documents holding the query's words close together (see CLOSE_DISTANCE) that are not among
    the `rescored` best moved up behind them, and how many are to be re-scored now. Only when re-scoring weighs
    `proximity` (otherwise standing close together earns a document nothing), and only when the candidates fill
    the re-scored head: when they do not, every document holding every term is among them already.

    Their BM25 is taken to be the last re-scored row's: ranked below it, theirs is at most that (counting it for
    each would run the all-terms query once per row, seconds for a common prefix at 10k documents)."""
    groups = close_groups(plan)
    if not groups or not proximity or len(rows) < rescored or min(t.df for t in plan.terms) > CLOSE_MAX_DOCUMENTS:
        return rows, rescored
    close = await index.rank_close_together(groups, CLOSE_DISTANCE, layers, tags, CLOSE_CANDIDATES)
    head = rows[:rescored]
    seen = {row.key for row in head}
    extra = [dataclasses.replace(row, score=head[-1].score) for row in close if row.key not in seen]
    if not extra:
        return rows, rescored
    moved = {row.key for row in extra}
    return [*head, *extra, *(row for row in rows[rescored:] if row.key not in moved)], len(head) + len(extra)


async def rank(
    index: SearchIndex,
    plan: Plan,
    layers: list[str] | None,
    tags: list[str] | None,
    limit: int,
    offset: int = 0,
    weights: dict[str, float] | None = None,
    rescored: int | None = None,
) -> list[Ranked]:
    """Documents for `plan`, best first: BM25 candidates, the best `rescored` of them (default CANDIDATES, or
    CORRECTED_CANDIDATES for a plan spelling.correct made) re-scored from their text, with the parts weighed by
    `weights` (default WEIGHTS).

    Past the re-scored head (deep pages) documents follow in BM25 order, scored by their BM25 part alone.
    """
    if not plan.terms:
        return []
    weights = weights or WEIGHTS
    if rescored is None:
        rescored = CANDIDATES if plan.corrected is None else CORRECTED_CANDIDATES
    rows = await candidates(index, plan, layers, tags, max(rescored, offset + limit))
    proximity = weights["proximity"] > 0
    rows, rescored = await _with_close(index, plan, layers, tags, rows, rescored, proximity)
    best = max((-row.score for row in rows), default=0.0)
    ranked = [Ranked(row, 0.0, parts={"bm25": -row.score / best if best > 0 else 0.0}) for row in rows]
    head = ranked[:rescored]
    texts = await index.bodies([item.row.key for item in head])
    query_plain = _normalized(plan.query.text)
    for item in head:
        item.body = texts.get(item.row.key, Body("", 0, 0))
        rescore(plan, item, query_plain, proximity)
    for item in ranked:
        item.score = _total(item.parts, weights)
    head.sort(key=lambda item: (-item.score, item.row.score))
    ranked[:rescored] = head
    return ranked[offset : offset + limit]


async def field_scores(index: SearchIndex, plan: Plan, keys: list[int]) -> dict[int, dict[str, float]]:
    """BM25 of each document in `keys` counting one field at a time (with that field's weight), for --explain.

    BM25 saturates, so the fields' figures do not add up exactly to the whole.
    """
    if not keys or not plan.terms:
        return {}
    return await index.field_scores(plan.fts(), keys)


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


# Section scores look for at most this many terms.
PATTERN_TERMS = 16


def term_patterns(query: ParsedQuery) -> list[re.Pattern[str]]:
    """One case-insensitive pattern per query term, for finding the terms in raw text."""
    return [re.compile("|".join(_term_pieces(t)), re.IGNORECASE) for t in query.terms[:PATTERN_TERMS]]


def _patterns(query: ParsedQuery) -> list[str]:
    pieces = {piece for term in query.terms for piece in _term_pieces(term)}
    return sorted(pieces, key=len, reverse=True)  # longest first: a stem must not cut a longer match short


def make_snippet(body: str, query: ParsedQuery, width: int = SNIPPET_WIDTH, around: int | None = None) -> str | None:
    """The window of `body` that holds the most distinct query words (starting near `around` when ranking found
    it already), with each match in **bold**.

    Built here rather than with FTS5's snippet(), whose cost grows with the size of the document and the number
    of matches in it (seconds for a few large documents full of the query's words).
    """
    pieces = _patterns(query)
    if not pieces:
        return None
    finder = re.compile("|".join(pieces), re.IGNORECASE)
    text = body[:SNIPPET_SCAN_CHARS]
    if around is not None:
        best_at = around
    else:
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


def describe(term: Term) -> str:
    """A term as a person would type it."""
    if term.kind == "prefix":
        return term.text + "*"
    if term.kind == "phrase":
        return f'"{term.text}"'
    return term.text


def to_hit(ranked: Ranked, snippet: str) -> SearchHit:
    """A search hit from a ranked row whose body was read."""
    row = ranked.row
    assert ranked.body is not None
    return SearchHit(
        id=row.id,
        title=row.title,
        layer=row.layer,
        tags=row.tags,
        score=round(ranked.score, 4),
        snippet=" ".join(snippet.split()),  # one line: Markdown line breaks mean nothing in an excerpt
        tokens=ranked.body.tokens,
        revision=ranked.body.revision,
    )
