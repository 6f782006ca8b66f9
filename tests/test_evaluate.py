"""The eval runner: figures per kind, out-of-scope queries as a false-alarm rate, MRR@10 and nDCG@10, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sage_server.errors import InvalidInput
from sage_server.evaluate import QueryOutcome, load_queries, ndcg, run_eval, summarize
from sage_server.service import KnowledgeService
from tests.conftest import sage_env

pytestmark = pytest.mark.anyio

EVAL = """
queries:
- {query: circuit breaker, relevant: [timeout-resilience], kind: keyword}
- {query: rotate the api key, relevant: [handling-secrets], kind: keyword}
- {query: 密钥, relevant: [handling-secrets], kind: zh}
- {query: sourdough bread recipe, relevant: []}
- {query: add retries to the payment client, mode: context, relevant: [timeout-resilience], kind: task}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(text, encoding="utf-8")
    return path


async def test_figures_per_kind_and_a_false_alarm_rate(service: KnowledgeService, tmp_path: Path) -> None:
    report = await run_eval(service, load_queries([write(tmp_path, EVAL)]), k=5)
    assert report.search_queries == 3 and report.context_queries == 1 and report.out_of_scope_queries == 1
    assert report.recall_at_k == 1.0 and report.mrr == 1.0 and report.ndcg_at_10 == 1.0
    kinds = {figures.kind: figures for figures in report.kinds}
    assert set(kinds) == {"keyword", "zh", "task"}
    assert kinds["keyword"].queries == 2 and kinds["keyword"].recall_at_k == 1.0
    assert kinds["task"].mode == "context" and kinds["task"].context_hit_rate == 1.0
    # Nothing in the sample knowledge is about bread: its first hit, if any, scores like no real answer.
    assert report.false_alarm_rate == 0.0 and report.false_alarm_threshold is not None
    out_of_scope = next(o for o in report.outcomes if not o.relevant)
    assert out_of_scope.kind == "out_of_scope"


def outcome(returned: list[str], relevant: list[str], score: float | None = 1.0) -> QueryOutcome:
    rank = next((i + 1 for i, doc in enumerate(returned) if doc in relevant), None)
    return QueryOutcome(
        query="q",
        mode="search",
        relevant=relevant,
        returned=returned,
        first_relevant_rank=rank,
        first_hit_score=score,
    )


def test_mrr_ndcg_and_recall_are_computed_as_defined() -> None:
    report = summarize([outcome(["x", "a"], ["a"]), outcome(["a", "b", "x"], ["a", "b"]), outcome(["x"], ["c"])], 1)
    assert report.recall_at_k == round((0 + 0.5 + 0) / 3, 4)
    assert report.mrr == round((0.5 + 1 + 0) / 3, 4)
    assert ndcg(["x", "a"], ["a"]) == pytest.approx(1 / 1.5849625, rel=1e-6)
    assert ndcg(["a", "b", "x"], ["a", "b"]) == 1.0


def test_a_false_alarm_is_an_out_of_scope_first_hit_above_what_95_percent_of_answers_reach() -> None:
    answered = [outcome(["a"], ["a"], score=0.5 + i / 100) for i in range(20)]  # 0.50 .. 0.69
    quiet, loud = outcome(["z"], [], score=0.4), outcome(["z"], [], score=0.6)
    report = summarize([*answered, quiet, loud, outcome([], [], score=None)], 5)
    assert report.false_alarm_threshold == 0.51  # 19 of the 20 answers (95%) score 0.51 or more
    assert report.false_alarm_rate == round(1 / 3, 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("queries:\n- {query: x, relevant: [], mode: context}\n", "must have mode 'search'"),
        ("queries:\n- {query: x, relevant: [], kind: keyword}\n", "its kind must be 'out_of_scope'"),
        ("queries:\n- {query: x, relevant: [a], kind: out_of_scope}\n", "needs 'relevant: \\[\\]'"),
        ("queries:\n- {query: x}\n", "query 1: relevant: Field required"),
        ("nothing: here\n", "top-level 'queries:' list"),
    ],
)
def test_bad_eval_files_are_named_with_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_queries([write(tmp_path, text)])


async def test_k_out_of_range_is_refused(service: KnowledgeService) -> None:
    with pytest.raises(InvalidInput, match="k must be between 1 and 10"):
        await run_eval(service, [], k=11)


def test_sage_eval_prints_kinds_and_false_alarms_and_json_has_them(tmp_path: Path, knowledge: Path) -> None:
    env = sage_env(
        tmp_path,
        SAGE_DB_PATH=str(tmp_path / "sage.db"),
        SAGE_BUNDLED_KNOWLEDGE="false",
        SAGE_KNOWLEDGE_DIRS=str(knowledge),
    )
    path = write(tmp_path, EVAL)
    command = [sys.executable, "-m", "sage_server", "eval", str(path)]
    human = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "MRR@10" in human and "nDCG@10" in human and "false alarms" in human and "by kind:" in human
    assert "keyword" in human and "off-topic packed while relevant left out: 0" in human
    data = json.loads(
        subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    )
    assert {k["kind"] for k in data["kinds"]} == {"keyword", "zh", "task"}
    assert data["false_alarm_rate"] == 0.0 and len(data["outcomes"]) == 5
    # A file without context tasks prints no context line (not "relevant found 0.0%").
    searches_only = "\n".join(line for line in EVAL.splitlines() if "mode: context" not in line)
    (tmp_path / "search-only").mkdir()
    path = write(tmp_path / "search-only", searches_only)
    human = subprocess.run([*command[:-1], str(path)], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "search  (3 queries)" in human and "context (" not in human
