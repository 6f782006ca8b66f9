"""The `sage` command as a user runs it: a real subprocess, clean stdout, JSON logs on stderr, exit codes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import sage_env, sage_runner, write_doc

Sage = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def sage(tmp_path: Path, knowledge: Path) -> Sage:
    env = sage_env(
        tmp_path,
        SAGE_DB_PATH=str(tmp_path / "cli.db"),
        SAGE_BUNDLED_KNOWLEDGE="false",
        SAGE_KNOWLEDGE_DIRS=str(knowledge),
        SAGE_LOG_LEVEL="INFO",
    )

    run = sage_runner(tmp_path, env)

    return run


def test_help_for_every_command(sage: Sage) -> None:
    top = sage("--help")
    assert top.returncode == 0
    for command in (
        "serve",
        "mcp",
        "get",
        "search",
        "context",
        "list",
        "info",
        "import",
        "history",
        "health",
        "config",
        "restore",
        "delete",
        "purge",
        "eval",
    ):
        assert command in top.stdout
        assert sage(command, "--help").returncode == 0, command


def test_search_json_is_clean_stdout_and_logs_are_json_on_stderr(sage: Sage) -> None:
    result = sage("search", "retry", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["hits"][0]["id"] == "timeout-resilience"
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines and all(set(line) == {"timestamp", "level", "logger", "message", "context"} for line in lines)
    assert any(line["context"].get("operation") == "import" and "duration_ms" in line["context"] for line in lines)
    assert all(line["timestamp"].endswith("Z") for line in lines)


def test_get_document_and_layer(sage: Sage) -> None:
    one = sage("get", "honesty")
    assert one.returncode == 0 and one.stdout.startswith("# Honesty About Verification")
    layer = sage("get", "frameworks", "--json")
    assert [d["id"] for d in json.loads(layer.stdout)] == ["timeout-resilience"]


def test_not_found_exit_code_and_suggestion(sage: Sage) -> None:
    result = sage("get", "honsety")
    assert result.returncode == 1
    assert "not_found" in result.stderr and "did you mean honesty" in result.stderr
    assert "Traceback" not in result.stderr


def test_import_exit_code_says_files_were_skipped(sage: Sage, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    write_doc(extra, "good.md", "# Good\n\ntext\n")
    (extra / "bad.md").write_bytes(b"\xff\xfe bad")
    result = sage("import", str(extra))
    assert result.returncode == 3
    assert "1 created" in result.stdout and "bad.md: not UTF-8" in result.stderr
    assert sage("import", str(extra / "good.md")).returncode == 0


def test_write_commands_round_trip(sage: Sage) -> None:
    assert sage("delete", "honesty").returncode == 0
    assert sage("get", "honesty").returncode == 1
    history = json.loads(sage("history", "honesty", "--json").stdout)
    assert history["deleted"] and [r["change"] for r in history["revisions"]] == ["delete", "create"]
    assert sage("restore", "honesty", "1").returncode == 0
    assert sage("get", "honesty").returncode == 0


def test_context_info_list_health(sage: Sage) -> None:
    context = sage("context", "retry backoff", "--max-tokens", "300")
    assert context.returncode == 0 and "sage:timeout-resilience" in context.stdout
    info = json.loads(sage("info", "--json").stdout)
    assert info["documents"] == 4
    listing = sage("list", "--layer", "core")
    assert "honesty" in listing.stdout
    health = sage("health", "--json")
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "healthy"
    assert sage("search", "").returncode == 2
    assert sage("list", "--layer", "nope").returncode == 2
