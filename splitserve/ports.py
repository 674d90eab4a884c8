"""Free TCP ports for servers that a parent starts and then points at (launched servers, local clusters, tests).

Binding port 0 and closing it gives a port from the kernel's ephemeral range, the range `connect()` draws from
as well: between that check and the server's own bind, any outgoing connection on the machine (a Ray cluster
opens hundreds while it starts) may take the port, and the server dies with "Address already in use". Ports
below the ephemeral range are never handed out by `connect()`, so one that is free now stays free unless some
other program binds it explicitly.
"""

from __future__ import annotations

import random
import socket

LOWEST = 20000                      # Ray's worker processes take 10002-19999 by default, and ray start
                                    # refuses a component port inside that range
_FALLBACK_RANGE = (32768, 60999)    # Linux's default ephemeral range
_rng = random.SystemRandom()        # leaves the caller's random state alone


def ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = map(int, f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return _FALLBACK_RANGE


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, chosen below the ephemeral range when that leaves room."""
    lo, _ = ephemeral_range()
    if lo - LOWEST >= 1000:
        for port in _rng.sample(range(LOWEST, lo), 64):
            if _bindable(host, port):
                return port
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bindable(host: str, port: int) -> bool:
    with socket.socket(_family(host)) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
