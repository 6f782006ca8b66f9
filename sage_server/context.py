"""Task context: the core essentials plus the best-matching sections, packed under a token budget.

The packer ranks documents for the task (weighing titles, tags, triggers and summaries most: a task description
is long, and the words that name its subject are the ones a document's metadata carries), takes the best sections
of the best documents, and packs them best first. It spends the budget on what matters rather than filling it:
a document far behind the best, or a section worth or matching far less than the best one, is left out; a document
behind the best gives one short section, in case the ranking is wrong; sections that only list links are never
packed; and once a section does not fit, nothing after it is packed, so a weaker section never takes the place of a
better one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass

from sage_server.markdown import headings
from sage_server.models import ContextResult, ContextSection, OmittedSection
from sage_server.search import ParsedQuery, Plan, Ranked, rank, term_patterns
from sage_server.store.records import SectionText
from sage_server.store.search_index import SearchIndex
from sage_server.text import estimate_tokens

TOP_DOCUMENTS = 4
# How the packer weighs the parts of a document's score for a task (search.WEIGHTS has the same parts).
TASK_WEIGHTS = {"bm25": 0.3, "coverage": 0.1, "proximity": 0.0, "meta": 0.5, "triggers": 0.1}
# How many of the best BM25 documents the packer re-scores (it packs from a few of them).
TASK_CANDIDATES = 30
# A document whose score is below this share of the best one is not worth the budget.
RELATIVE_SCORE_FLOOR = 0.4
SECTIONS_PER_DOCUMENT = 5
SECTION_DECAY = 0.8
# Documents scoring at least this share of the best one give up to SECTIONS_PER_DOCUMENT sections, the others one:
# the shortest of their sections matching at least TRAILING_MATCH_SHARE as well as their best.
LEADING_SHARE = 0.8
TRAILING_MATCH_SHARE = 0.3
# A section matching the task less than this share as well as the best-matching section is left out.
SECTION_MATCH_FLOOR = 0.3
# A section worth less than this share of the best section's worth is left out even when it would fit.
SECTION_VALUE_FLOOR = 0.3
ESSENTIALS_SHARE = 0.2
# The packer writes each section under a heading of this level; headings inside a section go below it.
PACKED_LEVEL = 3
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
_LINK = re.compile(r"\[[^\]]*\]\([^)]*\)|<[a-z][a-z0-9+.-]*:[^>]*>", re.IGNORECASE)


@dataclass
class Candidate:
    """A section that could go into the context."""

    doc_rank: int
    doc_id: str
    title: str
    layer: str
    revision: int
    ord: int
    heading: str
    text: str

    def render(self) -> str:
        label = f"{self.title} › {self.heading}" if self.heading and self.heading != self.title else self.title
        return f"### {label}\n_Source: sage:{self.doc_id} (revision {self.revision})_\n\n{self.text.strip()}\n"

    @functools.cached_property
    def cost(self) -> int:
        """Tokens this section takes in the packed text. Worked out once: the same candidates are packed again at
        smaller budgets until an MCP answer fits (bounded.context_within), and a candidate is never changed."""
        return estimate_tokens(self.render() + "\n")


def _strip_heading(text: str) -> str:
    first, _, rest = text.partition("\n")
    return rest if first.lstrip().startswith("#") else text


def only_links(text: str) -> bool:
    """True for a section that is nothing but a list of links ('See also', 'Related'): no use to read on its own."""
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and all(_LIST_ITEM.match(line) and _LINK.search(line) for line in lines)


def nest(text: str, below: int = PACKED_LEVEL) -> str:
    """`text` with its headings moved down so the highest is one level below `below` (capped at 6), their order
    of levels kept: a packed section's own subheadings stay inside it."""
    found = headings(text)
    if not found:
        return text
    shift = max(0, below + 1 - min(level for _, level, _ in found))
    if not shift:
        return text
    # Sections are cut at levels 1-2, so what is inside one is ATX (setext headings have only those two levels).
    for offset, level, title in reversed(found):
        end = text.find("\n", offset)
        end = len(text) if end < 0 else end
        text = text[:offset] + "#" * min(6, level + shift) + " " + title + text[end:]
    return text


async def essentials(index: SearchIndex, layer: str) -> list[str]:
    """One line per live document of the core layer: title, id and summary."""
    return [f"- **{r.title}** (`{r.id}`): {r.summary}".rstrip(": ") for r in await index.essentials(layer)]


def _section_scores(query: ParsedQuery, rows: list[SectionText]) -> list[float]:
    """How well each section answers the query: every query word found counts by how rare it is among these
    sections (a word in all of them tells nothing) and how often it occurs; in the heading it counts double."""
    patterns = term_patterns(query)
    counts = [[len(p.findall(row.text)) for p in patterns] for row in rows]
    in_heading = [[bool(p.search(row.heading)) for p in patterns] for row in rows]
    spread = [sum(1 for c in counts if c[t]) for t in range(len(patterns))]
    weights = [math.log(1 + len(rows) / (1 + n)) for n in spread]
    return [
        sum(w * (math.log(1 + c) + 2 * h) for w, c, h in zip(weights, row_counts, heads, strict=True))
        for row_counts, heads in zip(counts, in_heading, strict=True)
    ]


async def _sections(index: SearchIndex, query: ParsedQuery, ranked: list[Ranked]) -> list[Candidate]:
    docs = {r.row.key: (i, r) for i, r in enumerate(ranked)}
    rows = await index.sections_of(list(docs))
    scores = _section_scores(query, rows) if rows else []
    best: dict[int, list[tuple[float, SectionText]]] = {}
    for row, score in zip(rows, scores, strict=True):
        if not only_links(_strip_heading(row.text)):
            best.setdefault(row.doc_key, []).append((score, row))
    ordered: list[tuple[float, int, Candidate]] = []
    lead = max(doc.score for _, doc in docs.values())
    # A section that matches the task far less than the best-matching section is not worth its tokens.
    fit = max((score for sections in best.values() for score, _ in sections), default=0.0) * SECTION_MATCH_FLOOR
    for key, readable in best.items():
        rank, doc = docs[key]
        matching = sorted((item for item in readable if item[0] > 0 and item[0] >= fit), key=lambda item: -item[0])
        # Only a document about as good as the best gives more than its best section: the others are packed in
        # case the ranking is wrong, and one section shows the reader what they hold.
        allowed = SECTIONS_PER_DOCUMENT if doc.score >= lead * LEADING_SHARE else 1
        if allowed == 1 and matching:
            # That one section is the shortest of those matching nearly as well as its best: it is there to show
            # what the document holds, at the least cost to the budget.
            near = [item for item in matching if item[0] >= matching[0][0] * TRAILING_MATCH_SHARE]
            matching = [min(near, key=lambda item: len(item[1].text))]
        # A document found by its triggers or tags may have no matching section: offer its opening section.
        chosen = matching[:allowed] or readable[:1]
        for nth, (_, row) in enumerate(chosen):
            candidate = Candidate(
                doc_rank=rank,
                doc_id=doc.row.id,
                title=doc.row.title,
                layer=doc.row.layer,
                revision=doc.body.revision if doc.body else 0,
                ord=row.ord,
                heading=row.heading,
                text=nest(_strip_heading(row.text)),
            )
            # A document's n-th best section is worth its document's score times SECTION_DECAY**n: a strong
            # document gives several sections before a weak one gives its first.
            ordered.append((doc.score * SECTION_DECAY**nth, rank, candidate))
    ordered.sort(key=lambda item: (-item[0], item[1]))
    best_value = ordered[0][0] if ordered else 0.0
    return [c for value, _, c in ordered if value >= best_value * SECTION_VALUE_FLOOR]


def _truncate(text: str, budget: int) -> str:
    """Cut `text` at a paragraph (else a line) boundary so that it costs at most `budget` tokens."""
    note = "\n\n_(section truncated to fit the token budget)_"
    cut = text
    while cut and estimate_tokens(cut + note) > budget:
        boundary = max(cut.rfind("\n\n", 0, len(cut) - 1), cut.rfind("\n", 0, len(cut) - 1))
        cut = cut[:boundary] if boundary > 0 else cut[: len(cut) * 3 // 4]
    return cut.rstrip() + note if cut.strip() else ""


async def candidates(index: SearchIndex, plan: Plan, layers: list[str] | None) -> list[Candidate]:
    """The sections worth reading for `plan`, best first: the top documents' best-matching sections."""
    ranked = await rank(index, plan, layers, None, TOP_DOCUMENTS, weights=TASK_WEIGHTS, rescored=TASK_CANDIDATES)
    if not ranked:
        return []
    ranked = [r for r in ranked if r.score >= ranked[0].score * RELATIVE_SCORE_FLOOR]
    return await _sections(index, plan.searched, ranked)


def assemble(task: str, max_tokens: int, lines: list[str], found: list[Candidate]) -> ContextResult:
    """Pack the essentials `lines` and the `found` sections into `max_tokens` (by the estimator in text.py)."""
    header = f"# Context for: {task.strip()[:200]}\n\n"
    essentials_text = ""
    if lines:
        essentials_budget = int(max_tokens * ESSENTIALS_SHARE)
        block = "## Core principles\n"
        for line in lines:
            if estimate_tokens(block + line + "\n") > essentials_budget:
                break
            block += line + "\n"
        if block != "## Core principles\n":
            essentials_text = block + "\n"

    chosen: list[Candidate] = []
    omitted: list[OmittedSection] = []
    text = header + essentials_text + "## Relevant knowledge\n\n"
    used = estimate_tokens(text)
    full = False
    for candidate in found:
        cost = candidate.cost
        if not full and used + cost <= max_tokens:
            chosen.append(candidate)
            used += cost
            continue
        # Past the first section that does not fit, nothing is packed: a weaker section must not take its place.
        full = True
        if not chosen:
            # The best section alone is larger than the budget: give its beginning rather than nothing.
            overhead = dataclasses.replace(candidate, text="").cost
            cut = _truncate(candidate.text, max_tokens - used - overhead)
            if cut:
                omitted.append(OmittedSection(id=candidate.doc_id, heading=candidate.heading, tokens=cost))
                # A copy: the candidates may be packed again at another budget.
                shortened = dataclasses.replace(candidate, text=cut)
                chosen.append(shortened)
                used += shortened.cost
                continue
        omitted.append(OmittedSection(id=candidate.doc_id, heading=candidate.heading, tokens=cost))

    chosen.sort(key=lambda c: (c.doc_rank, c.ord))
    body = "".join(c.render() + "\n" for c in chosen) if chosen else "_No matching knowledge found._\n"
    if not chosen and estimate_tokens(text + body) > max_tokens:
        body = ""
    text = (text + body).rstrip() + "\n"
    sections = [
        ContextSection(
            id=c.doc_id,
            title=c.title,
            layer=c.layer,
            heading=c.heading or c.title,
            revision=c.revision,
            tokens=estimate_tokens(c.render()),
            text=c.text.strip(),
        )
        for c in chosen
    ]
    return ContextResult(
        task=task,
        max_tokens=max_tokens,
        tokens_used=estimate_tokens(text),
        essentials=essentials_text.strip(),
        sections=sections,
        omitted=omitted,
        text=text,
    )
