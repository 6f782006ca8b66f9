"""Advisory file locks between processes on one machine: who serves a database, who runs the backup job.

The operating system releases a lock when its process dies, however it dies, so a killed server never leaves a
stale lock behind. On Windows, where `fcntl` does not exist, locking is skipped (and says so).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

SUPPORTED = fcntl is not None


class FileLock:
    """A shared or exclusive lock on `path` (created if missing), taken without waiting.

    `acquire()` returns False when another process holds a conflicting lock. Locks are per open file, so two
    FileLocks on the same path conflict even inside one process, as they would between processes.
    """

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock if it is free; True when held afterwards."""
        if self._fd is not None:
            return True
        if fcntl is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        """Let go of the lock; safe to call when not held."""
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases its lock
            self._fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def serving_lock_path(db_path: Path) -> Path:
    """The lock every process that has `db_path` open holds shared, and a restore must get exclusively."""
    return db_path.with_name(db_path.name + ".in-use")
