"""A synthetic Markdown knowledge base, seeded and repeatable, and the queries and tasks a user would send it.

Shaped like real documentation rather than random bytes, because SAGE's costs follow that shape: BM25 walks
posting lists whose lengths follow word frequency (so the vocabulary is Zipf-like), context packing reads
sections (so documents have headings), and some documents carry CJK text (a separate bigram index).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LAYERS = ("core", "guidelines", "frameworks", "practices", "scenarios", "templates")
# Core holds a team's principles: a handful by design, and context packing lists every one of them on each call,
# so it is capped rather than grown with the corpus. The other layers share the rest by these weights.
CORE_SHARE = 0.01
CORE_MAX = 50
LAYER_WEIGHTS = {"guidelines": 15, "frameworks": 15, "practices": 35, "scenarios": 20, "templates": 15}
VOCABULARY_SIZE = 4000
ZIPF_EXPONENT = 1.07
# Document length in words: log-normal around MEDIAN_WORDS, clipped; a few long ones up to MAX_WORDS.
MEDIAN_WORDS = 600
SIGMA_WORDS = 0.55
MIN_WORDS = 40
MAX_WORDS = 5000
LONG_SHARE = 0.005
CJK_SHARE = 0.02
# Text is cut from one long Zipf-distributed stream: drawing every word on its own would make a 100k-document
# corpus take minutes to generate.
STREAM_WORDS = 1_000_000
FILES_PER_FOLDER = 1000

FUNCTION_WORDS = (
    "the of and to a in is that for it as with be on by this are or not from at an which can when if you your "
    "we should will each all more than into only other do use its then but also"
).split()
TECH_WORDS = (
    "retry timeout backoff cache latency throughput deadline circuit breaker queue worker schema migration index "
    "query review deploy rollback release canary incident alert metric trace log token secret credential rotation "
    "access policy audit test fixture mock contract api endpoint client server session request response payload "
    "error exception budget limit quota shard replica leader follower consensus snapshot backup restore archive "
    "pipeline build artifact container image cluster node pod service gateway proxy router handler middleware "
    "config setting flag feature toggle experiment rollout monitor dashboard oncall runbook postmortem severity "
    "ownership boundary module package dependency version upgrade deprecation compatibility interface protocol "
    "stream batch event message broker topic partition offset consumer producer idempotent transaction lock "
    "isolation consistency durability availability partition resilience fallback bulkhead jitter saturation "
    "encryption signature certificate handshake tenant account billing invoice refund ledger reconcile report "
    "search ranking relevance embedding vector prompt context assistant knowledge document section heading "
    "template checklist guideline framework practice scenario principle decision tradeoff estimate milestone "
    "sprint backlog ticket priority triage escalation customer support feedback survey onboarding handover"
).split()
SYLLABLES_ONSET = "b c d f g h j k l m n p r s t v w z br cr dr fl gr pl pr sk sl st tr ch sh th".split()
SYLLABLES_VOWEL = "a e i o u ai ea ou io".split()
SYLLABLES_CODA = ["", "", "", "n", "r", "s", "l", "m", "t", "x", "nd", "rk"]
# Common Han characters: CJK words are drawn from pairs and triples of them.
CJK_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所"
    "民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日"
    "那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已"
)
TITLE_TEMPLATES = (
    "{a} {b} guide",
    "How to handle {a} {b}",
    "{a} and {b}",
    "{a} {b} checklist",
    "Working with {a} in {b}",
    "{a} {b} for {c}",
    "When {a} meets {b}",
)
TASK_TEMPLATES = (
    "add {a} {b} to the {c} service",
    "review a pull request that changes {a} handling in {b}",
    "debug an incident where {a} causes {b} during {c}",
    "design the {a} layer for {b} with {c}",
    "write tests for {a} {b} and {c}",
    "migrate {a} from {b} to {c} without downtime",
    "document how {a} interacts with {b}",
)


def _zipf_cumulative(count: int, exponent: float = ZIPF_EXPONENT) -> list[float]:
    total = 0.0
    cumulative = []
    for rank in range(1, count + 1):
        total += 1.0 / rank**exponent
        cumulative.append(total)
    return cumulative


def _pseudo_words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """Pronounceable made-up words, unique and distinct from `taken`."""
    words: list[str] = []
    while len(words) < count:
        syllables = rng.choice((1, 2, 2, 2, 3))
        word = "".join(
            rng.choice(SYLLABLES_ONSET) + rng.choice(SYLLABLES_VOWEL) + rng.choice(SYLLABLES_CODA)
            for _ in range(syllables)
        )
        if len(word) >= 4 and word not in taken:
            taken.add(word)
            words.append(word)
    return words


@dataclass
class Vocabulary:
    """Words by frequency rank (function words first), the CJK words, and fast Zipf draws from both."""

    words: list[str]
    content: list[str]  # the words a query or tag would use: no function words
    cjk: list[str]
    rng: random.Random
    _cumulative: list[float] = field(default_factory=list)
    _content_cumulative: list[float] = field(default_factory=list)
    _stream: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, seed: int, size: int = VOCABULARY_SIZE) -> Vocabulary:
        rng = random.Random(seed)
        tech = list(dict.fromkeys(w for w in TECH_WORDS if w not in FUNCTION_WORDS))
        rng.shuffle(tech)
        taken = set(FUNCTION_WORDS) | set(tech)
        made_up = _pseudo_words(rng, max(0, size - len(FUNCTION_WORDS) - len(tech)), taken)
        # Real words sit among the frequent ranks, made-up ones fill the long tail.
        content = tech + made_up
        head, tail = content[:600], content[600:]
        rng.shuffle(head)
        content = head + tail
        cjk = list(
            dict.fromkeys("".join(rng.choice(CJK_CHARS) for _ in range(rng.choice((2, 2, 3, 4)))) for _ in range(400))
        )
        vocabulary = cls(words=[*FUNCTION_WORDS, *content], content=content, cjk=cjk, rng=rng)
        vocabulary._cumulative = _zipf_cumulative(len(vocabulary.words))
        vocabulary._content_cumulative = _zipf_cumulative(len(content))
        vocabulary._stream = rng.choices(vocabulary.words, cum_weights=vocabulary._cumulative, k=STREAM_WORDS)
        return vocabulary

    def content_word(self, rng: random.Random) -> str:
        """A content word, more often a frequent one."""
        point = rng.random() * self._content_cumulative[-1]
        return self.content[bisect.bisect_left(self._content_cumulative, point)]

    def sentence(self, rng: random.Random, words: int) -> str:
        """`words` words of the Zipf stream, as a sentence."""
        start = rng.randrange(0, STREAM_WORDS - words)
        text = " ".join(self._stream[start : start + words])
        return text[:1].upper() + text[1:] + "."

    def cjk_sentence(self, rng: random.Random) -> str:
        """A run of CJK words ending in a full stop, as CJK text is written (no spaces)."""
        return "".join(rng.choice(self.cjk) for _ in range(rng.randint(4, 12))) + "。"


@dataclass(frozen=True)
class CorpusDoc:
    """What the harness needs to know about one generated file."""

    id: str
    layer: str
    words: int
    has_cjk: bool


@dataclass
class Corpus:
    """A generated knowledge folder and what is in it."""

    folder: Path
    docs: list[CorpusDoc]
    vocabulary: Vocabulary

    @property
    def bytes(self) -> int:
        return sum(path.stat().st_size for path in self.folder.rglob("*.md"))


def _layers(count: int) -> list[str]:
    core = max(1, min(CORE_MAX, round(count * CORE_SHARE)))
    rest = count - core
    total = sum(LAYER_WEIGHTS.values())
    layers = ["core"] * core
    for name, weight in LAYER_WEIGHTS.items():
        layers += [name] * (rest * weight // total)
    layers += ["practices"] * (count - len(layers))
    return layers


def _length(rng: random.Random) -> int:
    if rng.random() < LONG_SHARE:
        return rng.randint(3000, MAX_WORDS)
    words = rng.lognormvariate(math.log(MEDIAN_WORDS), SIGMA_WORDS)
    return max(MIN_WORDS, min(MAX_WORDS, round(words)))


def _paragraph(vocabulary: Vocabulary, rng: random.Random, words: int) -> str:
    sentences = []
    while words > 0:
        length = min(words, rng.randint(8, 22))
        sentences.append(vocabulary.sentence(rng, length))
        words -= length
    return " ".join(sentences)


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


def render(index: int, layer: str, vocabulary: Vocabulary, rng: random.Random, with_cjk: bool) -> tuple[str, str, int]:
    """One document as (id, Markdown text, body words)."""
    a, b, c = (vocabulary.content_word(rng) for _ in range(3))
    title = rng.choice(TITLE_TEMPLATES).format(a=a, b=b, c=c)
    title = title[:1].upper() + title[1:]
    doc_id = f"{layer}-{a}-{b}-{index}"
    tags = list(dict.fromkeys(vocabulary.content_word(rng) for _ in range(rng.randint(2, 4))))
    triggers = [f"{vocabulary.content_word(rng)} {vocabulary.content_word(rng)}" for _ in range(rng.randint(1, 3))]
    summary = vocabulary.sentence(rng, rng.randint(8, 16))
    total = _length(rng)
    lines = [
        "---",
        f"id: {doc_id}",
        f"title: {title}",
        f"layer: {layer}",
        f"tags: {_yaml_list(tags)}",
        f"triggers: {_yaml_list(triggers)}",
        f"summary: {summary}",
        "---",
        f"# {title}",
        "",
        _paragraph(vocabulary, rng, min(total, rng.randint(30, 80))),
        "",
    ]
    left = total - min(total, 80)
    while left > 0:
        section = min(left, rng.randint(80, 300))
        heading = " ".join(vocabulary.content_word(rng) for _ in range(rng.randint(1, 3)))
        lines += [f"## {heading[:1].upper() + heading[1:]}", ""]
        kind = rng.random()
        if kind < 0.15:
            lines += [f"- {vocabulary.sentence(rng, rng.randint(5, 12))}" for _ in range(rng.randint(3, 6))]
        elif kind < 0.22:
            lines += ["```text", vocabulary.sentence(rng, rng.randint(6, 14)), "```"]
        elif kind < 0.32:
            lines += [f"### {vocabulary.content_word(rng).title()}", ""]
        lines += [_paragraph(vocabulary, rng, section), ""]
        left -= section
    if with_cjk:
        lines += ["## 中文摘要", "", "".join(vocabulary.cjk_sentence(rng) for _ in range(rng.randint(1, 4))), ""]
    return doc_id, "\n".join(lines), total


def generate(folder: Path, count: int, seed: int) -> Corpus:
    """Write `count` Markdown files under `folder` (layer/NNN/doc-N.md); the same seed writes the same files."""
    vocabulary = Vocabulary.build(seed)
    rng = random.Random(seed * 1_000_003 + count)
    layers = _layers(count)
    rng.shuffle(layers)
    docs: list[CorpusDoc] = []
    for index, layer in enumerate(layers):
        with_cjk = rng.random() < CJK_SHARE
        doc_id, text, words = render(index, layer, vocabulary, rng, with_cjk)
        path = folder / layer / f"{index // FILES_PER_FOLDER:03d}" / f"doc-{index}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        docs.append(CorpusDoc(doc_id, layer, words, with_cjk))
    return Corpus(folder, docs, vocabulary)


@dataclass(frozen=True)
class Workload:
    """Search queries and context tasks for one interface's loops, none repeated within it."""

    warmup: list[str]
    warmup_tasks: list[str]
    serial: list[str]  # searches at concurrency 1
    concurrent: list[str]  # searches at concurrency 32
    serial_tasks: list[str]
    concurrent_tasks: list[str]


class QueryStream:
    """Search queries and task sentences, each handed out once per run, so a measurement that wants a cold
    cache gets one (SAGE caches every answer by its exact arguments)."""

    def __init__(self, vocabulary: Vocabulary, seed: int) -> None:
        self.vocabulary = vocabulary
        self.rng = random.Random(seed + 17)
        self._used: set[str] = set()

    def _unique(self, candidate: str) -> str | None:
        if candidate in self._used:
            return None
        self._used.add(candidate)
        return candidate

    def _query(self) -> str:
        rng, vocab = self.rng, self.vocabulary
        kind = rng.random()
        if kind < 0.08:
            return " ".join(rng.choice(vocab.cjk) for _ in range(rng.randint(1, 2)))
        if kind < 0.22:
            word = vocab.content_word(rng)
            prefix = word[: rng.randint(3, max(3, min(5, len(word) - 1)))] + "*"
            return prefix if rng.random() < 0.5 else f"{vocab.content_word(rng)} {prefix}"
        return " ".join(vocab.content_word(rng) for _ in range(rng.choice((1, 2, 2, 3))))

    def _task(self) -> str:
        words = {name: self.vocabulary.content_word(self.rng) for name in "abc"}
        return self.rng.choice(TASK_TEMPLATES).format(**words)

    def workload(self, warmup: int, serial: int, concurrent: int) -> Workload:
        """The queries and tasks one interface is measured with, taken in a fixed order: two streams made with the
        same seed hand out the same workload, so the in-process and REST figures are measured on the same queries
        (the stream is shared with other parts otherwise, and later queries are longer: the short ones are used up)."""
        return Workload(
            warmup=self.queries(warmup),
            warmup_tasks=self.tasks(max(1, warmup // 5)),
            serial=self.queries(serial),
            concurrent=self.queries(concurrent),
            serial_tasks=self.tasks(serial),
            concurrent_tasks=self.tasks(concurrent),
        )

    def queries(self, count: int) -> list[str]:
        """`count` search queries never handed out before: 1-3 words, some prefix*, some CJK."""
        return self._take(count, self._query)

    def tasks(self, count: int) -> list[str]:
        """`count` task sentences never handed out before, for context packing."""
        return self._take(count, self._task)

    def _take(self, count: int, make: Callable[[], str]) -> list[str]:
        out: list[str] = []
        for attempt in itertools.count():
            if len(out) == count:
                return out
            candidate = make()
            # Past many collisions the short forms are used up: lengthen rather than loop for ever.
            if attempt > 50 * count:
                candidate = f"{candidate} {self.vocabulary.content_word(self.rng)}"
            unique = self._unique(candidate)
            if unique is not None:
                out.append(unique)
        raise AssertionError("unreachable")
