"""`import sage_server`: a deliberate public API, and the embedded mode of spec section 5.1."""

from __future__ import annotations

from pathlib import Path

import pytest

import sage_server
from tests.conftest import make_settings

pytestmark = pytest.mark.anyio


def test_public_api_is_pinned() -> None:
    assert sage_server.__all__ == [
        "Conflict",
        "ContextResult",
        "ContextSection",
        "Document",
        "DocumentIn",
        "DocumentList",
        "DocumentSummary",
        "Health",
        "History",
        "ImportReport",
        "Info",
        "InvalidInput",
        "KnowledgeService",
        "NotFound",
        "Revision",
        "SageError",
        "Saved",
        "SearchHit",
        "SearchResult",
        "Settings",
        "Timeout",
        "Unavailable",
        "__version__",
        "load_settings",
        "open",
    ]
    for name in sage_server.__all__:
        assert hasattr(sage_server, name), name


async def test_embedded_use_returns_typed_models(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge])
    async with sage_server.open(settings) as kb:
        result = await kb.search("circuit breaker")
        assert isinstance(result, sage_server.SearchResult)
        assert isinstance(result.hits[0], sage_server.SearchHit)
        saved = await kb.save(sage_server.DocumentIn(id="new", title="New", layer="core", body="Embedded."))
        assert isinstance(saved, sage_server.Document)
        with pytest.raises(sage_server.NotFound):
            await kb.get("missing")
    # The database outlives the service: a second open sees what the first saved.
    async with sage_server.open(settings) as kb:
        assert (await kb.get("new")).body == "Embedded."


async def test_unusable_database_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a-folder.db").mkdir()
    with pytest.raises(sage_server.Unavailable, match="a-folder.db"):
        async with sage_server.open(make_settings(tmp_path, db_path=tmp_path / "a-folder.db")):
            pass
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(sage_server.Unavailable, match="garbage.db"):
        async with sage_server.open(make_settings(tmp_path, db_path=tmp_path / "garbage.db")):
            pass
    assert (tmp_path / "garbage.db").read_bytes() == b"this is not a database" * 100
