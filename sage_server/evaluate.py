"""Retrieval quality as numbers: recall@k, MRR@10 and nDCG@10 for search (overall and per kind), a false-alarm
rate for out-of-scope queries, and hit rate and budget share for context."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from sage_server.errors import InvalidInput
from sage_server.service import KnowledgeService

# Search is judged on its first page: MRR and nDCG look this deep, recall@k at most this deep.
DEPTH = 10
OUT_OF_SCOPE = "out_of_scope"
# An out-of-scope query is a false alarm when its first hit scores above what this share of in-scope first hits
# reach (the bundled-knowledge issue's definition).
IN_SCOPE_QUANTILE = 0.95
# One hit from a searcher: (document id, score, higher is better).
Hit = tuple[str, float]
Searcher = Callable[[str, int], Awaitable[list[Hit]]]


class EvalQuery(BaseModel):
    """One judged query: what a user asked, the ids a person would call relevant, and an optional kind label.

    `relevant: []` marks a query the knowledge does not cover (kind `out_of_scope`); it is judged by whether its
    first hit scores like a real answer would.
    """

    query: str = Field(min_length=1)
    mode: Literal["search", "context"] = "search"
    relevant: list[str]
    kind: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _scope(self) -> EvalQuery:
        if not self.relevant:
            if self.mode != "search":
                raise ValueError("a query with 'relevant: []' (out of scope) must have mode 'search'")
            if self.kind not in (None, OUT_OF_SCOPE):
                raise ValueError(f"a query with 'relevant: []' is out of scope; its kind must be {OUT_OF_SCOPE!r}")
            self.kind = OUT_OF_SCOPE
        elif self.kind == OUT_OF_SCOPE:
            raise ValueError(f"kind {OUT_OF_SCOPE!r} needs 'relevant: []'")
        return self


class QueryOutcome(BaseModel):
    """How one query did."""

    query: str
    mode: Literal["search", "context"]
    kind: str | None = None
    relevant: list[str]
    returned: list[str]
    first_relevant_rank: int | None
    first_hit_score: float | None = None
    relevant_budget_share: float | None = None
    crowded_out: bool | None = Field(
        default=None, description="Context: an off-topic section was packed while a relevant one was left out"
    )


class KindFigures(BaseModel):
    """The figures of the queries sharing one kind label (search kinds: recall, MRR, nDCG; context: hit, share)."""

    kind: str
    mode: Literal["search", "context"]
    queries: int
    recall_at_k: float | None = None
    mrr: float | None = None
    ndcg_at_10: float | None = None
    context_hit_rate: float | None = None
    context_relevant_share: float | None = None


class EvalReport(BaseModel):
    """The summary figures, per kind, and the per-query outcomes. Search figures leave out out-of-scope queries."""

    k: int
    search_queries: int
    context_queries: int
    recall_at_k: float
    mrr: float = Field(description="Mean reciprocal rank of the first relevant hit within the first 10")
    ndcg_at_10: float
    context_hit_rate: float
    context_relevant_share: float
    context_crowded_out: int = Field(
        default=0, description="Context tasks where an off-topic section was packed while a relevant one was left out"
    )
    out_of_scope_queries: int = 0
    false_alarm_rate: float | None = Field(
        default=None, description="Share of out-of-scope queries whose first hit scores above the threshold"
    )
    false_alarm_threshold: float | None = Field(
        default=None, description="The first-hit score that 95% of in-scope first hits reach"
    )
    kinds: list[KindFigures] = Field(default_factory=list)
    outcomes: list[QueryOutcome]


def load_queries(paths: list[Path]) -> list[EvalQuery]:
    """Read eval files: YAML with a top-level `queries:` list of {query, mode, relevant, kind}."""
    queries: list[EvalQuery] = []
    for path in paths:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise InvalidInput(f"{path}: cannot read eval file: {exc}") from exc
        items = data.get("queries") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise InvalidInput(f"{path}: expected a top-level 'queries:' list")
        for number, item in enumerate(items, 1):
            try:
                queries.append(EvalQuery.model_validate(item))
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "query"
                raise InvalidInput(f"{path}: query {number}: {field}: {first['msg']}") from exc
    return queries


def ndcg(returned: list[str], relevant: list[str], depth: int = DEPTH) -> float:
    """Normalized discounted cumulative gain of `returned` (binary relevance) down to `depth`."""
    gains = sum(1.0 / math.log2(rank + 2) for rank, doc_id in enumerate(returned[:depth]) if doc_id in relevant)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(relevant), depth)))
    return gains / ideal if ideal else 0.0


def first_rank(returned: list[str], relevant: list[str]) -> int | None:
    """1-based rank of the first relevant id in `returned`, or None."""
    return next((i + 1 for i, doc_id in enumerate(returned) if doc_id in relevant), None)


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def _quantile_low(values: list[float], share: float) -> float:
    """The value that `share` of `values` reach or exceed (nearest rank)."""
    ordered = sorted(values, reverse=True)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _search_figures(outcomes: list[QueryOutcome], k: int) -> tuple[float, float, float]:
    recall = [len(set(o.returned[:k]) & set(o.relevant)) / len(o.relevant) for o in outcomes]
    reciprocal = [1.0 / o.first_relevant_rank if o.first_relevant_rank else 0.0 for o in outcomes]
    gains = [ndcg(o.returned, o.relevant) for o in outcomes]
    return _mean(recall), _mean(reciprocal), _mean(gains)


def _kind_figures(outcomes: list[QueryOutcome], k: int) -> list[KindFigures]:
    groups: dict[tuple[str, str], list[QueryOutcome]] = {}
    for outcome in outcomes:
        if outcome.kind is not None and outcome.kind != OUT_OF_SCOPE:
            groups.setdefault((outcome.kind, outcome.mode), []).append(outcome)
    figures = []
    for (kind, mode), group in groups.items():
        if mode == "search":
            recall, mrr, gain = _search_figures(group, k)
            figures.append(
                KindFigures(kind=kind, mode="search", queries=len(group), recall_at_k=recall, mrr=mrr, ndcg_at_10=gain)
            )
        else:
            figures.append(
                KindFigures(
                    kind=kind,
                    mode="context",
                    queries=len(group),
                    context_hit_rate=_mean([1.0 if o.first_relevant_rank else 0.0 for o in group]),
                    context_relevant_share=_mean([o.relevant_budget_share or 0.0 for o in group]),
                )
            )
    return figures


def summarize(outcomes: list[QueryOutcome], k: int) -> EvalReport:
    """The report for a list of outcomes (from `run_eval`, or from another searcher scored the same way)."""
    searches = [o for o in outcomes if o.mode == "search" and o.relevant]
    contexts = [o for o in outcomes if o.mode == "context"]
    out_of_scope = [o for o in outcomes if not o.relevant]
    recall, mrr, gain = _search_figures(searches, k)
    threshold = rate = None
    in_scope_scores = [o.first_hit_score for o in searches if o.first_hit_score is not None]
    if out_of_scope and in_scope_scores:
        threshold = round(_quantile_low(in_scope_scores, IN_SCOPE_QUANTILE), 4)
        alarms = [o for o in out_of_scope if o.first_hit_score is not None and o.first_hit_score > threshold]
        rate = round(len(alarms) / len(out_of_scope), 4)
    return EvalReport(
        k=k,
        search_queries=len(searches),
        context_queries=len(contexts),
        recall_at_k=recall,
        mrr=mrr,
        ndcg_at_10=gain,
        context_hit_rate=_mean([1.0 if o.first_relevant_rank else 0.0 for o in contexts]),
        context_relevant_share=_mean([o.relevant_budget_share or 0.0 for o in contexts]),
        context_crowded_out=sum(1 for o in contexts if o.crowded_out),
        out_of_scope_queries=len(out_of_scope),
        false_alarm_rate=rate,
        false_alarm_threshold=threshold,
        kinds=_kind_figures(outcomes, k),
        outcomes=outcomes,
    )


def search_outcome(item: EvalQuery, hits: list[Hit]) -> QueryOutcome:
    """Score one search query from its hits (best first)."""
    returned = [doc_id for doc_id, _ in hits]
    return QueryOutcome(
        query=item.query,
        mode="search",
        kind=item.kind,
        relevant=item.relevant,
        returned=returned,
        first_relevant_rank=first_rank(returned, item.relevant),
        first_hit_score=round(hits[0][1], 4) if hits else None,
    )


def service_searcher(kb: KnowledgeService) -> Searcher:
    """A searcher over SAGE's own search."""

    async def searcher(query: str, limit: int) -> list[Hit]:
        result = await kb.search(query, limit=limit)
        return [(hit.id, hit.score) for hit in result.hits]

    return searcher


async def run_eval(
    kb: KnowledgeService,
    queries: list[EvalQuery],
    k: int = 5,
    max_tokens: int = 4000,
    searcher: Searcher | None = None,
) -> EvalReport:
    """Run every query against `kb` (search queries through `searcher` when given) and score it."""
    if not 1 <= k <= DEPTH:
        raise InvalidInput(f"k must be between 1 and {DEPTH}, got {k}")
    search = searcher or service_searcher(kb)
    outcomes: list[QueryOutcome] = []
    for item in queries:
        if item.mode == "search":
            outcomes.append(search_outcome(item, await search(item.query, DEPTH)))
            continue
        packed = await kb.context(item.query, max_tokens)
        returned = list(dict.fromkeys(section.id for section in packed.sections))
        total = sum(s.tokens for s in packed.sections)
        relevant_tokens = sum(s.tokens for s in packed.sections if s.id in item.relevant)
        outcomes.append(
            QueryOutcome(
                query=item.query,
                mode="context",
                kind=item.kind,
                relevant=item.relevant,
                returned=returned,
                first_relevant_rank=first_rank(returned, item.relevant),
                relevant_budget_share=round(relevant_tokens / total, 3) if total else 0.0,
                crowded_out=any(o.id in item.relevant for o in packed.omitted)
                and any(s.id not in item.relevant for s in packed.sections),
            )
        )
    return summarize(outcomes, k)
