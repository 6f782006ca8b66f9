"""Which Host and Origin headers SAGE answers: the DNS-rebinding and cross-site rule shared by REST and MCP."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from sage_server.config import Settings

LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# Binding every interface says nothing about the name clients will use, so it adds no allowed Host.
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
ANY_HOST = "*"


def _bracketed(host: str) -> str:
    """An IPv6 literal as it appears in Host and Origin headers."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def allowed_names(settings: Settings) -> list[str]:
    """Host names (without ports) a request may be addressed to: localhost, the bound host when it is a name or a
    specific address, and `allowed_hosts` (where `*` means any)."""
    host = _bracketed(settings.host)
    named = [host] if host not in (*LOCAL_HOSTS, *WILDCARD_HOSTS) else []
    # Behind a proxy or in a container (bound to 0.0.0.0) clients use names only the operator knows.
    return list(dict.fromkeys([*LOCAL_HOSTS, *named, *(_bracketed(h) for h in settings.allowed_hosts)]))


def _host_name(authority: str) -> str | None:
    """The lower-cased name in a Host header value (`name`, `name:port`, `[v6]:port`); None when malformed."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        name, rest = (authority[: end + 1], authority[end + 1 :]) if end > 0 else ("", "")
    elif ":" in authority:
        name, _, port = authority.rpartition(":")
        rest = f":{port}"
    else:
        name, rest = authority, ""
    if not name or (rest and not rest[1:].isdigit()) or (":" in name and not name.startswith("[")):
        return None
    return name


@dataclass(frozen=True)
class HostRule:
    """Host must name this server (421 otherwise: a DNS-rebinding page names its own domain); an Origin, when a
    browser sends one, must name an allowed host too, or, when any Host is allowed, the Host itself."""

    names: frozenset[str]
    any_host: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> HostRule:
        names = allowed_names(settings)
        return cls(frozenset(n.lower() for n in names if n != ANY_HOST), ANY_HOST in names)

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request with this Host header is addressed to this server (any port)."""
        name = _host_name(host or "")
        return name is not None and (self.any_host or name in self.names)

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """Whether a page at `origin` may make state-changing requests here: http(s) on an allowed name, any port;
        or the request's own Host when any Host is allowed. `null` (sandboxed pages, files) never is."""
        try:
            parts = urlsplit(origin.strip())
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            return False
        name = _bracketed(parts.hostname.lower())
        return name in self.names or (self.any_host and name == _host_name(host or ""))
