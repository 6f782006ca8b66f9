"""`python -m tests.external_eval [--work .external-eval] [--half tune|held_out|both] [--regenerate] [--no-build]`.

Installs Debian's manual pages with apt (root), writes them as Markdown under WORK/corpus, imports that folder
into a fresh SAGE database, and scores SAGE's search and plain FTS5 BM25 (the floor) on the committed judged
queries, per kind and per half. See tests/external_eval/queries.py for how the queries are made.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import yaml

from sage_server.config import load_settings
from sage_server.evaluate import DEPTH, EvalQuery, EvalReport, run_eval, search_outcome, service_searcher, summarize
from sage_server.service import KnowledgeService, open_service
from tests.external_eval import corpus, queries
from tests.external_eval.floor import Floor

QUERIES_FILE = Path(__file__).with_name("queries.yaml")
K = 5
THREE_WORDS_MARGIN = 0.05
TYPO_FLOOR = 0.85


def _settings(work: Path, corpus_root: Path) -> Any:
    values = {
        "db_path": work / "sage.db",
        "cache_dir": work / "cache",
        "cache_disk": False,
        "bundled_knowledge": False,
        "knowledge_dirs": [corpus_root],
        "log_level": "WARNING",
    }
    return load_settings(values, environ={}, cwd=work, home=work).settings


async def _paths_to_ids(kb: KnowledgeService, root: Path) -> dict[str, str]:
    """Corpus path (relative) -> document id, from the documents SAGE imported."""
    ids: dict[str, str] = {}
    cursor: str | None = None
    while True:
        page = await kb.list(limit=100, cursor=cursor)
        for item in page.items:
            doc = await kb.get(item.id)
            if doc.source_path:
                ids[Path(doc.source_path).relative_to(root).as_posix()] = item.id
        cursor = page.next_cursor
        if cursor is None:
            return ids


def _timed(samples: list[float], search: Any) -> Any:
    async def timed(query: str, limit: int) -> Any:
        started = time.perf_counter()
        try:
            return await search(query, limit)
        finally:
            samples.append(time.perf_counter() - started)

    return timed


async def _run(args: argparse.Namespace) -> int:
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    root = work / "corpus"
    versions = corpus.install_packages()
    if not args.no_build or not root.exists():
        built = corpus.build(root)
        print(f"corpus: {built.pages} pages written to {root} ({built.link_pages} link-only pages left out)")
    pages = queries.read_pages(root)
    if args.regenerate:
        generated = queries.generate(pages)
        queries.write(QUERIES_FILE, generated, versions, queries.SEED)
        print(f"queries: {len(generated.queries)} written to {QUERIES_FILE}")
    loaded = queries.load(QUERIES_FILE, pages)
    if loaded.packages != versions:
        print(f"note: queries were made with {loaded.packages}; installed now: {versions}")
    print(
        f"queries: {len(loaded.queries)} hold; skipped {loaded.changed} whose page changed and {loaded.vanished} "
        f"whose page vanished; {loaded.new_pages} pages are newer than the queries file"
    )
    if args.fresh:
        for name in ("sage.db", "sage.db-wal", "sage.db-shm"):
            (work / name).unlink(missing_ok=True)
        shutil.rmtree(work / "cache", ignore_errors=True)
    settings = _settings(work, root)
    started = time.perf_counter()
    async with open_service(settings) as kb:
        imported = kb.last_import
        ids = await _paths_to_ids(kb, root)
        if imported is not None:
            print(
                f"import: {imported.created} created, {imported.updated} updated, {imported.unchanged} unchanged, "
                f"{len(imported.skipped)} skipped in {time.perf_counter() - started:.1f} s"
            )
            for skip in imported.skipped[:5]:
                print(f"  skipped {skip.path}: {skip.reason}")
        dropped = 0
        judged: dict[str, list[EvalQuery]] = {half: [] for half in queries.HALVES}
        for item in loaded.queries:
            relevant = [ids[path] for path in item["relevant"] if path in ids]
            if not relevant:
                dropped += 1  # every relevant page was skipped by the import (colliding ids)
                continue
            judged[item["half"]].append(EvalQuery(query=item["query"], relevant=relevant, kind=item["kind"]))
        if dropped:
            print(f"note: {dropped} queries skipped: the import dropped their pages")
        documents = []
        for path, doc_id in ids.items():
            title, _, body = (root / path).read_text(encoding="utf-8").partition("\n")
            documents.append((doc_id, title.lstrip("# ").strip(), body))
        floor = Floor(documents)
        halves = queries.HALVES if args.half == "both" else (args.half,)
        results: dict[str, dict[str, EvalReport]] = {}
        latency: dict[str, list[float]] = {"sage": [], "floor": []}

        async def floor_search(query: str, limit: int) -> list[tuple[str, float]]:
            return floor.search(query, limit)

        for half in halves:
            sage = await run_eval(kb, judged[half], K, searcher=_timed(latency["sage"], service_searcher(kb)))
            timed_floor = _timed(latency["floor"], floor_search)
            outcomes = [search_outcome(q, await timed_floor(q.query, DEPTH)) for q in judged[half]]
            results[half] = {"sage": sage, "floor": summarize(outcomes, K)}
            (work / f"eval-{half}.yaml").write_text(
                yaml.safe_dump({"queries": [q.model_dump(exclude_none=True) for q in judged[half]]}, allow_unicode=True)
            )
        floor.close()
    _print(results, latency)
    summary = {
        half: {name: report.model_dump(exclude={"outcomes"}) for name, report in reports.items()}
        for half, reports in results.items()
    }
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    per_query = {
        half: {name: [o.model_dump() for o in report.outcomes] for name, report in reports.items()}
        for half, reports in results.items()
    }
    (work / "outcomes.json").write_text(json.dumps(per_query, ensure_ascii=False))
    print(f"written: {work / 'results.json'}, {work / 'outcomes.json'}, {work}/eval-<half>.yaml")
    return 0


def _targets(kind: str, sage: Any, floor: Any) -> list[str]:
    """The issue's targets for one kind on the held-out half that this result misses."""
    misses = []
    if sage.recall_at_k < floor.recall_at_k or sage.mrr < floor.mrr:
        misses.append("below the floor")
    if kind == "three_words" and sage.recall_at_k < floor.recall_at_k + THREE_WORDS_MARGIN:
        misses.append(f"recall@5 not {THREE_WORDS_MARGIN} above the floor")
    if kind in ("misspelt", "prefix") and sage.recall_at_k < TYPO_FLOOR:
        misses.append(f"recall@5 under {TYPO_FLOOR}")
    return misses


def _print(results: dict[str, dict[str, EvalReport]], latency: dict[str, list[float]]) -> None:
    print()
    print(f"{'half':<9} {'kind':<12} {'n':>4}   {'SAGE r@5 / MRR@10 / nDCG@10':<28} {'BM25 floor':<24} target")
    missed = 0
    for half, reports in results.items():
        floor_kinds = {f.kind: f for f in reports["floor"].kinds}
        for kind in queries.KINDS:
            sage = next((f for f in reports["sage"].kinds if f.kind == kind), None)
            floor = floor_kinds.get(kind)
            if sage is None or floor is None:
                continue
            misses = _targets(kind, sage, floor)
            verdict = "; ".join(misses) if misses else "met"
            if half == "held_out":
                missed += bool(misses)
            else:
                verdict = f"({verdict})"
            print(
                f"{half:<9} {kind:<12} {sage.queries:>4}   "
                f"{sage.recall_at_k:.3f} / {sage.mrr:.3f} / {sage.ndcg_at_10:.3f}      "
                f"{floor.recall_at_k:.3f} / {floor.mrr:.3f} / {floor.ndcg_at_10:.3f}    {verdict}"
            )
    for name, samples in latency.items():
        if samples:
            print(f"{name} search p50 {statistics.median(samples) * 1000:.1f} ms over {len(samples)} queries")
    if "held_out" in results:
        print("held-out targets: " + ("all met" if not missed else f"{missed} kind(s) miss"))


def main(argv: list[str] | None = None) -> None:
    """Build, run, print. Exit 0 whatever the figures (this is a measurement); 2 when the corpus cannot be built."""
    parser = argparse.ArgumentParser(prog="python -m tests.external_eval", description=__doc__)
    parser.add_argument("--work", type=Path, default=Path(".external-eval"), help="folder for the corpus and db")
    parser.add_argument("--half", choices=["tune", "held_out", "both"], default="both", help="which half to run")
    parser.add_argument("--regenerate", action="store_true", help="make the queries file anew from this corpus")
    parser.add_argument("--no-build", action="store_true", help="reuse WORK/corpus when it exists")
    parser.add_argument("--fresh", action="store_true", help="start from an empty database (after an index change)")
    args = parser.parse_args(argv)
    try:
        sys.exit(anyio.run(_run, args))
    except corpus.SetupError as exc:
        print(f"external eval: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
