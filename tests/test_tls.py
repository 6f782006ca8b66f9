"""HTTPS: `sage serve --tls-cert-file/--tls-key-file` (or SAGE_TLS_*) serves every listener over TLS, with a
certificate made here; a certificate that cannot be used stops the server before it binds, naming the file."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from sage_server.app import create_app
from sage_server.errors import ConfigError
from sage_server.serve import tls_context
from sage_server.service import open_service
from tests.conftest import make_settings, sage_env, sage_runner, write_doc
from tests.listener_support import listening
from tests.mcp_support import payload
from tests.ports import free_port

pytestmark = pytest.mark.anyio


@dataclass
class Certificate:
    cert: Path
    key: Path
    combined: Path  # certificate and key in one file, as some tools write them

    def client_context(self) -> ssl.SSLContext:
        """What a client that trusts this certificate uses."""
        return ssl.create_default_context(cafile=str(self.cert))


def make_certificate(folder: Path, name: str = "sage") -> Certificate:
    """A self-signed certificate for localhost and 127.0.0.1, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = Certificate(folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.pem")
    paths.cert.write_bytes(cert_pem)
    paths.key.write_bytes(key_pem)
    paths.combined.write_bytes(cert_pem + key_pem)
    return paths


@dataclass
class Running:
    process: subprocess.Popen[str]
    api: str
    mcp: str
    metrics: str
    stderr: Path

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stderr.read_text().splitlines() if line.strip()]


def wait_ready(url: str, process: subprocess.Popen[str], context: ssl.SSLContext, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"sage serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=1, verify=context).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("sage serve did not become ready over HTTPS in time")


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    return make_certificate(tmp_path / "tls")


@pytest.fixture
def tls_server(tmp_path: Path, certificate: Certificate) -> Iterator[Running]:
    knowledge = tmp_path / "kb"
    write_doc(knowledge, "frameworks/retries.md", "---\nid: retries\ntitle: Retries\n---\n# Retries\n\nBack off.\n")
    ports = [free_port() for _ in range(3)]
    env = sage_env(
        tmp_path,
        SAGE_DB_PATH=str(tmp_path / "serve.db"),
        SAGE_BUNDLED_KNOWLEDGE="false",
        SAGE_KNOWLEDGE_DIRS=str(knowledge),
        SAGE_API_PORT=str(ports[0]),
        SAGE_MCP_PORT=str(ports[1]),
        SAGE_METRICS_PORT=str(ports[2]),
        SAGE_BACKUP_INTERVAL_HOURS="0",
    )
    stderr = tmp_path / "stderr.log"
    args = ["--tls-cert-file", str(certificate.cert), "--tls-key-file", str(certificate.key)]
    with stderr.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "sage_server", "serve", *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            text=True,
        )
    base = [f"https://127.0.0.1:{port}" for port in ports]
    running = Running(process, base[0], base[1], base[2], stderr)
    try:
        wait_ready(running.api, process, certificate.client_context())
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.e2e
async def test_sage_serve_speaks_https_on_every_listener(tls_server: Running, certificate: Certificate) -> None:
    context = certificate.client_context()
    with anyio.fail_after(60):
        async with httpx.AsyncClient(verify=context, timeout=10) as https:
            for base in (tls_server.api, tls_server.mcp):
                assert (await https.get(f"{base}/health")).json()["status"] == "healthy"
            found = await https.get(f"{tls_server.api}/v1/search", params={"q": "retries"})
            assert found.json()["hits"][0]["id"] == "retries"
            scraped = await https.get(f"{tls_server.metrics}/metrics")
            assert scraped.status_code == 200 and "sage_http_requests_total" in scraped.text
        async with httpx2.AsyncClient(verify=context) as http:
            async with Client(streamable_http_client(f"{tls_server.mcp}/mcp", http_client=http)) as client:
                assert payload(await client.call_tool("sage_search", {"query": "retries"}))["hits"]
        # Plain HTTP to a TLS port gets no answer, and a client that does not trust the certificate refuses it.
        async with httpx.AsyncClient(timeout=10) as plain:
            with pytest.raises(httpx.TransportError):
                await plain.get(tls_server.api.replace("https://", "http://") + "/health")
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await plain.get(f"{tls_server.api}/health")
    serving = next(line for line in tls_server.log_lines() if line["message"] == "Serving")
    assert isinstance(serving["context"], dict) and serving["context"]["scheme"] == "https"


async def test_a_certificate_file_holding_its_key_is_enough(tmp_path: Path, certificate: Certificate) -> None:
    settings = make_settings(tmp_path, tls_cert_file=certificate.combined)
    async with open_service(settings) as kb:
        kb.ready = True
        async with listening(create_app(settings, kb), settings, tls_context(settings)) as base:
            assert base.startswith("https://")
            async with httpx.AsyncClient(verify=certificate.client_context(), timeout=10) as https:
                response = await https.get(f"{base}/v1/info")
    assert response.status_code == 200


def test_old_protocols_are_refused(tmp_path: Path, certificate: Certificate) -> None:
    context = tls_context(make_settings(tmp_path, tls_cert_file=certificate.cert, tls_key_file=certificate.key))
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_key_that_does_not_belong_to_the_certificate_is_a_config_error(tmp_path: Path) -> None:
    one, other = make_certificate(tmp_path / "one"), make_certificate(tmp_path / "other")
    settings = make_settings(tmp_path, tls_cert_file=one.cert, tls_key_file=other.key)
    with pytest.raises(ConfigError, match="do not hold a PEM certificate and its private key"):
        tls_context(settings)
    with pytest.raises(ConfigError, match="do not hold"):
        tls_context(make_settings(tmp_path, tls_cert_file=one.key))  # a key is no certificate


@pytest.mark.e2e
def test_a_missing_certificate_stops_sage_serve_naming_the_file(tmp_path: Path, certificate: Certificate) -> None:
    missing = tmp_path / "nowhere.crt"
    sage = sage_runner(tmp_path, sage_env(tmp_path, SAGE_DB_PATH=str(tmp_path / "serve.db")))
    result = sage("serve", "--port", str(free_port()), "--tls-cert-file", str(missing))
    assert result.returncode == 2
    assert f"sage: config error: SAGE_TLS_CERT_FILE/SAGE_TLS_KEY_FILE: cannot read {missing}" in result.stderr
