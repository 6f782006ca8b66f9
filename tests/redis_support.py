"""A private redis-server for fault tests: start, kill, restart on the same port, pause and resume it."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tests.ports import free_port


class RedisServer:
    """A private redis-server on a free port: start, kill, restart on the same port, pause, resume."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url)
        try:
            with anyio.fail_after(10):
                while True:
                    try:
                        if await client.ping():
                            return
                    except (RedisError, OSError):
                        pass  # not listening yet
                    await anyio.sleep(0.02)
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
