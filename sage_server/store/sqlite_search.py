"""The SQLite store's full-text reads (FTS5): what search ranking and context packing ask of the index."""

from __future__ import annotations


def filter_sql(layers: list[str] | None, tags: list[str] | None, alias: str = "d") -> tuple[str, list[object]]:
    """SQL conditions (and parameters) for layer and tag filters; every given tag must be present."""
    sql = ""
    params: list[object] = []
    if layers:
        sql += f" AND {alias}.layer IN ({','.join('?' * len(layers))})"
        params += layers
    for tag in tags or []:
        sql += f" AND EXISTS (SELECT 1 FROM json_each({alias}.tags) WHERE value = ?)"
        params.append(tag)
    return sql, params


class SqliteSearch:
    """The index's reads on one SQLite connection (a mixin of the reader)."""
