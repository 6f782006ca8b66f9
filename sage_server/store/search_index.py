"""What search ranking (search.py) and context packing (context.py) read from the full-text index. Queries are
given in the index's query syntax (search.Term.fts and Plan.fts build it)."""

from __future__ import annotations

from typing import Protocol

from sage_server.store.records import Body, Essential, SearchRow, SectionText


class SearchIndex(Protocol):
    """The full-text index's reads."""

    async def stems(self, texts: list[str]) -> list[list[str]]:
        """Each text's tokens as the index stems them ('calling' -> call)."""

    async def document_counts(self, expressions: list[str], documents: int) -> list[int]:
        """How many documents match each expression: exact up to search.COUNT_UP_TO and from half the `documents`
        on (where BM25 stops weighing a word), estimated in between."""

    async def document_count(self) -> int:
        """About how many documents there are (IDF needs only its order of magnitude)."""

    async def rank_documents(
        self, fts: str, layers: list[str] | None, tags: list[str] | None, limit: int, offset: int
    ) -> list[SearchRow]:
        """Live documents matching `fts` by BM25 alone, best first."""

    async def rank_close_together(
        self, groups: list[list[str]], distance: int, layers: list[str] | None, tags: list[str] | None, limit: int
    ) -> list[SearchRow]:
        """The best `limit` live documents holding, in one of search.CLOSE_FIELDS, every phrase of some group
        (`search.Term.fts` each) within `distance` words of each other, best first (by BM25 of those occurrences
        alone, or the store's nearest equivalent)."""

    async def bodies(self, keys: list[int]) -> dict[int, Body]:
        """The opening of each document's body (as much as snippets and re-scoring read), its tokens and revision."""

    async def field_scores(self, fts: str, keys: list[int]) -> dict[int, dict[str, float]]:
        """BM25 of each document in `keys` counting one field at a time (with that field's weight)."""

    async def vocabulary_near(self, starts: list[str], max_length: int) -> list[tuple[str, int]]:
        """Indexed stems beginning with any of `starts`, at most `max_length` long, with how many documents hold
        each."""

    async def count_matches(self, fts: str, up_to: int) -> int:
        """How many documents match `fts`, counted up to `up_to`."""

    async def essentials(self, layer: str) -> list[Essential]:
        """The live documents of `layer`, by id."""

    async def sections_of(self, keys: list[int]) -> list[SectionText]:
        """The sections of the documents with `keys`, in document then section order."""
