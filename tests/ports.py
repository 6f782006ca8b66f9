"""Free ports for servers the tests start, picked where the kernel does not hand out ports of its own."""

from __future__ import annotations

import random
import socket

# Linux gives outgoing connections ports from 32768 up (net.ipv4.ip_local_port_range): a port asked of the kernel
# with bind(0) comes from there too, and another process's connection can take it before our server binds it.
# Below that range only another test's pick can collide, and a random pick makes that rare.
LOW, HIGH = 20000, 32000
# Ports already handed out in this process: a server started later may not have bound its port yet, so the next
# pick must not return it again (a cluster test asks for ten at once).
_handed_out: set[int] = set()


def free_port() -> int:
    """A localhost TCP port that was free a moment ago."""
    for _ in range(200):
        port = random.randrange(LOW, HIGH)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port between {LOW} and {HIGH}")
