"""Prometheus metrics (spec 6.2), one registry per service so two apps in one process never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
TOKEN_BUCKETS = (100, 250, 500, 1000, 2000, 4000, 8000, 16000, 25000)


class Metrics:
    """Every series SAGE exports. The service, the cache and the adapters record through its methods."""

    content_type = CONTENT_TYPE_PLAIN_0_0_4

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.operations = Counter(
            "sage_operations", "Operations by name and outcome", ["operation", "status"], registry=r
        )
        self.duration = Histogram(
            "sage_operation_duration_seconds",
            "Operation duration",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.errors = Counter("sage_errors", "Errors by operation and kind", ["operation", "kind"], registry=r)
        self.cache_hits = Counter("sage_cache_hits", "Cache hits by tier", ["tier"], registry=r)
        self.cache_misses = Counter("sage_cache_misses", "Cache misses by tier", ["tier"], registry=r)
        self.cache_errors = Counter(
            "sage_cache_errors", "Cache faults (served as misses)", ["tier", "kind"], registry=r
        )
        self.breaker = Gauge(
            "sage_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", ["dependency"], registry=r
        )
        self.tool_calls = Counter(
            "sage_mcp_tool_calls", "MCP tool calls by tool and outcome", ["tool", "outcome"], registry=r
        )
        self.result_tokens = Histogram(
            "sage_mcp_result_tokens",
            "Estimated tokens per MCP tool result",
            ["tool"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.truncations = Counter(
            "sage_mcp_truncations", "MCP results cut to their token budget", ["tool"], registry=r
        )
        self.http_requests = Counter(
            "sage_http_requests",
            "HTTP requests by route template and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "sage_http_request_duration_seconds", "HTTP request duration", ["route"], registry=r
        )
        self.documents = Gauge("sage_documents", "Live documents by layer", ["layer"], registry=r)
        self.auth_failures = Counter(
            "sage_auth_failures", "Requests refused at the front door, by reason", ["reason"], registry=r
        )
        self.key_requests = Counter(
            "sage_requests_by_key", "Requests let in, by the name of the key they presented", ["key"], registry=r
        )
        self.rate_limited_requests = Counter(
            "sage_rate_limited",
            "Requests refused for their rate (429), by the name of their key ('anonymous' for those without one)",
            ["key"],
            registry=r,
        )
        self.backup_success = Gauge(
            "sage_backup_last_success_timestamp_seconds",
            "Unix time of the newest knowledge-base backup (0: none yet)",
            registry=r,
        )

    def operation(self, name: str, seconds: float, error_kind: str | None = None) -> None:
        """Record one service operation and, if it failed, its error kind."""
        self.operations.labels(name, "error" if error_kind else "ok").inc()
        self.duration.labels(name).observe(seconds)
        if error_kind:
            self.errors.labels(name, error_kind).inc()

    def tool_call(self, tool: str, outcome: str, tokens: int | None = None, truncated: bool = False) -> None:
        """Record one MCP tool call, the size of what it returned, and whether it was cut."""
        self.tool_calls.labels(tool, outcome).inc()
        if tokens is not None:
            self.result_tokens.labels(tool).observe(tokens)
        if truncated:
            self.truncations.labels(tool).inc()

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Record one HTTP request under its route template (never the raw path: ids would explode cardinality)."""
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_duration.labels(route).observe(seconds)

    # The cache tiers report through these (the cache's observer protocol).
    def hit(self, tier: str) -> None:
        self.cache_hits.labels(tier).inc()

    def miss(self, tier: str) -> None:
        self.cache_misses.labels(tier).inc()

    def error(self, tier: str, kind: str) -> None:
        self.cache_errors.labels(tier, kind).inc()

    def breaker_state(self, name: str, state: str) -> None:
        self.breaker.labels(name).set(BREAKER_STATES.get(state, -1))

    def set_documents(self, counts: dict[str, int]) -> None:
        """Refresh the documents-by-layer gauge (done at scrape time, not on every write)."""
        for layer, count in counts.items():
            self.documents.labels(layer).set(count)

    def auth_failure(self, reason: str) -> None:
        """Count a request refused for its credential (missing, invalid, revoked, expired, unsupported_scheme)."""
        self.auth_failures.labels(reason).inc()

    def request_by_key(self, key: str) -> None:
        """Count a request let in under its key's name ('anonymous' for all requests without one)."""
        self.key_requests.labels(key).inc()

    def rate_limited(self, key: str) -> None:
        """Count a request refused for its rate under its key's name."""
        self.rate_limited_requests.labels(key).inc()

    def set_backup_success(self, timestamp: float | None) -> None:
        """Refresh the time of the newest backup (read from the backup folder at scrape time)."""
        self.backup_success.set(timestamp or 0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)
