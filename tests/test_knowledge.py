"""The bundled knowledge: well-formed, bilingual, its code samples parse, and retrieval on it holds the floors."""

from __future__ import annotations

import ast
import json
import re
import statistics
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import pglast
import pytest
import yaml
from markdown_it import MarkdownIt

from sage_server.evaluate import EvalQuery, EvalReport, run_eval
from sage_server.ingest import collect
from sage_server.markdown import sections, split_frontmatter
from sage_server.models import DocumentIn
from sage_server.resources import knowledge_dir
from sage_server.search import trigger_matches
from sage_server.service import KnowledgeService, open_service
from tests.conftest import make_settings

pytestmark = pytest.mark.anyio
LINK = re.compile(r"\]\(sage:([^)\s#]+)\)")
CJK = re.compile(r"[\u4e00-\u9fff]")
MIN_DOCUMENTS = 60
MIN_PER_LAYER = 6
MIN_SECTIONS = 3
# Settings that read no configuration files (there are none here) for collecting the bundled files.
NOWHERE = Path("/nonexistent")
# Every id the bundled knowledge has ever shipped: ids are forever, so each stays a document or an alias.
SHIPPED_IDS = """
communicate-uncertainty finish-what-you-start honesty-about-verification minimal-change respect-user-data
secure-by-default understand-before-changing verify-with-evidence autonomy-levels cognitive-checklists decision-making
estimating-work problem-decomposition risk-assessment technical-debt-triage timeout-resilience code-review-guidelines
code-style-guidelines documentation-guidelines error-handling-guidelines performance-guidelines python-guidelines
security-guidelines testing-guidelines api-design debugging-flaky-tests dependency-upgrades feature-flags
handling-secrets structured-logging writing-commit-messages writing-good-tests-for-bugs writing-migrations
data-loss-risk failing-ci-pipeline large-refactor legacy-code-change onboarding-codebase performance-regression
production-incident security-vulnerability-report unclear-requirements bug-report-template delivery-report-template
design-decision-record-template handoff-note-template incident-postmortem-template project-guidelines-template
review-checklist-template session-log-template
""".split()
# Fenced code is checked by language; these info strings are prose, output or templates, and are read, not parsed.
UNCHECKED_LANGUAGES = {"text", "markdown", "typescript", "dockerfile"}
KINDS = {"keyword", "question", "task", "typo", "zh", "out_of_scope"}
# Floors a little below the figures measured on this knowledge (README, "Retrieval quality").
FLOOR_RECALL = 0.88
FLOOR_MRR = 0.82
FLOOR_CONTEXT_HIT = 0.90
FLOOR_CONTEXT_SHARE = 0.55
FLOOR_ZH_RECALL = 0.90
MAX_TRIGGER_SHARE = 0.20


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@lru_cache(maxsize=1)
def bundled_docs() -> tuple[tuple[Path, dict[str, Any], DocumentIn], ...]:
    """(path, raw frontmatter, parsed document) of every bundled file."""
    collected = collect([knowledge_dir()], make_settings(NOWHERE))
    assert collected.skipped == []
    found = []
    for parsed in collected.files:
        path = Path(parsed.path)
        meta, _ = split_frontmatter(path.read_text(encoding="utf-8"))
        found.append((path, meta, parsed.doc))
    return tuple(found)


def eval_entries() -> list[dict[str, Any]]:
    data = yaml.safe_load((knowledge_dir() / "eval.yaml").read_text(encoding="utf-8"))
    entries: list[dict[str, Any]] = data["queries"]
    return entries


def test_every_bundled_file_imports_cleanly_with_stable_ids() -> None:
    docs = bundled_docs()
    assert len(docs) >= MIN_DOCUMENTS
    ids = {doc.id for _, _, doc in docs}
    assert len(ids) == len(docs)
    per_layer = Counter(doc.layer for _, _, doc in docs)
    assert all(per_layer[layer] >= MIN_PER_LAYER for layer in make_settings(NOWHERE).layers), per_layer
    for path, meta, doc in docs:
        assert meta.get("id") == path.stem == doc.id, path  # an explicit id, and the file named after it
        words = len(doc.body.split())
        assert 200 <= words <= 1200, (doc.id, words)
        assert doc.title and doc.summary and doc.tags and doc.triggers, doc.id


def test_links_live_in_related_and_point_at_real_documents() -> None:
    docs = bundled_docs()
    ids = {doc.id for _, _, doc in docs}
    for _, _, doc in docs:
        assert doc.related, f"{doc.id} names no related documents"
        assert set(doc.related) <= ids - {doc.id}, (doc.id, set(doc.related) - ids)
        assert set(LINK.findall(doc.body)) <= ids, (doc.id, set(LINK.findall(doc.body)) - ids)
        headings = [s.heading.lower() for s in sections(doc.body)]
        assert not {"related", "load first", "see also"} & set(headings), doc.id


def test_ids_are_never_lost_merged_ones_are_aliases() -> None:
    docs = bundled_docs()
    ids = {doc.id for _, _, doc in docs}
    aliases = [alias for _, _, doc in docs for alias in doc.aliases]
    assert len(aliases) == len(set(aliases)), aliases
    assert not set(aliases) & ids, set(aliases) & ids
    assert set(SHIPPED_IDS) <= ids | set(aliases), set(SHIPPED_IDS) - ids - set(aliases)
    absorbed = {alias: doc.id for _, _, doc in docs for alias in doc.aliases}
    assert absorbed["review-checklist-template"] == "code-review-guidelines"
    assert absorbed["session-log-template"] == "handoff-note-template"


def test_every_document_has_sections_that_stand_alone() -> None:
    for _, _, doc in bundled_docs():
        level_two = [s for s in sections(doc.body) if s.level == 2]
        assert len(level_two) >= MIN_SECTIONS, doc.id
        for section in level_two:
            text = doc.body[section.start : section.end]
            assert len(text.split()) >= 40, (doc.id, section.heading)  # a section says something on its own


def test_every_document_is_bilingual() -> None:
    for _, _, doc in bundled_docs():
        chinese = doc.translations.get("zh")
        assert chinese is not None and chinese.title and chinese.summary, doc.id
        assert CJK.search(chinese.title) and len(CJK.findall(chinese.summary)) >= 20, doc.id
        assert sum(1 for t in doc.triggers if CJK.search(t)) >= 2, doc.id


def test_triggers_are_specific_and_belong_to_one_document() -> None:
    owners: dict[str, str] = {}
    for _, _, doc in bundled_docs():
        for trigger in doc.triggers:
            key = " ".join(trigger.lower().split())
            assert key not in owners, f"trigger {trigger!r} is shared by {owners.get(key)} and {doc.id}"
            owners[key] = doc.id
            if CJK.search(trigger):
                assert len(CJK.findall(trigger)) >= 3 or len(trigger.split()) >= 2, (doc.id, trigger)
            else:
                # One word fires on almost any task ("python", "risk"); a file name is the exception.
                assert len(trigger.split()) >= 2 or "." in trigger, (doc.id, trigger)


def fences(body: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, by a CommonMark parser."""
    tokens = MarkdownIt("commonmark").parse(body)
    return [(t.info.strip().split(" ")[0].lower(), t.content) for t in tokens if t.type == "fence"]


def check_code(language: str, code: str) -> None:
    if language in {"bash", "sh", "shell"}:
        result = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr
    elif language == "python":
        ast.parse(code)
    elif language == "sql":
        pglast.parse_sql(code)  # PostgreSQL's own parser (libpg_query), without a server
    elif language == "json":
        json.loads(code)
    elif language == "yaml":
        list(yaml.safe_load_all(code))
    else:
        assert language in UNCHECKED_LANGUAGES, f"fence language {language!r} is neither checked nor known"


def test_every_code_sample_parses_in_its_language() -> None:
    checked = Counter[str]()
    for _, _, doc in bundled_docs():
        for language, code in fences(doc.body):
            try:
                check_code(language, code)
            except Exception as exc:  # one message naming the document and the language, whatever the parser raised
                raise AssertionError(f"{doc.id}: a {language or 'unlabelled'} sample does not parse: {exc}") from exc
            checked[language] += 1
    assert {"bash", "python", "sql", "json", "yaml"} <= set(checked), checked


def test_a_broken_sample_is_caught() -> None:
    for language, code in [
        ("bash", 'if [ "$x" ; then echo\n'),
        ("python", "def f(:\n"),
        ("sql", "SELEC id FROM t;"),
        ("json", "{'a': 1}"),
        ("yaml", "a: [1, 2\n"),
        ("ruby", "puts 1"),
    ]:
        with pytest.raises((AssertionError, SyntaxError, pglast.parser.ParseError, ValueError, yaml.YAMLError)):
            check_code(language, code)


def test_eval_set_is_written_apart_and_judges_real_documents() -> None:
    entries = eval_entries()
    docs = bundled_docs()
    by_id = {doc.id: doc for _, _, doc in docs}
    assert len(entries) >= 200
    assert len({e["query"] for e in entries}) == len(entries)
    for entry in entries:
        assert set(entry) == {"query", "mode", "kind", "relevant"}, entry
        assert entry["mode"] in {"search", "context"} and entry["kind"] in KINDS, entry
        assert set(entry["relevant"]) <= set(by_id), entry
        assert (entry["kind"] == "out_of_scope") == (entry["relevant"] == []), entry
    assert sum(1 for e in entries if e["kind"] == "out_of_scope") >= 15
    judged = Counter(doc_id for e in entries for doc_id in e["relevant"])
    assert set(by_id) <= set(judged), set(by_id) - set(judged)
    chinese = [e for e in entries if CJK.search(e["query"])]
    layers_asked_in_chinese = {by_id[doc_id].layer for e in chinese for doc_id in e["relevant"]}
    assert layers_asked_in_chinese == set(make_settings(NOWHERE).layers)
    # The eval measures retrieval, not whether a query repeats a document's trigger phrase.
    verbatim = [
        e["query"]
        for e in entries
        if any(
            trigger_matches(e["query"], [t]) or t.lower() in e["query"].lower()
            for doc_id in e["relevant"]
            for t in by_id[doc_id].triggers
        )
    ]
    assert len(verbatim) <= MAX_TRIGGER_SHARE * len(entries), verbatim


@pytest.fixture(scope="module")
async def bundled(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KnowledgeService]:
    settings = make_settings(tmp_path_factory.mktemp("bundled"), bundled_knowledge=True)
    async with open_service(settings) as kb:
        yield kb


@pytest.fixture(scope="module")
async def report(bundled: KnowledgeService) -> EvalReport:
    # Out-of-scope queries (relevant: []) need the runner's false-alarm measure; the in-scope ones are scored here.
    queries = [
        EvalQuery(query=e["query"], mode=e["mode"], relevant=e["relevant"]) for e in eval_entries() if e["relevant"]
    ]
    return await run_eval(bundled, queries, k=5)


async def test_search_quality_floor(report: EvalReport) -> None:
    assert report.recall_at_k >= FLOOR_RECALL, report.recall_at_k
    assert report.mrr >= FLOOR_MRR, report.mrr


async def test_context_quality_floor(report: EvalReport) -> None:
    assert report.context_hit_rate >= FLOOR_CONTEXT_HIT, report.context_hit_rate
    assert report.context_relevant_share >= FLOOR_CONTEXT_SHARE, report.context_relevant_share
    # No task packs an off-topic section while leaving a relevant one out for want of room.
    assert report.context_crowded_out == 0, [o.query for o in report.outcomes if o.crowded_out]


async def test_chinese_questions_find_their_documents(report: EvalReport) -> None:
    kinds = {e["query"]: e["kind"] for e in eval_entries()}
    chinese = [o for o in report.outcomes if kinds[o.query] == "zh" and o.mode == "search"]
    recall = statistics.mean(len(set(o.returned[:5]) & set(o.relevant)) / len(o.relevant) for o in chinese)
    assert recall >= FLOOR_ZH_RECALL, recall


async def test_every_document_is_found_by_some_query(report: EvalReport) -> None:
    judged = {doc_id for o in report.outcomes for doc_id in o.relevant}
    found = {
        doc_id
        for o in report.outcomes
        for doc_id in (o.returned[:5] if o.mode == "search" else o.returned)
        if doc_id in o.relevant
    }
    assert judged <= found, sorted(judged - found)
