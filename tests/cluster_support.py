"""Several `sage serve` processes on one database and one Redis, behind a real nginx running deploy/nginx.conf."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import sage_env, sage_runner, write_doc
from tests.ports import free_port
from tests.test_serve import wait_ready

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_CONF = ROOT / "deploy" / "nginx.conf"
NAMES = ("sage-a", "sage-b", "sage-c")


def nginx_binary() -> str:
    """nginx, or a skip on a developer's machine without it. CI (.ci/run) installs it and sets
    SAGE_TEST_REQUIRE_NGINX, so there a missing nginx fails instead of skipping."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found is None:
        if os.environ.get("SAGE_TEST_REQUIRE_NGINX"):
            pytest.fail("nginx is required here (SAGE_TEST_REQUIRE_NGINX) but not installed")
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
    return found


@dataclass
class Instance:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def running(self) -> bool:
        return self.process.poll() is None


@dataclass
class Cluster:
    """Three instances (sage-a, sage-b, sage-c) sharing `db` and `redis_url`, nginx on `url` in front of them, and
    an admin key (`headers`) stored before any instance started, so every request needs a key."""

    root: Path
    redis_url: str
    settings: dict[str, str] = field(default_factory=dict)
    instances: dict[str, Instance] = field(default_factory=dict)
    nginx: subprocess.Popen[bytes] | None = None
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def db(self) -> Path:
        return self.root / "shared.db"

    def env(self, **extra: str) -> dict[str, str]:
        knowledge = self.root / "kb"
        return sage_env(
            self.root,
            SAGE_DB_PATH=str(self.db),
            SAGE_BACKUP_DIR=str(self.root / "backups"),
            SAGE_BACKUP_INTERVAL_HOURS="0",
            SAGE_CACHE_DIR=str(self.root / "cache"),
            SAGE_BUNDLED_KNOWLEDGE="false",
            SAGE_KNOWLEDGE_DIRS=str(knowledge),
            SAGE_REDIS_URL=self.redis_url,
            SAGE_TRUSTED_PROXIES="127.0.0.1",
            **self.settings,
            **extra,
        )

    def sage(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The `sage` command on the shared database."""
        return sage_runner(self.root, self.env())(*args)

    def start(self) -> None:
        write_doc(
            self.root / "kb",
            "frameworks/timeouts.md",
            "---\nid: timeout-resilience\ntitle: Timeouts\ntriggers: [retry]\n---\n# Timeouts\n\nRetry with backoff.\n",
        )
        created = self.sage("keys", "create", "admin", "--scope", "admin", "--json")
        assert created.returncode == 0, created.stderr
        self.headers = {"Authorization": f"Bearer {json.loads(created.stdout)['token']}"}
        for name in NAMES:
            self.start_instance(name)
        for instance in self.instances.values():
            wait_ready(instance.url, instance.process, seconds=60)
        self.start_nginx()

    def start_instance(self, name: str) -> None:
        port = free_port()
        log = self.root / f"{name}.log"
        env = self.env(
            SAGE_INSTANCE_NAME=name,
            SAGE_API_PORT=str(port),
            SAGE_MCP_PORT=str(free_port()),
            SAGE_METRICS_PORT=str(free_port()),
        )
        with log.open("ab") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "sage_server", "serve"],
                cwd=self.root,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.instances[name] = Instance(name, process, f"http://127.0.0.1:{port}", log)

    def start_nginx(self) -> None:
        binary = nginx_binary()
        folder = self.root / "nginx"
        folder.mkdir(exist_ok=True)
        port = free_port()
        site = DEPLOY_CONF.read_text().replace("listen 80;", f"listen 127.0.0.1:{port};")
        for name, instance in self.instances.items():
            site = site.replace(f"{name}:8000", instance.url.removeprefix("http://"))
        (folder / "site.conf").write_text(site)
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the temp folders under /tmp
        (folder / "nginx.conf").write_text(
            f"{user}worker_processes 1;\ndaemon off;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n  access_log {folder}/access.log;\n"
            + "".join(f"  {kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi"))
            + "".join(f"  {kind}_temp_path {folder}/{kind};\n" for kind in ("uwsgi", "scgi"))
            + f"  include {folder}/site.conf;\n}}\n"
        )
        with (folder / "stderr.log").open("ab") as stderr:  # the child keeps its own copy of the descriptor
            self.nginx = subprocess.Popen(
                [binary, "-p", str(folder), "-c", str(folder / "nginx.conf")], stdout=subprocess.DEVNULL, stderr=stderr
            )
        self.url = f"http://127.0.0.1:{port}"
        wait_ready(self.url, self.nginx, seconds=60)

    def stop(self) -> None:
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)  # nginx's graceful stop
            try:
                self.nginx.wait(10)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
                self.nginx.wait(10)
        for instance in self.instances.values():
            if instance.running:
                instance.process.kill()
                instance.process.wait(10)


Outcomes = Counter[str]


async def load(
    url: str, headers: dict[str, str], stop: anyio.Event, workers: int = 6, doc_id: str = "timeout-resilience"
) -> Outcomes:
    """Idempotent requests through the balancer until `stop`: searches, reads, and PUTs with If-Match of the
    revision just read (200, or 412 when another worker won). Counts each answer's status, and 'transport' for a
    request that got no answer; a 5xx or a transport error is a request the balancer failed."""
    outcomes: Outcomes = Counter()

    async def worker(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if i % 3 == 0:
                        current = await http.get(f"/v1/knowledge/{doc_id}")
                        outcomes[str(current.status_code)] += 1
                        if current.status_code != 200:
                            continue
                        body = {"title": "Timeouts", "layer": "frameworks", "body": f"Retry with backoff ({n}.{i})."}
                        answer = await http.put(
                            f"/v1/knowledge/{doc_id}", json=body, headers={"If-Match": current.headers["etag"]}
                        )
                    elif i % 3 == 1:
                        answer = await http.get("/v1/search", params={"q": "retry backoff"})
                    else:
                        answer = await http.get(f"/v1/knowledge/{doc_id}")
                    outcomes[str(answer.status_code)] += 1
                except httpx.TransportError:
                    outcomes["transport"] += 1

    async with anyio.create_task_group() as tg:
        for n in range(workers):
            tg.start_soon(worker, n)
    return outcomes


def failures(outcomes: dict[str, int]) -> dict[str, int]:
    """The answers that count as failed requests: 5xx and no answer at all."""
    return {status: n for status, n in outcomes.items() if status == "transport" or status.startswith("5")}
