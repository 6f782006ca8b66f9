"""Judged queries made mechanically from the corpus, and the committed file that keeps them reproducible.

Kinds (one page each is the expected answer, with every page of the same language sharing its NAME line):
- `description`: the NAME line's description ("list directory contents");
- `sentence`: one sentence from the DESCRIPTION section or an option's description;
- `three_words`: three random content words of one such sentence, in their order;
- `misspelt`: the same with one word (5+ letters) misspelt by one edit into a word the corpus does not hold;
- `prefix`: the same with one word (6+ letters) cut to its first 4 or 5 letters;
- `chinese`: a run of 4 Chinese characters found in one Chinese page only.

Pages are split at random into a tuning half and a held-out half; a query belongs to the half of its page.
The file records the package versions and each page's checksum: a query whose page changed or vanished since is
skipped (and counted), so the set stays reproducible as Debian moves.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KINDS = ("description", "sentence", "three_words", "misspelt", "prefix", "chinese")
HALVES = ("tune", "held_out")
PER_KIND = 300
SEED = 13
# A sentence query has this many words; three-word queries come from sentences with at least three content words.
SENTENCE_WORDS = (6, 30)
# Function words of English: not "content words".
STOPWORDS = frozenset(
    """a about above after again against all also an and any are as at be because been before being below
    between both but by can could did do does doing down during each either else few for from further had has
    have having he her here hers him his how however if in into is it its itself may might more most must my
    neither no nor not of off on once only or other otherwise our out over own same shall she should since so
    some such than that the their them then there these they this those though through thus to too under
    until up upon us very via was we were what when where whether which while who whom whose why will with
    within without would yet you your""".split()
)
_HAN = re.compile(r"[\u4e00-\u9fff]{4,}")
_MARKS = re.compile(r"\*\*|(?<!\w)\*|\*(?!\w)|`")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_WORD = re.compile(r"^[A-Za-z]+$")


@dataclass
class Page:
    """A corpus page as the generator sees it."""

    path: str  # relative to the corpus root, e.g. en/man1/ls.1.md
    language: str
    text: str
    sections: dict[str, str] = field(default_factory=dict)

    @property
    def name_line(self) -> str:
        """The NAME section's text (the first section, whatever its heading says)."""
        return " ".join(next(iter(self.sections.values()), "").split())

    @property
    def description(self) -> str:
        """The NAME line after its dash ('list directory contents'), or '' when it has none."""
        for dash in (" - ", " — ", " -- ", " – "):
            if dash in self.name_line:
                return self.name_line.split(dash, 1)[1].strip()
        return ""


def checksum(text: str) -> str:
    """The checksum recorded for a page: sha256 of its Markdown, shortened."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_pages(root: Path) -> list[Page]:
    """Every Markdown page under `root`, cut into its `##` sections."""
    pages = []
    for path in sorted(root.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        relative = path.relative_to(root).as_posix()
        sections: dict[str, str] = {}
        heading = None
        for line in text.splitlines():
            if line.startswith("## "):
                heading = line[3:].strip()
                sections.setdefault(heading, "")
            elif heading is not None:
                sections[heading] += line + "\n"
        pages.append(Page(relative, relative.split("/", 1)[0], text, sections))
    return pages


def _plain(text: str) -> str:
    return " ".join(_MARKS.sub("", text).split())


def sentences(page: Page) -> list[str]:
    """Sentences of the page's DESCRIPTION and OPTIONS sections: prose paragraphs and option descriptions."""
    found = []
    for heading, body in page.sections.items():
        if heading.upper() not in ("DESCRIPTION", "OPTIONS"):
            continue
        in_code = False
        for block in re.split(r"\n\s*\n", body):
            stripped = block.strip()
            if stripped.startswith("```"):
                in_code = not stripped.endswith("```") or stripped == "```"
                continue
            if in_code or not stripped or stripped.startswith(("|", "- **", "#")):
                continue  # code, tables and option names are not sentences
            for sentence in _SENTENCE_END.split(_plain(stripped)):
                words = sentence.split()
                if SENTENCE_WORDS[0] <= len(words) <= SENTENCE_WORDS[1] and sentence[-1] in ".!?:":
                    found.append(sentence)
    return found


def content_words(sentence: str) -> list[str]:
    """Distinct content words of `sentence`, lower-cased, in order: letters only, 3+ letters, no function words."""
    words = []
    for token in sentence.split():
        word = token.strip(".,;:!?()[]\"'").lower()
        if _WORD.match(word) and len(word) >= 3 and word not in STOPWORDS and word not in words:
            words.append(word)
    return words


def misspell(word: str, rng: random.Random, vocabulary: set[str]) -> str | None:
    """`word` with one random edit (delete, insert or replace one letter) that makes no word of the corpus."""
    for _ in range(20):
        at = rng.randrange(len(word))
        edit = rng.choice(("delete", "insert", "replace"))
        letter = rng.choice(string.ascii_lowercase)
        if edit == "delete":
            typo = word[:at] + word[at + 1 :]
        elif edit == "insert":
            typo = word[:at] + letter + word[at:]
        else:
            typo = word[:at] + letter + word[at + 1 :]
        if typo != word and typo not in vocabulary:
            return typo
    return None


@dataclass
class Generated:
    """Queries and the record of the corpus they were made from."""

    queries: list[dict[str, Any]]
    pages: dict[str, str]


def generate(pages: list[Page], seed: int = SEED, per_kind: int = PER_KIND) -> Generated:
    """`per_kind` queries of every kind, each with its half and relevant pages (paths), made with `seed`."""
    rng = random.Random(seed)
    by_path = {page.path: page for page in pages}
    order = sorted(by_path)
    rng.shuffle(order)
    half = {path: HALVES[number % 2] for number, path in enumerate(order)}
    sharing: dict[tuple[str, str], list[str]] = defaultdict(list)
    for page in pages:
        key = " ".join(page.description.lower().split())
        if key:
            sharing[page.language, key].append(page.path)

    def relevant(page: Page) -> list[str]:
        key = " ".join(page.description.lower().split())
        return sorted(sharing[page.language, key]) if key else [page.path]

    queries: list[dict[str, Any]] = []

    def add(kind: str, text: str, page: Page) -> None:
        queries.append({"query": text, "kind": kind, "half": half[page.path], "relevant": relevant(page)})

    english = [by_path[p] for p in order if by_path[p].language == "en"]
    chinese = [by_path[p] for p in order if by_path[p].language == "zh"]
    vocabulary = {word.lower() for page in english for word in re.findall(r"[A-Za-z]+", page.text)}

    described = [page for page in english if len(page.description.split()) >= 2]
    for page in rng.sample(described, min(per_kind, len(described))):
        add("description", page.description, page)

    with_sentences = [(page, sentences(page)) for page in english]
    with_sentences = [(page, found) for page, found in with_sentences if found]
    for page, found in rng.sample(with_sentences, min(per_kind, len(with_sentences))):
        add("sentence", rng.choice(found), page)

    counts = dict.fromkeys(("three_words", "misspelt", "prefix"), 0)
    pool = list(with_sentences)
    rng.shuffle(pool)
    for page, found in pool * 3:
        if min(counts.values()) >= per_kind:
            break
        words = content_words(rng.choice(found))
        if len(words) < 3:
            continue
        picked = [words[i] for i in sorted(rng.sample(range(len(words)), 3))]
        if counts["three_words"] < per_kind:
            add("three_words", " ".join(picked), page)
            counts["three_words"] += 1
        long_enough = [i for i, word in enumerate(picked) if len(word) >= 5]
        if long_enough and counts["misspelt"] < per_kind:
            at = rng.choice(long_enough)
            typo = misspell(picked[at], rng, vocabulary)
            if typo:
                add("misspelt", " ".join([*picked[:at], typo, *picked[at + 1 :]]), page)
                counts["misspelt"] += 1
        longer = [i for i, word in enumerate(picked) if len(word) >= 6]
        if longer and counts["prefix"] < per_kind:
            at = rng.choice(longer)
            cut = rng.choice([n for n in (4, 5) if n <= len(picked[at]) - 2])
            add("prefix", " ".join([*picked[:at], picked[at][:cut], *picked[at + 1 :]]), page)
            counts["prefix"] += 1

    owners: dict[str, set[str]] = defaultdict(set)
    for page in chinese:
        for run in _HAN.findall(page.text):
            for start in range(len(run) - 3):
                owners[run[start : start + 4]].add(page.path)
    for page in chinese:
        if sum(1 for q in queries if q["kind"] == "chinese") >= per_kind:
            break
        unique = sorted({gram for gram, paths in owners.items() if paths == {page.path}} & _grams(page.text))
        if unique:
            add("chinese", rng.choice(unique), page)
    return Generated(queries=queries, pages={page.path: checksum(page.text) for page in pages})


def _grams(text: str) -> set[str]:
    return {run[i : i + 4] for run in _HAN.findall(text) for i in range(len(run) - 3)}


HEADER = (
    "# Judged queries over Debian's manual pages, made by `python -m tests.external_eval --regenerate`: do not edit.\n"
    "# `relevant` names pages by their path in the corpus; `pages` holds each page's checksum when the set was made.\n"
)


def write(path: Path, generated: Generated, versions: dict[str, str], seed: int) -> None:
    """Write the queries file."""
    data = {
        "seed": seed,
        "packages": versions,
        "pages": generated.pages,
        "queries": generated.queries,
    }
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=120)
    path.write_text(HEADER + text, encoding="utf-8")


@dataclass
class Loaded:
    """The committed queries that still hold on this corpus, and why the others were skipped."""

    queries: list[dict[str, Any]]
    packages: dict[str, str]
    changed: int = 0
    vanished: int = 0
    new_pages: int = 0


def load(path: Path, pages: list[Page]) -> Loaded:
    """The queries of the file at `path` whose relevant pages are unchanged in `pages`."""
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    recorded: dict[str, str] = data["pages"]
    current = {page.path: checksum(page.text) for page in pages}
    result = Loaded(queries=[], packages=data["packages"], new_pages=len(set(current) - set(recorded)))
    for query in data["queries"]:
        states = [
            "vanished" if p not in current else "changed" if current[p] != recorded.get(p) else "same"
            for p in query["relevant"]
        ]
        if "vanished" in states:
            result.vanished += 1
        elif "changed" in states:
            result.changed += 1
        else:
            result.queries.append(query)
    return result
