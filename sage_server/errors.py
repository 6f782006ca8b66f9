"""The SageError tree: raised in the core, translated once at each edge (CLI, MCP, REST)."""

from __future__ import annotations

from typing import Any


class SageError(Exception):
    """Base of every error SAGE raises on purpose. `status` is the HTTP status, `code` a stable name."""

    status = 500
    code = "internal_error"
    exit_code = 1

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(SageError):
    """An argument or document failed validation."""

    status = 422
    code = "invalid_input"
    exit_code = 2


class Unauthorized(SageError):
    """The request carries no valid API key or token."""

    status = 401
    code = "unauthorized"


class NotFound(SageError):
    """No document (or revision) with that id; `details['suggestions']` names close ids."""

    status = 404
    code = "not_found"


class Conflict(SageError):
    """A write lost a race: the document changed since the revision the caller read."""

    status = 409
    code = "conflict"


class Timeout(SageError):
    """An operation ran past its deadline."""

    status = 504
    code = "timeout"


class Unavailable(SageError):
    """A dependency (the database, a cache) cannot serve the request now."""

    status = 503
    code = "unavailable"


class ConfigError(SageError):
    """A setting or config file is invalid; the program stops with exit code 2."""

    status = 500
    code = "config_error"
    exit_code = 2


class MigrationError(SageError):
    """The database schema cannot be brought to the version this code needs."""

    status = 500
    code = "migration_error"
    exit_code = 2
