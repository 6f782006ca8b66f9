"""What search ranking and context packing read from the database (filled in as search moves behind the store)."""

from __future__ import annotations

from typing import Protocol


class SearchIndex(Protocol):
    """The full-text index's reads."""
