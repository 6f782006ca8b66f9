"""Real servers for the benchmark: `sage serve` and the bare-Starlette floor as subprocesses on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
READY_POLL_SECONDS = 0.01


@dataclass
class Running:
    """A started server: its process, base URLs, seconds from launch to ready, and where its stderr goes."""

    process: subprocess.Popen[bytes]
    api: str
    mcp: str
    ready_seconds: float
    stderr_path: Path

    def stderr_tail(self, chars: int = 2000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def wait_ready(url: str, process: subprocess.Popen[bytes], launched: float, seconds: float) -> float:
    """Poll `url` until it answers 200; seconds since `launched` (a perf_counter reading)."""
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode} before it was ready")
            try:
                if client.get(url).status_code == 200:
                    return time.perf_counter() - launched
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(READY_POLL_SECONDS)
    raise RuntimeError(f"{url} not ready within {seconds:.0f} s")


def sage_env(home: Path, db_path: Path, cache_dir: Path, knowledge: Path | None = None) -> dict[str, str]:
    """`sage serve`'s environment: this machine's SAGE_* variables dropped, the benchmark's database used."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
    env.update(
        HOME=str(home),
        SAGE_DB_PATH=str(db_path),
        SAGE_CACHE_DIR=str(cache_dir),
        SAGE_BUNDLED_KNOWLEDGE="false",
        SAGE_IMPORT_ON_START="false" if knowledge is None else "true",
        SAGE_LOG_LEVEL="WARNING",
    )
    if knowledge is not None:
        env["SAGE_KNOWLEDGE_DIRS"] = str(knowledge)
    return env


def start_sage(
    home: Path,
    db_path: Path,
    cache_dir: Path,
    knowledge: Path | None = None,
    ready_within: float = 600,
    settings: dict[str, str] | None = None,
) -> Running:
    """Launch `sage serve` on free ports and wait for /ready; with `knowledge`, it re-scans that folder first.
    `settings` are extra SAGE_* variables (e.g. SAGE_IDLE_TIMEOUT_SECONDS)."""
    api, mcp, metrics = free_port(), free_port(), free_port()
    env = sage_env(home, db_path, cache_dir, knowledge)
    env.update(SAGE_API_PORT=str(api), SAGE_MCP_PORT=str(mcp), SAGE_METRICS_PORT=str(metrics), **(settings or {}))
    stderr_path = home / f"serve-{api}.log"
    with stderr_path.open("wb") as stderr:  # the child keeps its own copy of the descriptor
        launched = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "sage_server", "serve"],
            cwd=home,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    running = Running(process, f"http://127.0.0.1:{api}", f"http://127.0.0.1:{mcp}", 0.0, stderr_path)
    try:
        running.ready_seconds = wait_ready(f"{running.api}/ready", process, launched, ready_within)
    except BaseException:
        stop(process)
        raise
    return running


def start_floor(home: Path, sage_bind: bool = False) -> Running:
    """Launch the bare Starlette floor (tests/bench/floor.py) and wait until it answers."""
    port = free_port()
    stderr_path = home / f"floor-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
    env["PYTHONPATH"] = str(ROOT)
    with stderr_path.open("wb") as stderr:
        launched = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.floor", str(port), *(["--sage-bind"] if sage_bind else [])],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    running = Running(process, url, url, 0.0, stderr_path)
    try:
        running.ready_seconds = wait_ready(f"{url}/", process, launched, 60)
    except BaseException:
        stop(process)
        raise
    return running


def stop(process: subprocess.Popen[bytes], seconds: float = 30) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `seconds`; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(10)


def memory_mb(pid: int) -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a live process, in MB."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            found[name] = round(int(value.split()[0]) / 1024, 1)  # the kernel reports kB
    return {"peak_rss_mb": found.get("VmHWM", 0.0), "rss_mb": found.get("VmRSS", 0.0)}
