"""A non-editable install finds the bundled knowledge/ and migrations/ from any directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_knowledge_and_migrations(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    wheel = next(wheels.glob("sage_kb-*.whl"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HOME": str(tmp_path), "SAGE_DB_PATH": str(tmp_path / "w.db")}
    env = {k: v for k, v in env.items() if not k.startswith("SAGE_") or k == "SAGE_DB_PATH"}
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sage_server, sage_server.resources as r; "
            "print(sage_server.__file__); print(r.knowledge_dir()); print(r.migrations_dir())",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    module, knowledge, migrations = where.stdout.split()
    assert all(p.startswith(str(target)) for p in (module, knowledge, migrations)), where.stdout
    info = subprocess.run(
        [sys.executable, "-m", "sage_server", "info", "--json"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["documents"] >= 48
