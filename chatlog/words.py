"""The project's vocabulary: how addresses are written and counted.

Pure and cheap to import (the chat path uses it): no third-party module, nothing heavy.
"""

from __future__ import annotations

import ipaddress

# -- addresses ---------------------------------------------------------------------------------


def plain_host(host: str) -> str:
    """An IPv4-mapped IPv6 host (`::ffff:10.0.0.1`) as the IPv4 address it is."""
    return host[7:] if host.startswith("::ffff:") else host


def address(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets, a v4-mapped one as plain IPv4."""
    host = plain_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_key(host: str) -> str:
    """What `--per-address` counts: an IPv4 address as itself (a v4-mapped form included) and an
    IPv6 address by its /64, the block one host picks its source addresses from (`2001:db8::/64`).
    A host that is not an IP address (a name in a test) counts as itself."""
    host = plain_host(host)
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
