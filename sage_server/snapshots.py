"""Snapshots beside the knowledge-base backups (spec 9.1): the configuration files on change, the metrics hourly.

Both are plain text under the backup folder, pruned by age; the newest configuration snapshot is always kept, so
a configuration that has not changed for longer than its retention still has a copy.
"""

from __future__ import annotations

import hashlib
import re
import time
from datetime import UTC, datetime
from pathlib import Path

CONFIG_FOLDER = "config"
METRICS_FOLDER = "metrics"
MASK = "********"
# A value whose key names a secret: `api_key: x`, `SAGE_API_KEY=x`, `"db_password": "x"`.
_SECRET_LINE = re.compile(
    r"""^(?P<key>\s*(?:export\s+)?["']?[\w.-]*(?:key|token|secret|password)[\w.-]*["']?\s*[:=]\s*)(?P<value>\S.*)$""",
    re.IGNORECASE | re.MULTILINE,
)
# The user:password part of any URL (redis://user:pw@host, postgresql://me:pw@db/sage).
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^\s/@'\"]+@", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """`text` (YAML or .env) with every secret value and URL credential replaced by a mask."""
    text = _SECRET_LINE.sub(lambda m: m.group("key") + MASK, text)
    return _URL_USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def snapshot_config(files: list[Path], backup_dir: Path) -> Path | None:
    """Write a masked copy of the configuration files that exist, if it differs from the newest snapshot.

    Returns the snapshot written, or None when nothing changed (or there is no configuration file at all).
    """
    parts = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue  # absent (the usual case for some of them) or unreadable: nothing to keep
        parts.append(f"# ---- {path}\n{mask_secrets(text).rstrip()}\n")
    if not parts:
        return None
    content = "".join(parts)
    digest = hashlib.sha256(content.encode()).hexdigest()[:12]
    folder = backup_dir / CONFIG_FOLDER
    newest = max(folder.glob("config-*.txt"), default=None)
    if newest is not None and newest.stem.endswith(f"-{digest}"):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"config-{_stamp()}-{digest}.txt"
    target.write_text(content, encoding="utf-8")
    return target


def snapshot_metrics(exposition: bytes, backup_dir: Path, instance: str) -> Path:
    """Write one metrics exposition (Prometheus text) of the instance named `instance`."""
    folder = backup_dir / METRICS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"metrics-{_stamp()}-{instance}.prom"
    target.write_bytes(exposition)
    return target


def prune_snapshots(folder: Path, pattern: str, retention_days: float) -> list[str]:
    """Delete snapshots matching `pattern` in `folder` older than `retention_days`, always keeping the newest."""
    found = sorted(folder.glob(pattern))
    cutoff = time.time() - retention_days * 86400
    removed = []
    for path in found[:-1]:
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(str(path))
        except FileNotFoundError:
            continue  # another instance pruned it first
    return removed
