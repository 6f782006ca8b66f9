"""Words no document holds, or only one or two: read as the start of longer words ('direc' -> direc*) or as typos
of the closest indexed words ('clsed' -> closed), weighed by how common each reading is and how often it is found
with the query's other words. `correct` turns a search.Plan into the plan searched instead."""

from __future__ import annotations

import math

from sage_server.search import MIN_PREFIX, Plan, PlannedTerm, Term, Vocabulary, idf
from sage_server.store.search_index import SearchIndex

# Equally close corrections weighed against the query's other words.
CORRECTION_CHOICES = 5
# A word only a document or two hold (search.RARE_DOCUMENTS) is searched beside one at least this many times as
# common one or two edits away.
RARE_RATIO = 50
# One edit weighs as much as this (natural) log of how many more documents use a word.
EDIT_COST = 2.0
# A second correction at most this much less likely (as weighed by `_best_fix`) is searched beside the first.
CLOSE_FIX = 2.0
# How much the share of a correction's documents that hold the query's other words counts (as a log).
CONTEXT_WEIGHT = 1.0


def bounded_edit_distance(a: str, b: str, limit: int) -> int:
    """Levenshtein distance of `a` and `b` when it is at most `limit`, else `limit + 1` (computed in a band)."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [limit + 1] * len(b)
        low, high = max(1, i - limit), min(len(b), i + limit)
        for j in range(low, high + 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != b[j - 1]))
        if min(current) > limit:
            return limit + 1
        previous = current
    return min(previous[-1], limit + 1)


def _neighbour_starts(word: str) -> list[str]:
    """The first three letters of every word one edit away from `word`: a closest indexed word starts with one
    of them, so the vocabulary is read in a few small ranges instead of whole."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    head = word[:4]
    variants = {head}
    for at in range(len(head) + 1):
        variants.update(head[:at] + c + head[at:] for c in letters)  # a letter lost in typing
        if at < len(head):
            variants.add(head[:at] + head[at + 1 :])  # a letter typed twice or by mistake
            variants.update(head[:at] + c + head[at + 1 :] for c in letters)
        if at < len(head) - 1:
            variants.add(head[:at] + head[at + 1] + head[at] + head[at + 2 :])
    return sorted({v[:3] for v in variants if len(v) >= 3} | {word[:3]})


# Endings Porter's stemmer takes off English words: an indexed stem ('oper') stands for the words made by adding
# one back ('operation', 'operating'), and a typo is compared with those.
ENDINGS = (
    "",
    *"""e s es d ed ing ings er ers ion ions ation ations ational ly al ally ment ments ness ity ities ive
    ively ous able ible ize ized izes ization ise ate ates ated ating ator ance ence ent ant ism ist ingly ful fully
    less ic ical ically ics ure ary ory age""".split(),
)


def _distance(word: str, candidate: str, limit: int) -> int:
    """Edits between a typed word and the closest word an indexed stem stands for (see ENDINGS), at most limit+1."""
    bases = [candidate]
    if candidate.endswith("i"):
        bases.append(candidate[:-1] + "y")  # Porter writes 'empty' as 'empti'
    best = limit + 1
    for base in bases:
        for ending in ENDINGS:
            if abs(len(base) + len(ending) - len(word)) <= limit:
                best = min(best, bounded_edit_distance(word, base + ending, limit))
                if best == 0:
                    return 0
    return best


async def _closest(index: SearchIndex, word: str, known: Vocabulary) -> list[tuple[float, str, int]]:
    """Indexed stems that may stand for `word` (at most 1 edit for words up to 5 letters, 2 above), likeliest
    first: (how unlikely, stem, documents holding it). An edit weighs as much as a factor of e^2 in use.

    Remembered in `known` until the index changes: the edit distances are pure Python on the event loop, and
    at 100k documents a word has hundreds of neighbours (a context task's rare words came back task after task
    and cost a quarter of the loop's time under load)."""
    if word in known.near:
        return known.near[word]
    limit = 1 if len(word) <= 5 else 2
    rows = await index.vocabulary_near(_neighbour_starts(word), len(word) + limit)
    found = []
    for candidate, docs in rows:
        distance = _distance(word, candidate, limit)
        if distance <= limit:
            found.append((EDIT_COST * distance - math.log(docs + 1), candidate, docs))
    found.sort()
    known.remember(known.near, word, found)
    return found


async def _together(index: SearchIndex, fts: str) -> int:
    """How many documents match `fts`, counted up to 1,000."""
    return await index.count_matches(fts, 1000)


async def _best_fix(
    index: SearchIndex, choices: list[tuple[float, str, int]], others: list[Term]
) -> list[tuple[Term, int]]:
    """The likeliest of the closest stems, judged also by how often each is found with the query's other words
    (relative to how common it is): 'clsed file' reads 'closed', not 'cased'. A runner-up nearly as likely
    (within CLOSE_FIX) follows it, to be searched beside it: one wrong guess must not lose the page.

    Each stem is searched as itself when the index's stemmer leaves it as it is, else as the start of words
    (a short stem searched as a prefix, 'inf*', would match every word that starts with it)."""
    head = choices[:CORRECTION_CHOICES]
    stemmed = await index.stems([stem for _, stem, _ in head])
    terms = [_fix_term(stem, tokens) for (_, stem, _), tokens in zip(head, stemmed, strict=True)]
    rest = " AND ".join(term.fts() for term in others)
    weighed = []
    for (cost, _, docs), term in zip(head, terms, strict=True):
        if rest and len(head) > 1:
            share = await _together(index, f"{term.fts()} AND {rest}") / max(docs, 1)
            cost -= CONTEXT_WEIGHT * math.log(min(share, 1.0) + 0.01)
        weighed.append((cost, term, docs))
    weighed.sort(key=lambda item: item[0])
    return [(term, docs) for cost, term, docs in weighed[:2] if cost - weighed[0][0] <= CLOSE_FIX]


def _fix_term(stem: str, tokens: list[str]) -> Term:
    """An indexed stem as a query term: the word itself when the stemmer keeps it, else its start."""
    return Term(stem, "word") if tokens == [stem] else Term(stem, "prefix")


async def _maybe_typo(
    index: SearchIndex, term: PlannedTerm, documents: int, others: list[Term], known: Vocabulary
) -> PlannedTerm:
    """`term` (a rare word) with a far more common word one or two edits away as its alternative, if there is one."""
    near = await _closest(index, term.term.text, known)
    choices = [c for c in near if c[1] != term.stem and c[2] >= RARE_RATIO * term.df]
    if not choices:
        return term
    [(fix, df), *_] = await _best_fix(index, choices, [t for t in others if t is not term.term])
    both = min(documents, term.df + df)
    return PlannedTerm(
        term.term,
        term.typed,
        both,
        idf(both, documents),
        term.keys + _stem_keys(fix.text),
        term.stem,
        "or",
        fix,
    )


def _stem_keys(stem: str) -> tuple[str, ...]:
    """Word starts for an indexed stem in raw text ('empti' is written 'empty')."""
    return (stem, stem[:-1] + "y") if stem.endswith("i") and len(stem) > 3 else (stem,)


async def correct(
    index: SearchIndex, plan: Plan, memory: Vocabulary | None = None, generation: object = None
) -> Plan | None:
    """Read the words no document holds: as the start of longer words when some indexed word begins with them
    ('direc' -> direc*), else as a typo of the closest indexed word. None when no word changed. `memory` and
    `generation` are search.plan's: what was learned is kept until the index changes."""
    known = (memory or Vocabulary()).at(generation)
    changed = False
    terms: list[PlannedTerm] = []
    others = [term.term for term in plan.terms if term.df > 0]
    for term in plan.terms:
        word = term.term.text
        if term.rare:
            terms.append(await _maybe_typo(index, term, plan.documents, others, known))
            changed = changed or terms[-1].alternative is not None
            continue
        if not term.unknown or len(word) < MIN_PREFIX:
            terms.append(term)
            continue
        as_prefix = Term(word, "prefix")
        [df] = await index.document_counts([as_prefix.fts()], plan.documents)
        if df:
            terms.append(PlannedTerm(as_prefix, word, df, idf(df, plan.documents), (word,), term.stem, "prefix"))
            changed = True
            continue
        choices = await _closest(index, word, known)
        if not choices:
            terms.append(term)
            continue
        fixes = await _best_fix(index, choices, others)
        (fix, df), second = fixes[0], fixes[1:]
        keys = _stem_keys(fix.text)
        if second:
            df = min(plan.documents, df + second[0][1])
            keys += _stem_keys(second[0][0].text)
        terms.append(
            PlannedTerm(
                fix,
                word,
                df,
                idf(df, plan.documents),
                keys,
                fix.text,
                "corrected",
                second[0][0] if second else None,
            )
        )
        changed = True
    if not changed:
        return None
    return Plan(plan.query, terms, plan.documents, " ".join(t.describe() for t in terms))
