"""Retrieval quality as numbers: recall@k, MRR and nDCG@k for search, hit rate and budget share for context."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from sage_server.errors import InvalidInput
from sage_server.service import KnowledgeService


class EvalQuery(BaseModel):
    """One judged query: what a user asked and the ids a person would call relevant (best first)."""

    query: str = Field(min_length=1)
    mode: Literal["search", "context"] = "search"
    relevant: list[str] = Field(min_length=1)


class QueryOutcome(BaseModel):
    """How one query did."""

    query: str
    mode: Literal["search", "context"]
    relevant: list[str]
    returned: list[str]
    first_relevant_rank: int | None
    relevant_budget_share: float | None = None


class EvalReport(BaseModel):
    """The summary figures and the per-query outcomes."""

    k: int
    search_queries: int
    context_queries: int
    recall_at_k: float
    mrr: float
    ndcg_at_k: float
    context_hit_rate: float
    context_relevant_share: float
    outcomes: list[QueryOutcome]


def load_queries(paths: list[Path]) -> list[EvalQuery]:
    """Read eval files: YAML with a top-level `queries:` list of {query, mode, relevant}."""
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
                field = ".".join(str(p) for p in first["loc"])
                raise InvalidInput(f"{path}: query {number}: {field}: {first['msg']}") from exc
    return queries


def _ndcg(returned: list[str], relevant: list[str], k: int) -> float:
    gains = [1.0 / math.log2(rank + 2) for rank, doc_id in enumerate(returned[:k]) if doc_id in relevant]
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(relevant), k)))
    return sum(gains) / ideal if ideal else 0.0


async def run_eval(kb: KnowledgeService, queries: list[EvalQuery], k: int = 5, max_tokens: int = 4000) -> EvalReport:
    """Run every query against `kb` and score it."""
    if not 1 <= k <= 100:
        raise InvalidInput(f"k must be between 1 and 100, got {k}")
    outcomes: list[QueryOutcome] = []
    recall = reciprocal = ndcg = share = 0.0
    hits = 0
    for item in queries:
        if item.mode == "search":
            result = await kb.search(item.query, limit=max(k, 10))
            returned = [hit.id for hit in result.hits]
            rank = next((i + 1 for i, doc_id in enumerate(returned) if doc_id in item.relevant), None)
            recall += len(set(returned[:k]) & set(item.relevant)) / len(item.relevant)
            reciprocal += 1.0 / rank if rank else 0.0
            ndcg += _ndcg(returned, item.relevant, k)
            outcomes.append(
                QueryOutcome(
                    query=item.query, mode="search", relevant=item.relevant, returned=returned, first_relevant_rank=rank
                )
            )
        else:
            packed = await kb.context(item.query, max_tokens)
            returned = list(dict.fromkeys(section.id for section in packed.sections))
            rank = next((i + 1 for i, doc_id in enumerate(returned) if doc_id in item.relevant), None)
            total = sum(s.tokens for s in packed.sections)
            relevant_tokens = sum(s.tokens for s in packed.sections if s.id in item.relevant)
            query_share = relevant_tokens / total if total else 0.0
            hits += rank is not None
            share += query_share
            outcomes.append(
                QueryOutcome(
                    query=item.query,
                    mode="context",
                    relevant=item.relevant,
                    returned=returned,
                    first_relevant_rank=rank,
                    relevant_budget_share=round(query_share, 3),
                )
            )
    searches = sum(1 for q in queries if q.mode == "search")
    contexts = len(queries) - searches
    return EvalReport(
        k=k,
        search_queries=searches,
        context_queries=contexts,
        recall_at_k=round(recall / searches, 4) if searches else 0.0,
        mrr=round(reciprocal / searches, 4) if searches else 0.0,
        ndcg_at_k=round(ndcg / searches, 4) if searches else 0.0,
        context_hit_rate=round(hits / contexts, 4) if contexts else 0.0,
        context_relevant_share=round(share / contexts, 4) if contexts else 0.0,
        outcomes=outcomes,
    )
