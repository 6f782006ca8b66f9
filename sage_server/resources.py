"""Where the bundled knowledge/ and migrations/ live: inside the wheel, or in the source tree."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _bundled(name: str) -> Path:
    # A wheel carries them under sage_server/_bundled (hatchling force-include); an editable
    # install or a source checkout finds them at the repository root beside the package.
    packaged = Path(str(resources.files("sage_server"))) / "_bundled" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / name


def knowledge_dir() -> Path:
    """The bundled starter knowledge base."""
    return _bundled("knowledge")


def migrations_dir() -> Path:
    """The forward-only SQL migrations."""
    return _bundled("migrations")
