"""Layered settings: precedence, provenance, and one clear line for every kind of bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sage_server.config import Settings, describe, load_settings
from sage_server.errors import ConfigError


def test_defaults_match_the_spec(tmp_path: Path) -> None:
    loaded = load_settings(environ={}, cwd=tmp_path, home=tmp_path)
    s = loaded.settings
    assert (s.log_level, s.debug, s.api_port, s.mcp_port, s.metrics_port) == ("INFO", False, 8000, 8001, 9000)
    assert (s.cache_dir, s.db_path) == (tmp_path / ".sage" / "cache", tmp_path / ".sage" / "sage.db")
    assert s.layers == ["core", "guidelines", "frameworks", "practices", "scenarios", "templates"]
    assert set(loaded.sources.values()) == {"default"}


def test_resource_limits_default_to_the_spec(tmp_path: Path) -> None:
    s = load_settings(environ={}, cwd=tmp_path, home=tmp_path).settings
    assert s.max_requests_in_flight == 100  # spec 10.2: 100 connections per instance
    assert (s.idle_timeout_seconds, s.header_timeout_seconds, s.body_timeout_seconds) == (5, 10, 30)
    assert (s.mcp_session_idle_seconds, s.mcp_max_sessions, s.shutdown_grace_seconds) == (300, 500, 10)
    overridden = load_settings(environ={"SAGE_MAX_REQUESTS_IN_FLIGHT": "7"}, cwd=tmp_path, home=tmp_path)
    assert overridden.settings.max_requests_in_flight == 7
    with pytest.raises(ConfigError, match="SAGE_MCP_MAX_SESSIONS"):
        load_settings(environ={"SAGE_MCP_MAX_SESSIONS": "0"}, cwd=tmp_path, home=tmp_path)


README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_documents_every_setting_and_every_limit() -> None:
    readme = README.read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"| `{name}` | `SAGE_{name.upper()}` |" in readme, f"{name} has no row in the configuration table"
    operations = readme.split("\n## Operations\n", 1)[1].split("\n## ", 1)[0]
    bounds = [
        name
        for name in Settings.model_fields
        if re.search(r"timeout|limit|max_|_seconds|_bytes|_entries", name) and name != "context_max_tokens"
    ]
    assert len(bounds) >= 20
    missing = [name for name in bounds if f"`{name}`" not in operations]
    assert missing == [], "limits and timeouts missing from the README's Operations section"


def test_precedence_lowest_first(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".sage").mkdir(parents=True)
    (home / ".sage" / "config.yaml").write_text(
        "log_level: DEBUG\napi_port: 1001\nmcp_port: 1002\nmetrics_port: 1003\n"
    )
    project = tmp_path / "project"
    project.mkdir()
    (project / "sage.yaml").write_text("api_port: 2001\nmcp_port: 2002\nmetrics_port: 2003\n")
    (project / ".env").write_text("SAGE_MCP_PORT=3002\nSAGE_METRICS_PORT=3003\n")
    loaded = load_settings({"metrics_port": 5003}, environ={"SAGE_METRICS_PORT": "4003"}, cwd=project, home=home)
    s = loaded.settings
    assert (s.log_level, s.api_port, s.mcp_port, s.metrics_port) == ("DEBUG", 2001, 3002, 5003)
    assert loaded.sources["log_level"].endswith("config.yaml")
    assert loaded.sources["api_port"].endswith("sage.yaml")
    assert loaded.sources["mcp_port"].endswith(".env")
    assert loaded.sources["metrics_port"] == "command line"


def test_environment_beats_dotenv_and_lists_split(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SAGE_LOG_LEVEL=ERROR\n")
    env = {"SAGE_LOG_LEVEL": "WARNING", "SAGE_KNOWLEDGE_DIRS": f"{tmp_path / 'a'}:{tmp_path / 'b'}", "SAGE_DEBUG": "1"}
    s = load_settings(environ=env, cwd=tmp_path, home=tmp_path).settings
    assert s.log_level == "WARNING"
    assert s.knowledge_dirs == [tmp_path / "a", tmp_path / "b"]
    assert s.debug is True


def test_list_variables_may_be_json_lists(tmp_path: Path) -> None:
    env = {"SAGE_KNOWLEDGE_DIRS": json.dumps([str(tmp_path / "a"), str(tmp_path / "b:c")]), "SAGE_LAYERS": '["x", "y"]'}
    s = load_settings(environ=env, cwd=tmp_path, home=tmp_path).settings
    assert s.knowledge_dirs == [tmp_path / "a", tmp_path / "b:c"]  # a JSON list may hold the separator
    assert s.layers == ["x", "y"]
    for raw, expected in (('["/a", ', "not a valid JSON list"), ('["/a", 3]', "strings only")):
        with pytest.raises(ConfigError, match=f"SAGE_KNOWLEDGE_DIRS: .*{expected}"):
            load_settings(environ={"SAGE_KNOWLEDGE_DIRS": raw}, cwd=tmp_path, home=tmp_path)


def test_config_path_names_another_file(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.yaml"
    other.write_text("api_port: 8123\n")
    s = load_settings(environ={"SAGE_CONFIG_PATH": str(other)}, cwd=tmp_path, home=tmp_path).settings
    assert s.api_port == 8123
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(environ={"SAGE_CONFIG_PATH": str(tmp_path / "missing.yaml")}, cwd=tmp_path, home=tmp_path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("api_port: [unclosed\n", r"sage\.yaml: malformed YAML \(line \d+, column \d+\)"),
        ("- just\n- a list\n", "expected a mapping"),
        ("api_port: eighty\n", r"sage\.yaml: setting 'api_port': .*integer.*'eighty'"),
        ("log_level: LOUD\n", r"setting 'log_level'"),
        ("api_prot: 80\n", r"unknown setting 'api_prot'"),
        ("api_port: 70000\n", r"setting 'api_port'.*65535"),
    ],
)
def test_bad_project_file_names_file_and_key(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "sage.yaml").write_text(content)
    with pytest.raises(ConfigError, match=expected):
        load_settings(environ={}, cwd=tmp_path, home=tmp_path)


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"SAGE_API_PORT: setting 'api_port'"):
        load_settings(environ={"SAGE_API_PORT": "http"}, cwd=tmp_path, home=tmp_path)


def test_secrets_are_masked(tmp_path: Path) -> None:
    env = {"SAGE_API_KEY": "hunter2", "SAGE_REDIS_URL": "redis://:pw@localhost:6379/0"}
    rows = describe(load_settings(environ=env, cwd=tmp_path, home=tmp_path))
    shown = {name: value for name, _, value, _ in rows}
    assert shown["api_key"] == "********" and shown["redis_url"] == "********"
    assert "hunter2" not in str(rows)


def _sage(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "SAGE_DB_PATH": str(tmp_path / "s.db"),
        "SAGE_BUNDLED_KNOWLEDGE": "false",
    }
    return subprocess.run(
        [sys.executable, "-m", "sage_server", *args],
        cwd=tmp_path,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "sage.yaml").write_text("log_level: [\n")
    result = _sage(tmp_path, "info")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "sage.yaml" in result.stderr and "Traceback" not in result.stderr


def test_cli_config_show_reports_sources(tmp_path: Path) -> None:
    (tmp_path / "sage.yaml").write_text("api_port: 8111\n")
    result = _sage(tmp_path, "config", "show", env={"SAGE_API_KEY": "topsecret"})
    assert result.returncode == 0, result.stderr
    line = next(row for row in result.stdout.splitlines() if row.startswith("api_port"))
    assert "8111" in line and "sage.yaml" in line and "SAGE_API_PORT" in line
    assert "topsecret" not in result.stdout and "********" in result.stdout
