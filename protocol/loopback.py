"""Whether a host name or address is this machine: the one test behind every "only in clear
on loopback" rule (the dashboard's Host check and bind address, provisioning's management API).

``localhost`` by exact match; an IP address only when it is a loopback address. No DNS is
asked: a name resolves to whatever someone's DNS says (``127.evil.example`` can rebind to
127.0.0.1 for a page, or to a relay for a credential), so any other name is not loopback.
"""

from __future__ import annotations

import ipaddress


def bare_host(host: str) -> str:
    """``host`` without brackets or port: ``[::1]:8765`` -> ``::1``, ``localhost:80`` -> ``localhost``."""
    h = host.strip()
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end > 0 and (h[end + 1:] == "" or h[end + 1:].startswith(":")) else h
    if h.count(":") == 1:  # name:port or v4:port (a bare IPv6 address has two colons or more)
        return h.split(":", 1)[0]
    return h


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a bind address, a URL's host or a Host header, with or without port)
    names this machine only."""
    h = bare_host(host or "")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
